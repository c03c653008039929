"""Named allowlists for ``load_file(..., allowed_globals=...)``.

Each allowlist holds the objects themselves (classes and functions), never names to import:
a pickle can only get what is listed here. Entries written as ``(object, "module.name")``
allow an object under the name that older library versions pickled it as.

`NUMPY`
    numpy arrays, scalars and dtypes (``np.ndarray``, ``np.float64(1.0)``, ``np.dtype("f4")``),
    as found in the ``meta`` of many training checkpoints. Object arrays are allowed; their
    elements go through the same safe unpickler.

`MMENGINE_RUNNER`
    Everything mmengine's ``Runner.save_checkpoint`` writes: `NUMPY` (``meta``), the
    ``message_hub`` state with `mmengine.logging.HistoryBuffer` objects, optimizer and
    parameter-scheduler states. A HistoryBuffer pickles its statistics methods as
    ``getattr(HistoryBuffer, "mean")``; instead of ``builtins.getattr`` (which would let a
    pickle reach any attribute of any allowed object) this list allows a ``getattr`` that
    only returns public methods of HistoryBuffer. Without mmengine installed, the buffers load
    as `HistoryBufferState` objects holding the same data.

    >>> from ckptmap.formats import load_file
    >>> from ckptmap.formats.allowlist import MMENGINE_RUNNER
    >>> checkpoint = load_file("epoch_12.pth", allowed_globals=MMENGINE_RUNNER)  # doctest: +SKIP

`MMENGINE_RUNNER` is built on first use, so importing this module does not import mmengine.
"""

from __future__ import annotations

import importlib
import pickle
from collections.abc import Iterable
from functools import cache
from typing import Any

import numpy as np

__all__ = ["MMENGINE_RUNNER", "NUMPY", "HistoryBufferState", "mmengine_runner", "numpy_globals"]

_HISTORY_BUFFER = "mmengine.logging.history_buffer.HistoryBuffer"


@cache
def numpy_globals() -> tuple[Any, ...]:
    """The `NUMPY` allowlist."""
    try:
        multiarray: Any = importlib.import_module("numpy._core.multiarray")
    except ImportError:  # numpy 1.x
        multiarray = importlib.import_module("numpy.core.multiarray")
    entries: list[Any] = [
        np.ndarray,
        np.dtype,
        multiarray._reconstruct,
        multiarray.scalar,
        # numpy 1.x pickles name numpy.core; numpy 2 moved it to numpy._core.
        (multiarray._reconstruct, "numpy.core.multiarray._reconstruct"),
        (multiarray.scalar, "numpy.core.multiarray.scalar"),
        (multiarray._reconstruct, "numpy._core.multiarray._reconstruct"),
        (multiarray.scalar, "numpy._core.multiarray.scalar"),
    ]
    # np.dtype("f4") is a numpy.dtypes.Float32DType, which the unpickler then BUILDs.
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        for name in sorted(dir(dtypes)):
            cls = getattr(dtypes, name)
            if isinstance(cls, type) and issubclass(cls, np.dtype):
                entries.append(cls)
    return tuple(entries)


class HistoryBufferState:
    """Stands in for mmengine's HistoryBuffer when mmengine is not installed.

    Holds the pickled state (``max_length``, ``_log_history``, ``_count_history``) and offers
    the same four statistics.
    """

    max_length: int
    _log_history: np.ndarray
    _count_history: np.ndarray

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        state.pop("statistics_methods", None)
        self.__dict__.update(state)

    def min(self, window_size: int | None = None) -> Any:
        return self._window(window_size).min()

    def max(self, window_size: int | None = None) -> Any:
        return self._window(window_size).max()

    def mean(self, window_size: int | None = None) -> Any:
        logs = self._window(window_size)
        counts = self._count_history[-len(logs) :] if window_size else self._count_history
        return logs.sum() / counts.sum()

    def current(self) -> Any:
        return self._log_history[-1]

    def _window(self, window_size: int | None) -> np.ndarray:
        return self._log_history[-window_size:] if window_size else self._log_history


def _history_buffer_class() -> type:
    try:
        from mmengine.logging import HistoryBuffer  # type: ignore[import-untyped]
    except ImportError:
        return HistoryBufferState
    return HistoryBuffer


@cache
def mmengine_runner() -> tuple[Any, ...]:
    """The `MMENGINE_RUNNER` allowlist (imports mmengine's HistoryBuffer if installed)."""
    buffer_cls = _history_buffer_class()

    def history_buffer_method(obj: Any, name: Any) -> Any:
        """``getattr``, restricted to the public methods of HistoryBuffer."""
        if (
            obj is buffer_cls
            and isinstance(name, str)
            and not name.startswith("_")
            and callable(vars(buffer_cls).get(name))
        ):
            return getattr(buffer_cls, name)
        raise pickle.UnpicklingError(
            f"getattr({obj!r}, {name!r}) is not allowed: the MMENGINE_RUNNER allowlist only "
            "resolves HistoryBuffer's statistics methods"
        )

    history_buffer_method.__qualname__ = "history_buffer_method"
    return (
        *numpy_globals(),
        buffer_cls
        if buffer_cls.__module__.startswith("mmengine")
        else (buffer_cls, _HISTORY_BUFFER),
        (history_buffer_method, "builtins.getattr"),
    )


#: The allowlists the command line's ``--allow`` names.
BY_NAME = {"numpy": numpy_globals, "mmengine-runner": mmengine_runner}


def globals_for(names: Iterable[str]) -> list[Any]:
    """The globals of the named allowlists (``--allow numpy``, ``--allow mmengine-runner``).

    Raises:
        KeyError: an unknown name.
    """
    allowed: list[Any] = []
    for name in names:
        allowed.extend(BY_NAME[name]())
    return allowed


def __getattr__(name: str) -> Any:
    if name == "MMENGINE_RUNNER":
        return mmengine_runner()
    if name == "NUMPY":
        return numpy_globals()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


MMENGINE_RUNNER: tuple[Any, ...]
NUMPY: tuple[Any, ...]
