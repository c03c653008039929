"""mmengine's `HistoryBuffer` for the safe unpickler, and the one ``getattr`` its pickles need.

A checkpoint written by mmengine's Runner holds its message hub: a `HistoryBuffer` per logged
scalar. mmengine's own ``HistoryBuffer.__setstate__`` puts whatever the pickle calls
``statistics_methods`` into a dict shared by every buffer of the process, and writes any other
key into the instance. `HistoryBufferState` checks the state first: the three data fields
(numeric 1-D histories of equal length, a positive ``max_length``) and statistics methods that
are mmengine's own four (or objects the caller allowed explicitly).

Once checked, the buffer becomes a real ``mmengine.logging.HistoryBuffer`` when mmengine's
logging module is already imported (always so under `ckptmap.integrations.mmengine.patch`);
otherwise it stays a `HistoryBufferState`, which holds the same data, offers the same
statistics, and pickles back as mmengine's class when mmengine is installed. Loading never
imports mmengine.

The buffers' methods are pickled as ``getattr(HistoryBuffer, "mean")``. The default allowlist
gives the unpickler `restricted_getattr` under the name ``builtins.getattr``: it answers exactly
the pairs in `GETATTR_PAIRS` and refuses everything else, so no pickle can reach another
attribute of any object.
"""

from __future__ import annotations

import contextlib
import contextvars
import copyreg
import sys
from collections.abc import Iterator
from typing import Any

from ckptmap.formats.safe_numpy import ArrayRecipe, Refused

__all__ = [
    "GETATTR_PAIRS",
    "HISTORY_BUFFER",
    "HistoryBufferState",
    "explicitly_allowed",
    "restricted_getattr",
]

#: Where mmengine defines the class, as its pickles name it.
HISTORY_BUFFER = "mmengine.logging.history_buffer.HistoryBuffer"
_MODULE, _, _NAME = HISTORY_BUFFER.rpartition(".")
_STATISTICS = ("min", "max", "current", "mean")
_FIELDS = frozenset({"max_length", "_log_history", "_count_history"})

# Objects the caller passed in allowed_globals for the load in progress (custom statistics).
_explicit: contextvars.ContextVar[frozenset[int]] = contextvars.ContextVar(
    "ckptmap_explicit_globals", default=frozenset()
)


@contextlib.contextmanager
def explicitly_allowed(objects: Any) -> Iterator[None]:
    """Marks `objects` as allowed by the caller for the loads inside the block."""
    token = _explicit.set(frozenset(id(o) for o in objects))
    try:
        yield
    finally:
        _explicit.reset(token)


def _real_class() -> type | None:
    module = sys.modules.get(_MODULE)
    cls = getattr(module, _NAME, None)
    return cls if isinstance(cls, type) else None


class HistoryBufferState:
    """mmengine's `HistoryBuffer`, checked; the same data and statistics without mmengine.

    Attributes:
        max_length: the most values the buffer keeps.
    """

    max_length: int
    _log_history: Any
    _count_history: Any

    def __new__(cls, *args: Any, **kwargs: Any) -> HistoryBufferState:
        if args or kwargs:
            raise Refused("to create a HistoryBuffer with arguments (mmengine pickles none)")
        return super().__new__(cls)

    def __setstate__(self, state: Any) -> None:
        if type(self) is not HistoryBufferState or self.__dict__:
            raise Refused("to fill one HistoryBuffer twice")
        self.__dict__.update(_checked_state(state))
        methods = _checked_methods(state.get("statistics_methods", {}))
        real = _real_class()
        if real is None:
            return
        try:
            self.__class__ = real
        except TypeError:  # a future mmengine whose layout differs: keep the stand-in
            return
        real._set_default_statistics(self)
        real._statistics_methods.update(methods)

    def __reduce_ex__(self, protocol: Any) -> Any:
        # Pickled (and deep-copied) as mmengine's own class when it is installed, so that
        # checkpoints saved again from these objects load anywhere mmengine does.
        try:
            from mmengine.logging import HistoryBuffer  # type: ignore[import-untyped]
        except ImportError:
            return super().__reduce_ex__(protocol)
        state = dict(self.__dict__, statistics_methods=dict(HistoryBuffer._statistics_methods))
        return (copyreg.__newobj__, (HistoryBuffer,), state)  # type: ignore[attr-defined]

    @property
    def data(self) -> tuple[Any, Any]:
        """The logged values and their counts."""
        return self._log_history, self._count_history

    def min(self, window_size: int | None = None) -> Any:
        """The smallest of the last `window_size` values (all by default)."""
        return self._window(window_size).min()

    def max(self, window_size: int | None = None) -> Any:
        """The largest of the last `window_size` values (all by default)."""
        return self._window(window_size).max()

    def mean(self, window_size: int | None = None) -> Any:
        """The mean of the last `window_size` values, weighted by their counts."""
        logs = self._window(window_size)
        counts = self._count_history[-len(logs) :] if window_size else self._count_history
        return logs.sum() / counts.sum()

    def current(self) -> Any:
        """The last value logged."""
        if len(self._log_history) == 0:
            raise ValueError("this HistoryBuffer is empty: nothing was logged yet")
        return self._log_history[-1]

    def statistics(self, method_name: str, *args: Any, **kwargs: Any) -> Any:
        """One of ``min``, ``max``, ``mean``, ``current`` by name, as mmengine's method."""
        if method_name not in _STATISTICS:
            raise KeyError(f"{method_name} has not been registered in HistoryBuffer")
        return getattr(self, method_name)(*args, **kwargs)

    def _window(self, window_size: int | None) -> Any:
        return self._log_history[-window_size:] if window_size else self._log_history


