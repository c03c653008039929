"""Model wrappers: objects whose weights live in their ``.module``.

The same classes mmengine unwraps, by the same rules:

- DataParallel and DistributedDataParallel, and every class given to `register_model_wrapper`
  (any class with a ``.module``: mmengine's and mmcv's registries accept plain classes too);
- every class in mmengine's ``MODEL_WRAPPERS`` registry and its child registries (a project's
  own ``@MODEL_WRAPPERS.register_module()`` classes), and in mmcv 1.x's ``MODULE_WRAPPERS``.
  The registries are read only when their modules are already imported: a class can only be
  registered by code that imported them, so nothing is missed, and ckptmap never imports
  mmengine or mmcv itself;
- for loading only, mmengine's ``BaseTTAModel`` (test-time augmentation): its weights go to its
  ``.module``, as mmengine's `load_state_dict` does. `get_state_dict` keeps it, as mmengine does.

FullyShardedDataParallel (FSDP1) is not unwrapped (its ``.module`` holds flattened or sharded
parameters): its own state-dict hooks give and take full, unprefixed state dicts. Loading into a
``fully_shard`` (FSDP2) model, whose parameters are DTensors, raises `UnsupportedModelError`
naming torch's ``set_model_state_dict``.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any, TypeVar

from torch import nn

from ckptmap.errors import ModelWrapperError, UnsupportedModelError

__all__ = [
    "LoadWrapperTypes",
    "is_model_wrapper",
    "is_unwrapped_for_load",
    "register_model_wrapper",
    "registered_wrappers",
    "unwrap_for_load",
    "unwrap_model",
]

_T = TypeVar("_T", bound=type)

# The classes registered with ckptmap itself (mmengine's and mmcv's registries are read live).
_MODEL_WRAPPERS: list[type] = [nn.DataParallel, nn.parallel.DistributedDataParallel]

# (module, attribute) of the registries read when their module is imported.
_REGISTRIES = (
    ("mmengine.registry", "MODEL_WRAPPERS"),
    ("mmcv.parallel.registry", "MODULE_WRAPPERS"),
)
# Where mmengine's BaseTTAModel lives, in the order its modules are imported.
_TTA_MODULES = ("mmengine.model.test_time_aug", "mmengine.model")


def register_model_wrapper(cls: _T) -> _T:
    """Registers a model wrapper class: its ``.module`` is loaded and saved in its place.

    Any class whose instances hold the model in ``.module``, an `nn.Module` or not (like a
    class registered in mmengine's ``MODEL_WRAPPERS``). DataParallel, DistributedDataParallel
    and mmengine's registered wrappers need no registration. Usable as a class decorator.

    Raises:
        TypeError: `cls` is not a class.
    """
    if not isinstance(cls, type):
        raise TypeError(f"register_model_wrapper takes a class, got {cls!r}")
    if cls not in _MODEL_WRAPPERS:
        _MODEL_WRAPPERS.append(cls)
    return cls


def _registry_members(registry: Any) -> Iterator[type]:
    # A Registry's classes are in .module_dict, its child registries in .children.
    seen: set[int] = set()
    stack = [registry]
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        members = getattr(current, "module_dict", None)
        if isinstance(members, dict):
            yield from (cls for cls in members.values() if isinstance(cls, type))
        children = getattr(current, "children", None)
        if isinstance(children, dict):
            stack.extend(children.values())


def registered_wrappers() -> tuple[type, ...]:
    """Every model wrapper class: ckptmap's, and mmengine's / mmcv's registries if imported."""
    classes = list(_MODEL_WRAPPERS)
    for module_name, attr in _REGISTRIES:
        registry = getattr(sys.modules.get(module_name), attr, None)
        if registry is not None:
            classes.extend(_registry_members(registry))
    return tuple(cls for cls in dict.fromkeys(classes) if not _is_fsdp_class(cls))


def _is_fsdp_class(cls: type) -> bool:
    fsdp = sys.modules.get("torch.distributed.fsdp.fully_sharded_data_parallel")
    base = getattr(fsdp, "FullyShardedDataParallel", None)
    return isinstance(base, type) and issubclass(cls, base)


def _tta_classes() -> tuple[type, ...]:
    for module_name in _TTA_MODULES:
        cls = getattr(sys.modules.get(module_name), "BaseTTAModel", None)
        if isinstance(cls, type):
            return (cls,)
    return ()


def is_model_wrapper(obj: Any) -> bool:
    """Whether `obj` is an instance of a model wrapper class (see `registered_wrappers`)."""
    return isinstance(obj, registered_wrappers())


def is_unwrapped_for_load(obj: Any) -> bool:
    """Whether a load puts `obj`'s weights into its ``.module``: a wrapper, or a BaseTTAModel."""
    return isinstance(obj, registered_wrappers() + _tta_classes())


def _inner(obj: Any) -> Any:
    try:
        return obj.module
    except AttributeError:
        raise ModelWrapperError(type(obj)) from None


def unwrap_model(obj: Any) -> Any:
    """``obj.module``, repeatedly, while `obj` is a model wrapper (as mmengine's get_state_dict).

    Raises:
        ModelWrapperError: a registered wrapper without a ``.module`` (an AttributeError).
    """
    classes = registered_wrappers()
    while isinstance(obj, classes):
        obj = _inner(obj)
    return obj


def unwrap_for_load(obj: Any) -> Any:
    """Like `unwrap_model`, also through mmengine's BaseTTAModel (as mmengine's load_state_dict)."""
    classes = registered_wrappers() + _tta_classes()
    while isinstance(obj, classes):
        obj = _inner(obj)
    return obj


class _LoadWrapperCheck(type):
    """``isinstance`` / ``issubclass`` against the wrapper classes of the moment, for loads."""

    def __instancecheck__(cls, obj: Any) -> bool:
        return is_unwrapped_for_load(obj)

    def __subclasscheck__(cls, sub: Any) -> bool:
        if not isinstance(sub, type):
            return False
        _refuse_fsdp2(sub)
        return issubclass(sub, registered_wrappers() + _tta_classes())


def _refuse_fsdp2(cls: type) -> None:
    fsdp = sys.modules.get("torch.distributed.fsdp")
    fsdp2 = getattr(fsdp, "FSDPModule", None)
    if isinstance(fsdp2, type) and issubclass(cls, fsdp2):
        raise UnsupportedModelError(
            cls.__qualname__,
            "can not load a checkpoint into",
            "its parameters are DTensors sharded by torch's fully_shard (FSDP2). Load the "
            "checkpoint before calling fully_shard, or load the full state dict with "
            "torch.distributed.checkpoint.state_dict.set_model_state_dict(model, state_dict, "
            "options=StateDictOptions(full_state_dict=True))",
        )


class LoadWrapperTypes(metaclass=_LoadWrapperCheck):
    """Stands for "a class a load unwraps" in ``isinstance`` and ``issubclass`` checks.

    What module loading tests each class of the tree against: registrations made after
    import, and mmengine's registry as it is at the time of the load, all count.
    """
