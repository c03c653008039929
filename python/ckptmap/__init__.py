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
from ckptmap.cache import cache_home, cached_download
from ckptmap.latest import find_latest_checkpoint, rotate_checkpoints, write_last_checkpoint
from ckptmap.prefix import filter_prefix
from ckptmap.revise import Collision, Revised, revise_keys
from ckptmap.save import get_state_dict, save_checkpoint, weights_to_cpu
from ckptmap.schemes import (
    CheckpointLoader,
    get_deprecated_model_names,
    get_external_models,
    get_mmcls_models,
    get_torchvision_models,
    load_from_bdd100k,
    load_from_ceph,
    load_from_http,
    load_from_local,
    load_from_mmcls,
    load_from_mmdet,
    load_from_mmseg,
    load_from_openmmlab,
    load_from_pavi,
    load_from_petrel,
    load_from_torchvision,
)

__all__ = [
    "CheckpointLoader",
    "Collision",
    "KeyRules",
    "Revised",
    "__version__",
    "cache_home",
    "cached_download",
    "diff_keys",
    "filter_prefix",
    "filter_prefix_keys",
    "find_collisions",
    "find_latest_checkpoint",
    "get_deprecated_model_names",
    "get_external_models",
    "get_mmcls_models",
    "get_state_dict",
    "get_torchvision_models",
    "group_by_owner",
    "load_from_bdd100k",
    "load_from_ceph",
    "load_from_http",
    "load_from_local",
    "load_from_mmcls",
    "load_from_mmdet",
    "load_from_mmseg",
    "load_from_openmmlab",
    "load_from_pavi",
    "load_from_petrel",
    "load_from_torchvision",
    "revise_keys",
    "rotate_checkpoints",
    "save_checkpoint",
    "weights_to_cpu",
    "write_last_checkpoint",
]
