"""Run an existing OpenMMLab project's checkpoint code on ckptmap, without code changes.

    import ckptmap.integrations.mmengine

    ckptmap.integrations.mmengine.patch()   # e.g. at the top of tools/train.py
    ...
    ckptmap.integrations.mmengine.unpatch()  # back to mmengine's own functions

`patch()` replaces mmengine's checkpoint functions (`load_checkpoint`, `_load_checkpoint`,
`_load_checkpoint_to_model`, `_load_checkpoint_with_prefix`, `load_state_dict`,
`save_checkpoint`, `get_state_dict`, `weights_to_cpu`, `find_latest_checkpoint`) everywhere
mmengine holds them — `mmengine.runner`, the Runner module, hooks — and routes
`mmengine.runner.CheckpointLoader` to ckptmap's registry. Schemes the project registered on
mmengine's `CheckpointLoader`, before or after the patch, keep working: they are registered
with ckptmap too. Messages keep mmengine's flat format.

Checkpoints the Runner wrote load with the default allowlist (numpy values, `HistoryBuffer`s:
``load_from=`` and ``resume=True`` just work). A project whose checkpoints hold other classes
passes them once: ``patch(allowed_globals=[MyMeta])``; errors under the patch name that argument.
Model wrappers in mmengine's ``MODEL_WRAPPERS`` registry and ``BaseTTAModel`` are unwrapped as
mmengine unwraps them (`ckptmap.wrappers`).
"""

from __future__ import annotations

import functools
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

__all__ = ["is_patched", "patch", "patched", "unpatch"]

_MMENGINE_MODULE = "mmengine.runner.checkpoint"
_lock = threading.RLock()
# (owner, attribute, previous value) for every change, in the order made.
_undo: list[tuple[Any, str, Any]] = []
_saved_registry: tuple[Any, Any] | None = None
# What patch(allowed_globals=...) added for every patched load.
_allowed: tuple[Any, ...] = ()


def _loading(func: Callable[..., Any]) -> Callable[..., Any]:
    """`func` with patch()'s allowed globals, its errors advising patch(allowed_globals=...)."""
    from ckptmap.errors import UnsafeCheckpointError
    from ckptmap.formats import allowlist

    @functools.wraps(func)
    def load(*args: Any, **kwargs: Any) -> Any:
        try:
            with allowlist.extended(_allowed):
                return func(*args, **kwargs)
        except UnsafeCheckpointError as err:
            raise err.with_advice_for("mmengine") from None

    return load


def _replacements() -> dict[str, Callable[..., Any]]:
    """ckptmap's functions under mmengine's names and signatures."""
    from ckptmap import checkpoint, latest, module_load, save

    def load_state_dict(module: Any, state_dict: Any, strict: bool = False, logger: Any = None):
        return module_load.load_state_dict(module, state_dict, strict, logger, report="flat")

    def _load_checkpoint_to_model(
        model: Any,
        checkpoint_: Any,
        strict: bool = False,
        logger: Any = None,
        revise_keys: Sequence[tuple[str, str]] = ((r"^module\.", ""),),
    ):
        return checkpoint._load_checkpoint_to_model(
            model, checkpoint_, strict, logger, revise_keys, report="flat"
        )

    def load_checkpoint(
        model: Any,
        filename: Any,
        map_location: Any = None,
        strict: bool = False,
        logger: Any = None,
        revise_keys: Sequence[tuple[str, str]] = ((r"^module\.", ""),),
    ):
        return checkpoint.load_checkpoint(
            model, filename, map_location, strict, logger, revise_keys, report="flat"
        )

    def _load_checkpoint(filename: Any, map_location: Any = None, logger: Any = None):
        return checkpoint._load_checkpoint(filename, map_location, logger)

    def _load_checkpoint_with_prefix(prefix: Any, filename: Any, map_location: Any = None):
        return checkpoint._load_checkpoint_with_prefix(prefix, filename, map_location)

    return {
        "load_state_dict": load_state_dict,
        "load_checkpoint": _loading(load_checkpoint),
        "_load_checkpoint_to_model": _load_checkpoint_to_model,
        "_load_checkpoint": _loading(_load_checkpoint),
        "_load_checkpoint_with_prefix": _loading(_load_checkpoint_with_prefix),
        "save_checkpoint": save.save_checkpoint,
        "get_state_dict": save.get_state_dict,
        "weights_to_cpu": save.weights_to_cpu,
        "find_latest_checkpoint": latest.find_latest_checkpoint,
    }


