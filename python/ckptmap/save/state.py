"""What a checkpoint holds of a model: its state dict (wrappers unwrapped) and CPU copies."""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ckptmap.errors import StateDictHookError
from ckptmap.wrappers import unwrap_model

__all__ = ["get_state_dict", "weights_to_cpu"]


def get_state_dict(
    module: nn.Module,
    destination: OrderedDict[str, Any] | None = None,
    prefix: str = "",
    keep_vars: bool = False,
) -> OrderedDict[str, Any]:
    """The state of `module` as `torch.nn.Module.state_dict` gives it, model wrappers unwrapped.

    Wrappers (DataParallel, DistributedDataParallel and classes registered with
    `ckptmap.module_load.register_model_wrapper`) are replaced by their ``.module`` at every
    level, so their ``module.`` never reaches a key. Everything else is torch's own recursion:
    state-dict pre-hooks and post-hooks, `_save_to_state_dict` overrides, ``_extra_state``,
    non-persistent buffers left out, and ``destination._metadata`` holding each module's
    version. A module whose class overrides `state_dict` itself is asked through that override.

    Args:
        module: the model, possibly wrapped.
        destination: the dict to fill; a new `OrderedDict` with `_metadata` by default.
        prefix: prepended to every key.
        keep_vars: keep parameters as they are instead of detached tensors.

    Returns:
        The filled state dict (a post-hook of the top module may return a different one, as
        in torch).

    Raises:
        StateDictHookError: a hook registered with ``register_state_dict_post_hook``
            returned a value (a RuntimeError, as torch raises).
    """
    if destination is None:
        destination = OrderedDict()
        destination._metadata = OrderedDict()  # type: ignore[attr-defined]
    return _collect(unwrap_model(module), destination, prefix, keep_vars)


def _collect(module: nn.Module, destination: Any, prefix: str, keep_vars: bool) -> Any:
    if type(module).state_dict is not nn.Module.state_dict:
        return module.state_dict(destination=destination, prefix=prefix, keep_vars=keep_vars)
    local_metadata = {"version": module._version}
    if hasattr(destination, "_metadata"):
        destination._metadata[prefix[:-1]] = local_metadata
    for pre_hook in getattr(module, "_state_dict_pre_hooks", {}).values():
        pre_hook(module, prefix, keep_vars)
    module._save_to_state_dict(destination, prefix, keep_vars)
    for name, child in module._modules.items():
        if child is not None:
            # As in torch, what a child's post-hook returns does not reach its parent.
            _collect(unwrap_model(child), destination, f"{prefix}{name}.", keep_vars)
    for hook in module._state_dict_hooks.values():
        result = hook(module, destination, prefix, local_metadata)
        if getattr(hook, "_from_public_api", False):
            if result is not None:
                raise StateDictHookError(
                    f"state_dict post-hook {getattr(hook, '__qualname__', hook)!r} of "
                    f"{type(module).__name__} (at {prefix[:-1] or 'the top'!r}) must return "
                    "None: change the hook to modify the state dict in place"
                )
        elif result is not None:
            destination = result
    return destination


def weights_to_cpu(state_dict: Any) -> Any:
    """A copy of `state_dict` with every tensor in it moved to CPU memory.

    Nested dicts, lists and tuples (a whole checkpoint, optimizer state) are walked; their
    types are kept (OrderedDict, defaultdict, namedtuple), and so is the `_metadata` of every
    mapping that has one. Tensors already on the CPU are not copied; other objects with a
    ``cpu()`` method are moved with it, and anything else is kept as it is.

    Args:
        state_dict: a state dict, or any nesting of containers holding tensors.

    Returns:
        The same structure, on the CPU.
    """
    result = _to_cpu(state_dict)
    if not hasattr(result, "_metadata") and isinstance(result, OrderedDict):
        result._metadata = OrderedDict()  # type: ignore[attr-defined]
    return result


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.cpu()
    if isinstance(obj, Mapping):
        try:
            out = obj.copy()  # type: ignore[attr-defined]  # keeps the type and default_factory
        except (AttributeError, TypeError):
            out = dict(obj)
        if not isinstance(out, dict):
            out = dict(out)
        for key in out:
            out[key] = _to_cpu(out[key])
        metadata = getattr(obj, "_metadata", None)
        if metadata is not None:
            with contextlib.suppress(AttributeError):
                out._metadata = OrderedDict(metadata)  # type: ignore[attr-defined]
        return out
    if isinstance(obj, list):
        items = [_to_cpu(v) for v in obj]
        return items if type(obj) is list else type(obj)(items)
    if isinstance(obj, tuple):
        items = [_to_cpu(v) for v in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
    cpu = getattr(obj, "cpu", None)
    if callable(cpu) and not isinstance(obj, type):
        return cpu()
    return obj
