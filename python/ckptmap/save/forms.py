"""The two ways `save_checkpoint` is called: mmengine 0.x's and mmcv 1.x's.

- mmengine: ``save_checkpoint(checkpoint, filename, file_client_args=None, backend_args=None)``
  saves `checkpoint` as it is.
- mmcv 1.x: ``save_checkpoint(model, filename, optimizer=None, meta=None,
  file_client_args=None)``, told apart by an `nn.Module` as the first argument, builds the
  checkpoint from the model (`mmcv_checkpoint`).
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from ckptmap._core import __version__
from ckptmap.errors import SaveArgumentError, SaveArgumentTypeError
from ckptmap.save.state import get_state_dict, weights_to_cpu
from ckptmap.wrappers import is_model_wrapper, unwrap_model

__all__ = ["SaveCall", "bind_arguments", "mmcv_checkpoint"]

logger = logging.getLogger("ckptmap")


def _engine_form(file_client_args: dict | None = None, backend_args: dict | None = None) -> None:
    """save_checkpoint(checkpoint, filename, file_client_args=None, backend_args=None)"""


def _mmcv_form(
    optimizer: Optimizer | Mapping[str, Optimizer] | None = None,
    meta: dict | None = None,
    file_client_args: dict | None = None,
) -> None:
    """save_checkpoint(model, filename, optimizer=None, meta=None, file_client_args=None)"""


_SIGNATURES = {form: inspect.signature(form) for form in (_engine_form, _mmcv_form)}


@dataclass(frozen=True)
class SaveCall:
    """The arguments of one `save_checkpoint` call, once its form is known.

    Attributes:
        mmcv_form: the first argument is a model (mmcv 1.x).
        backend_args: ``backend_args`` or ``file_client_args``, whichever was given.
        optimizer, meta: the mmcv form's arguments.
    """

    mmcv_form: bool
    backend_args: Mapping[str, Any] | None
    optimizer: Any = None
    meta: Any = None


def bind_arguments(checkpoint: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> SaveCall:
    """Binds `args` / `kwargs` to the form `checkpoint` selects, as the seeds accept them.

    Raises:
        SaveArgumentTypeError: arguments the form does not take (a TypeError).
        SaveArgumentError: both ``file_client_args`` and ``backend_args`` (a ValueError).
    """
    mmcv_form = isinstance(checkpoint, nn.Module) or is_model_wrapper(checkpoint)
    form = _mmcv_form if mmcv_form else _engine_form
    try:
        options = _SIGNATURES[form].bind(*args, **kwargs).arguments
    except TypeError as err:
        raise SaveArgumentTypeError(f"{form.__doc__}: {err}") from None
    if mmcv_form:
        return SaveCall(
            True, options.get("file_client_args"), options.get("optimizer"), options.get("meta")
        )
    backend_args = options.get("backend_args")
    if options.get("file_client_args") is not None:
        if backend_args is not None:
            raise SaveArgumentError(
                '"file_client_args" and "backend_args" cannot be set at the same time.'
            )
        logger.warning(
            '"file_client_args" will be deprecated in future. Please use "backend_args" instead'
        )
        backend_args = options["file_client_args"]
    return SaveCall(False, backend_args)


def mmcv_checkpoint(model: nn.Module, optimizer: Any, meta: Any) -> dict[str, Any]:
    """The checkpoint mmcv 1.x builds from a model.

    ``{"meta": meta, "state_dict": weights_to_cpu(get_state_dict(model)), "optimizer": ...}``
    where `meta` (a copy) gains ``ckptmap_version``, ``torch_version``, ``time`` and the
    model's ``CLASSES`` when it has them; `optimizer` (one or a dict of them) is saved as its
    ``state_dict()``.

    Raises:
        SaveArgumentTypeError: `meta` is not a dict or None, or `optimizer` is not an
            optimizer, a dict of them or None (a TypeError, as mmcv raises).
    """
    if meta is None:
        meta = {}
    elif not isinstance(meta, dict):
        raise SaveArgumentTypeError(f"meta must be a dict or None, but got {type(meta)}")
    else:
        meta = dict(meta)
    if not (optimizer is None or isinstance(optimizer, Optimizer | Mapping)):
        raise SaveArgumentTypeError(
            f"optimizer must be an Optimizer, a dict of them or None, but got {type(optimizer)}"
        )
    # str(): torch.__version__ is a TorchVersion, which weights_only loads refuse.
    meta.update(
        ckptmap_version=str(__version__), torch_version=str(torch.__version__), time=time.asctime()
    )
    model = unwrap_model(model)
    classes = getattr(model, "CLASSES", None)
    if classes is not None:
        meta.update(CLASSES=classes)
    checkpoint: dict[str, Any] = {
        "meta": meta,
        "state_dict": weights_to_cpu(get_state_dict(model)),
    }
    if isinstance(optimizer, Optimizer):
        checkpoint["optimizer"] = optimizer.state_dict()
    elif isinstance(optimizer, Mapping):
        checkpoint["optimizer"] = {name: optim.state_dict() for name, optim in optimizer.items()}
    return checkpoint