def _set(owner: Any, name: str, value: Any) -> None:
    previous = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)
    _undo.append((owner, name, previous))
    setattr(owner, name, value)


def _is_custom(loader: Any) -> bool:
    return getattr(loader, "__module__", None) != _MMENGINE_MODULE


def _route_checkpoint_loader(mm_loader: type) -> None:
    """Makes mmengine's `CheckpointLoader` class a front for ckptmap's registry."""
    from ckptmap.schemes import CheckpointLoader

    global _saved_registry
    _saved_registry = (CheckpointLoader._schemes, dict(CheckpointLoader._patterns))
    for prefix, loader in list(mm_loader._schemes.items()):
        if _is_custom(loader):
            CheckpointLoader.register_scheme(prefix, loader, force=True)

    original_register = mm_loader.__dict__["_register_scheme"].__func__

    def _register_scheme(cls: type, prefixes: Any, loader: Any, force: bool = False) -> None:
        # mmengine's own rules (and KeyError) first; then the project's loader wins in ckptmap.
        original_register(cls, prefixes, loader, force=force)
        CheckpointLoader.register_scheme(prefixes, loader, force=True)

    def _get_checkpoint_loader(cls: type, path: str) -> Any:
        return CheckpointLoader._get_checkpoint_loader(path)

    def load_checkpoint(
        cls: type, filename: Any, map_location: Any = None, logger: Any = "current"
    ) -> Any:
        return CheckpointLoader.load_checkpoint(filename, map_location, logger)

    _set(mm_loader, "_register_scheme", classmethod(_register_scheme))
    _set(mm_loader, "_get_checkpoint_loader", classmethod(_get_checkpoint_loader))
    _set(mm_loader, "load_checkpoint", classmethod(_loading(load_checkpoint)))


def patch(allowed_globals: Iterable[Any] = ()) -> None:
    """Routes mmengine's checkpoint functions and `CheckpointLoader` through ckptmap.

    Idempotent (a second call only replaces `allowed_globals`); `unpatch()` undoes it.

    Args:
        allowed_globals: objects (classes, functions) that pickle checkpoints loaded through
            the patched functions may use besides the default allowlist, which already covers
            everything mmengine's Runner writes. Checked at once (`UnsafeAllowlistError`).

    Raises:
        ImportError: mmengine is not installed.
        UnsafeAllowlistError: an `allowed_globals` entry that can run code.
    """
    global _allowed
    from ckptmap.formats import allowlist

    given = allowlist.checked(allowed_globals)
    with _lock:
        _allowed = given
        if _undo:
            return
        import importlib

        mm = importlib.import_module(_MMENGINE_MODULE)
        # The Runner module imports its names at import time; load it so it is patched too.
        importlib.import_module("mmengine.runner")
        originals = {name: getattr(mm, name) for name in _replacements()}
        replacements = _replacements()
        try:
            for module_name, module in sorted(sys.modules.items()):
                if module is None or not (
                    module_name == "mmengine" or module_name.startswith("mmengine.")
                ):
                    continue
                for name, original in originals.items():
                    if module.__dict__.get(name) is original:
                        _set(module, name, replacements[name])
            _route_checkpoint_loader(mm.CheckpointLoader)
        except BaseException:
            _restore()
            raise


def _restore() -> None:
    global _saved_registry, _allowed
    _allowed = ()
    while _undo:
        owner, name, previous = _undo.pop()
        setattr(owner, name, previous)
    if _saved_registry is not None:
        from ckptmap.schemes import CheckpointLoader

        CheckpointLoader._schemes, patterns = _saved_registry
        CheckpointLoader._patterns.clear()
        CheckpointLoader._patterns.update(patterns)
        _saved_registry = None


def unpatch() -> None:
    """Restores mmengine's own functions and ckptmap's registry as they were."""
    with _lock:
        _restore()


def is_patched() -> bool:
    """Whether `patch()` is in effect."""
    return bool(_undo)


@contextmanager
def patched() -> Iterator[None]:
    """`patch()` for the duration of a with-block (nests: only the outermost unpatches)."""
    with _lock:
        already = is_patched()
        patch()
    try:
        yield
    finally:
        if not already:
            unpatch()
