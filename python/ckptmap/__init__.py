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
from ckptmap.latest import find_latest_checkpoint, rotate_checkpoints, write_last_checkpoint
from ckptmap.prefix import filter_prefix
from ckptmap.revise import Collision, Revised, revise_keys
from ckptmap.save import get_state_dict, save_checkpoint, weights_to_cpu

__all__ = [
    "Collision",
    "KeyRules",
    "Revised",
    "__version__",
    "diff_keys",
    "filter_prefix",
    "filter_prefix_keys",
    "find_collisions",
    "find_latest_checkpoint",
    "get_state_dict",
    "group_by_owner",
    "revise_keys",
    "rotate_checkpoints",
    "save_checkpoint",
    "weights_to_cpu",
    "write_last_checkpoint",
]
