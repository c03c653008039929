"""Where URIs become checkpoints: the scheme registry and its built-in loaders.

``CheckpointLoader.load_checkpoint(uri)`` picks the loader registered for the URI's prefix:
local paths, ``http(s)://`` (through the download cache), the model zoos (``torchvision://``,
``open-mmlab://``, ``mmcls://``, ``mmdet://``, ``mmseg://``, ``bdd100k://``), ``s3://``
(boto3), ``petrel://`` and ``pavi://``.

The names below are imported on first use, so that importing a submodule such as
`ckptmap.schemes.errors` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "CheckpointLoader",
    "get_deprecated_model_names",
    "get_external_models",
    "get_mmcls_models",
    "get_torchvision_models",
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
]

_WHERE = {
    "CheckpointLoader": "registry",
    "load_from_local": "local",
    "load_from_http": "http",
    "load_from_ceph": "s3",
    "load_from_pavi": "pavi",
    "load_from_petrel": "petrel",
    "get_deprecated_model_names": "zoo",
    "get_external_models": "zoo",
    "get_mmcls_models": "zoo",
    "get_torchvision_models": "zoo",
    "load_from_bdd100k": "zoo",
    "load_from_mmcls": "zoo",
    "load_from_mmdet": "zoo",
    "load_from_mmseg": "zoo",
    "load_from_openmmlab": "zoo",
    "load_from_torchvision": "zoo",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'ckptmap.schemes' has no attribute {name!r}")
    # The registry registers every built-in loader when it is imported.
    importlib.import_module("ckptmap.schemes.registry")
    value = getattr(importlib.import_module(f"ckptmap.schemes.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
