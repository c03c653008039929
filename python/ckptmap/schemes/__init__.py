"""Where URIs become checkpoints: the scheme registry and its built-in loaders.

``CheckpointLoader.load_checkpoint(uri)`` picks the loader registered for the URI's prefix:
local paths, ``http(s)://`` (through the download cache), the model zoos (``torchvision://``,
``open-mmlab://``, ``mmcls://``, ``mmdet://``, ``mmseg://``, ``bdd100k://``), ``s3://``
(boto3), ``petrel://`` and ``pavi://``.
"""

from ckptmap.schemes.local import load_from_local
from ckptmap.schemes.pavi import load_from_pavi
from ckptmap.schemes.petrel import load_from_petrel
from ckptmap.schemes.registry import CheckpointLoader
from ckptmap.schemes.s3 import load_from_ceph
from ckptmap.schemes.web import load_from_http
from ckptmap.schemes.zoo import (
    get_deprecated_model_names,
    get_external_models,
    get_mmcls_models,
    get_torchvision_models,
    load_from_bdd100k,
    load_from_mmcls,
    load_from_mmdet,
    load_from_mmseg,
    load_from_openmmlab,
    load_from_torchvision,
)

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
