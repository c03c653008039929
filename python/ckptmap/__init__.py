"""ckptmap: load PyTorch checkpoints into modules fast and safely.

Regex key rules, prefix filters and key diffs run in a Rust core; the public API follows
OpenMMLab's checkpoint functions.
"""

from ckptmap._core import (
    KeyRules,
    __version__,
    diff_keys,
    filter_prefix_keys,
    find_collisions,
    group_by_owner,
)
from ckptmap.prefix import filter_prefix
from ckptmap.revise import Collision, Revised, revise_keys

__all__ = [
    "Collision",
    "KeyRules",
    "Revised",
    "__version__",
    "diff_keys",
    "filter_prefix",
    "filter_prefix_keys",
    "find_collisions",
    "group_by_owner",
    "revise_keys",
]
