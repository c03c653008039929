"""ckptmap: load PyTorch checkpoints into modules fast and safely.

Regex key rules, prefix filters and key diffs run in a Rust core; the public API follows
OpenMMLab's checkpoint functions.
"""

from ckptmap._core import KeyRules, __version__
from ckptmap.revise import Collision, Revised, revise_keys

__all__ = [
    "Collision",
    "KeyRules",
    "Revised",
    "__version__",
    "revise_keys",
]