def _checked_state(state: Any) -> dict[str, Any]:
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise Refused(f"a HistoryBuffer with state {state!r:.120}")
    extra = set(state) - _FIELDS - {"statistics_methods"}
    if extra or not _FIELDS <= set(state):
        raise Refused(
            f"a HistoryBuffer with fields {sorted(state)} (mmengine writes max_length, "
            "_log_history, _count_history and statistics_methods)"
        )
    max_length = state["max_length"]
    if type(max_length) is not int or max_length <= 0:
        raise Refused(f"a HistoryBuffer with max_length {max_length!r:.60}")
    histories = {}
    for name in ("_log_history", "_count_history"):
        value = state[name]
        array = value.value() if isinstance(value, ArrayRecipe) else None
        if array is None or array.ndim != 1 or array.dtype.kind not in "biuf":
            raise Refused(f"a HistoryBuffer whose {name} is not a 1-D numeric numpy array")
        histories[name] = array
    if len(histories["_log_history"]) != len(histories["_count_history"]):
        raise Refused("a HistoryBuffer whose histories differ in length")
    return {"max_length": max_length, **histories}


def _checked_methods(methods: Any) -> dict[str, Any]:
    """The caller-allowed custom statistics methods (mmengine's own four are checked, dropped)."""
    if not isinstance(methods, dict):
        raise Refused(f"HistoryBuffer statistics methods {methods!r:.80}")
    custom = {}
    explicit = _explicit.get()
    for name, method in methods.items():
        if name in _STATISTICS and method is GETATTR_PAIRS.get((HistoryBufferState, name)):
            continue
        if isinstance(name, str) and id(method) in explicit and callable(method):
            custom[name] = method
            continue
        raise Refused(
            f"a HistoryBuffer statistics method {name!r:.40} = {method!r:.80}: only mmengine's "
            "min, max, current and mean, or a function passed in allowed_globals"
        )
    return custom


#: The only ``(object, name)`` pairs `restricted_getattr` answers, and what it answers.
GETATTR_PAIRS: dict[tuple[Any, str], Any] = {
    (HistoryBufferState, name): getattr(HistoryBufferState, name) for name in _STATISTICS
}


def restricted_getattr(obj: Any, name: Any, *default: Any) -> Any:
    """``getattr`` for pickles, limited to `GETATTR_PAIRS` (HistoryBuffer's statistics methods)."""
    if not default and isinstance(name, str):
        with contextlib.suppress(TypeError):  # unhashable obj
            found = GETATTR_PAIRS.get((obj, name))
            if found is not None:
                return found
    shown = getattr(obj, "__qualname__", None) or type(obj).__name__
    raise Refused(
        f"getattr({shown!s:.80}, {name!r:.80}): the default allowlist's getattr only resolves "
        "HistoryBuffer's statistics methods (min, max, current, mean)"
    )


restricted_getattr.__qualname__ = "restricted_getattr"
