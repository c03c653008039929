"""ckptmap: load PyTorch checkpoints into modules fast and safely.

Regex key rules, prefix filters and key diffs run in a Rust core; the public API follows
OpenMMLab's checkpoint functions. Every error and warning class is also available here (and
in `ckptmap.errors`).
"""

import importlib.util

from ckptmap import errors as _errors
from ckptmap._core import (
    KeyRules,
    __version__,
    diff_keys,
    filter_prefix_keys,
    find_collisions,
    group_by_owner,
)
from ckptmap.errors import *  # noqa: F403  (every error and warning class)
from ckptmap.prefix import filter_prefix

# The key rules, the key index and the error classes above work without torch (ckptmap's
# torch-free tests run them under every supported Python); everything below loads or saves
# tensors. torch is a dependency, so it is missing only from installs made with `--no-deps`,
# where the names below raise a clear ImportError when used (see __getattr__).
if importlib.util.find_spec("torch") is not None:
    from ckptmap import remote as _remote  # noqa: F401  (registers open_checkpoint's range reads)
    from ckptmap.cache import cache_home, cached_download
    from ckptmap.checkpoint import (
        Checkpoint,
        LoadPlan,
        _load_checkpoint,
        _load_checkpoint_to_model,
        _load_checkpoint_with_prefix,
        find_state_dict,
        load_checkpoint,
        load_model_checkpoint,
        open_checkpoint,
        plan_load,
    )
    from ckptmap.dist import get_dist_info
    from ckptmap.formats import allowlist as _allowlist  # noqa: F401  (ckptmap.formats.allowlist)
    from ckptmap.formats import load_file
    from ckptmap.latest import find_latest_checkpoint, rotate_checkpoints, write_last_checkpoint
    from ckptmap.module_load import load_state_dict
    from ckptmap.report import LoadResult, Mismatch, fold_keys, format_report
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
    from ckptmap.suggest import SuggestResult, suggest_rules
    from ckptmap.wrappers import is_model_wrapper, register_model_wrapper, unwrap_model

__all__ = [
    "Checkpoint",
    "CheckpointLoader",
    "Collision",
    "KeyRules",
    "LoadPlan",
    "LoadResult",
    "Mismatch",
    "Revised",
    "SuggestResult",
    "__version__",
    "_load_checkpoint",
    "_load_checkpoint_to_model",
    "_load_checkpoint_with_prefix",
    "cache_home",
    "cached_download",
    "diff_keys",
    "filter_prefix",
    "filter_prefix_keys",
    "find_collisions",
    "find_latest_checkpoint",
    "find_state_dict",
    "fold_keys",
    "format_report",
    "get_deprecated_model_names",
    "get_dist_info",
    "get_external_models",
    "get_mmcls_models",
    "get_state_dict",
    "get_torchvision_models",
    "group_by_owner",
    "is_model_wrapper",
    "load_checkpoint",
    "load_file",
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
    "load_model_checkpoint",
    "load_state_dict",
    "open_checkpoint",
    "plan_load",
    "register_model_wrapper",
    "revise_keys",
    "rotate_checkpoints",
    "save_checkpoint",
    "suggest_rules",
    "unwrap_model",
    "weights_to_cpu",
    "write_last_checkpoint",
    *_errors.__all__,
]


def __getattr__(name: str) -> object:
    # Only reached for names not set above: without torch, the torch-needing half of __all__.
    if name in __all__:
        raise ModuleNotFoundError(
            f"ckptmap.{name} needs PyTorch, which is not installed: pip install torch "
            "(only ckptmap's key rules, key index and error classes work without it)",
            name="torch",
        )
    raise AttributeError(f"module 'ckptmap' has no attribute {name!r}")
