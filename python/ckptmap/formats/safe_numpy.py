"""numpy values for the safe unpickler, rebuilt from checked parts.

numpy's own pickle helpers trust their input. A pickle that is allowed ``numpy.dtype`` and
``_reconstruct`` can hand ``dtype.__setstate__`` flags saying "no Python objects here" for an
object dtype, then hand ``ndarray.__setstate__`` raw bytes for it: numpy reads those bytes as
object pointers, which is memory corruption and can be code execution. Allowlisting numpy the
way `torch.serialization.add_safe_globals` is usually shown to do it opens exactly that hole.

So the default allowlist maps numpy's pickle names to the stand-ins here instead:

``numpy.dtype``                                  `DtypeRecipe`: the dtype is rebuilt with numpy's
                                                 public constructors from the pickled parts
                                                 (kind, byte order, fields, sub-array, datetime
                                                 unit), so numpy computes every flag itself
``numpy[._]core.multiarray._reconstruct``        `ArrayRecipe`: shape, dtype and data checked
                                                 against each other before numpy fills the array
``numpy[._]core.multiarray.scalar``              `scalar`: a dtype from a recipe and exactly
                                                 ``itemsize`` bytes
``numpy.ndarray``                                `NDArrayType`: a marker only ``_reconstruct``
                                                 accepts; it can not build anything itself

`ArrayRecipe` and `DtypeRecipe` are what the unpickler holds while it runs (a BUILD fills an
object in place, so a checked rebuild needs an object of its own); `resolve` then replaces each
by the real `numpy.ndarray` / `numpy.dtype` it built. `ckptmap.formats.load_file` does this
after every load; code that hands these entries to `torch.load` itself must call `resolve` on
the result. numpy is imported on first use, not with this module.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator
from typing import Any

from ckptmap.errors import RefusedPickleError

__all__ = [
    "ArrayRecipe",
    "DtypeRecipe",
    "NDArrayType",
    "Refused",
    "recipes_made",
    "resolve",
    "scalar",
]

# Dtype kinds a checkpoint may hold: bool, ints, floats, complex, timedelta, datetime, object,
# bytes, str, void (structured). Not numpy 2's StringDType ('T') or user dtypes.
_KINDS = frozenset("biufcmMOSUV")
_DATETIME_UNITS = frozenset(
    {"Y", "M", "W", "D", "h", "m", "s", "ms", "us", "ns", "ps", "fs", "as", "generic"}
)
_MAX_NDIM = 64
_MAX_SPEC = 64
# Containers nested deeper than this in a loaded checkpoint are refused by `resolve` rather
# than risk a RecursionError half-way.
_MAX_DEPTH = 400

# Set while `recipes_made` collects: whether any recipe was made, so that `resolve` can skip the
# walk for checkpoints without numpy values (nearly all of them).
_made: contextvars.ContextVar[list[bool] | None] = contextvars.ContextVar(
    "ckptmap_numpy_recipes", default=None
)


#: What the stand-ins raise (a `pickle.UnpicklingError`).
Refused = RefusedPickleError


def _np() -> Any:
    import numpy

    return numpy


def _note_made() -> None:
    made = _made.get()
    if made is not None and not made:
        made.append(True)


@contextlib.contextmanager
def recipes_made() -> Iterator[list[bool]]:
    """Collects, for the loads inside the block, whether any recipe was made (a non-empty list)."""
    made: list[bool] = []
    token = _made.set(made)
    try:
        yield made
    finally:
        _made.reset(token)


class NDArrayType:
    """Stands in for the class ``numpy.ndarray`` in a pickle.

    Only `ArrayRecipe` accepts it; creating an instance of it (what a pickle would do to make an
    uninitialised array) is refused. `resolve` turns the class object itself into `numpy.ndarray`.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> NDArrayType:
        raise Refused("to create a numpy.ndarray directly (numpy pickles use _reconstruct)")


class DtypeRecipe:
    """A `numpy.dtype` as a pickle describes it: ``numpy.dtype(spec, align, copy)``, then its state.

    The state is never passed to numpy's ``__setstate__`` (which trusts its flags); the dtype is
    rebuilt from its parts with numpy's public constructors.
    """

    _spec: str
    _value: Any

    def __init__(self, spec: Any, align: Any = False, copy: Any = False) -> None:
        if not isinstance(spec, str) or not 0 < len(spec) <= _MAX_SPEC:
            raise Refused(f"numpy.dtype({spec!r:.80}): numpy pickles name a dtype by a short str")
        if not isinstance(align, bool) or not isinstance(copy, bool):
            raise Refused(f"numpy.dtype({spec!r}, {align!r:.40}, {copy!r:.40})")
        self._spec = spec
        self._value = None
        self._state: Any = None
        _note_made()

    def __setstate__(self, state: Any) -> None:
        if "_spec" not in self.__dict__:
            raise Refused("to fill a numpy.dtype that was created without its spec")
        if self._value is not None or self._state is not None:
            raise Refused("to fill one numpy.dtype twice")
        self._state = state
        self._value = _dtype_from(self._spec, state)

    def value(self) -> Any:
        """The checked `numpy.dtype`."""
        if "_spec" not in self.__dict__:
            raise Refused("to use a numpy.dtype that was created without its spec")
        if self._value is None:
            self._value = _dtype_from(self._spec, None)
        return self._value

    def __repr__(self) -> str:
        return f"DtypeRecipe({self.__dict__.get('_spec')!r})"


class ArrayRecipe:
    """A `numpy.ndarray` as a pickle describes it: ``_reconstruct(ndarray, ...)``, then its state.

    The state (version, shape, dtype, Fortran order, data) is checked: the dtype comes from a
    `DtypeRecipe`, the data is exactly ``prod(shape) * itemsize`` bytes, or a list of that many
    elements for an object dtype. Then numpy fills a new array from it.
    """

    _value: Any

    def __init__(self, subtype: Any, shape: Any = (0,), dtype: Any = b"b") -> None:
        if subtype is not NDArrayType:
            raise Refused(f"_reconstruct({subtype!r:.80}, ...): numpy pickles rebuild ndarray only")
        if not (isinstance(shape, tuple) and all(_is_size(n) for n in shape)):
            raise Refused(f"_reconstruct(ndarray, {shape!r:.80}, ...): not a shape")
        self._value = None
        _note_made()

    def __setstate__(self, state: Any) -> None:
        if "_value" not in self.__dict__:
            raise Refused("to fill a numpy.ndarray that _reconstruct did not create")
        if self._value is not None:
            raise Refused("to fill one numpy.ndarray twice")
        self._value = _array_from(state)

    def value(self) -> Any:
        """The checked `numpy.ndarray`."""
        if self.__dict__.get("_value") is None:
            raise Refused("to use a numpy.ndarray that was never filled")
        return self._value

    def __repr__(self) -> str:
        return "ArrayRecipe(...)"


def scalar(dtype: Any, data: Any = None) -> Any:
    """``numpy.core.multiarray.scalar``, checked: a numpy scalar from exactly its bytes."""
    np = _np()
    dt = _as_dtype(dtype, "scalar")
    if dt.hasobject:
        if dt.kind != "O":
            raise Refused(f"a numpy scalar of {dt} (a structured dtype holding objects)")
        # numpy pickles an object scalar as the object itself.
        return _value_of(data)
    if not isinstance(data, bytes) or len(data) != dt.itemsize:
        raise Refused(
            f"a numpy {dt} scalar from {type(data).__name__} of length "
            f"{len(data) if isinstance(data, (bytes, str)) else '?'} (it takes {dt.itemsize} bytes)"
        )
    return _multiarray(np).scalar(dt, data)


def _multiarray(np: Any) -> Any:
    core = getattr(np, "_core", None) or np.core
    return core.multiarray


def _is_size(n: Any) -> bool:
    return type(n) is int and n >= 0


def _as_dtype(obj: Any, where: str) -> Any:
    if isinstance(obj, DtypeRecipe):
        return obj.value()
    raise Refused(f"a {where} whose dtype is a {type(obj).__name__}, not a numpy.dtype")


def _value_of(obj: Any) -> Any:
    if isinstance(obj, (ArrayRecipe, DtypeRecipe)):
        return obj.value()
    if obj is NDArrayType:
        return _np().ndarray
    return obj


def _dtype_from(spec: str, state: Any) -> Any:
    np = _np()
    try:
        base = np.dtype(spec)
    except (TypeError, ValueError):
        raise Refused(f"numpy.dtype({spec!r}): not a dtype numpy knows") from None
    if base.kind not in _KINDS or base.fields is not None:
        raise Refused(f"numpy.dtype({spec!r}): a {base.kind!r} dtype is not data numpy pickles")
    if state is None:
        return base
    if not isinstance(state, tuple) or len(state) not in (8, 9) or state[0] not in (3, 4):
        raise Refused(f"numpy.dtype({spec!r}) with state {state!r:.120}")
    endian, subdescr, names, fields, elsize, _alignment, flags = state[1:8]
    if endian not in ("<", ">", "|", "=") or type(elsize) is not int or type(flags) is not int:
        raise Refused(f"numpy.dtype({spec!r}) with state {state!r:.120}")
    try:
        if names is not None or fields is not None:
            dt = _structured(spec, base, names, fields, elsize, flags)
        elif subdescr is not None:
            dt = _subarray(spec, subdescr, elsize)
        else:
            dt = _plain(spec, base, elsize, state[8] if len(state) == 9 else None)
    except (TypeError, ValueError, OverflowError) as err:
        raise Refused(f"numpy.dtype({spec!r}) with state {state!r:.120} ({err})") from None
    if endian in "<>" and dt.byteorder != "|" and dt.fields is None:
        dt = dt.newbyteorder(endian)
    return dt


def _plain(spec: str, base: Any, elsize: int, metadata: Any) -> Any:
    np = _np()
    if base.kind in "mM":
        if not (isinstance(metadata, tuple) and len(metadata) == 2):
            raise ValueError("a datetime dtype without its unit")
        info = metadata[1]
        if not (isinstance(info, tuple) and len(info) == 4):
            raise ValueError("a datetime dtype without its unit")
        unit, count = info[0], info[1]
        unit = unit.decode("ascii") if isinstance(unit, bytes) else unit
        if unit not in _DATETIME_UNITS or type(count) is not int or not 0 < count < 2**31:
            raise ValueError(f"datetime unit {info!r:.60}")
        if unit == "generic":
            return np.dtype(base.char)
        return np.dtype(f"{base.char}8[{count if count != 1 else ''}{unit}]")
    if elsize not in (-1, base.itemsize):
        if base.kind in "SUV" and base.itemsize == 0 and elsize > 0:
            return np.dtype(f"{base.kind}{elsize // (4 if base.kind == 'U' else 1)}")
        raise ValueError(f"an item size of {elsize} for {base}")
    return base


def _structured(spec: str, base: Any, names: Any, fields: Any, elsize: int, flags: int) -> Any:
    np = _np()
    if base.kind != "V":
        raise ValueError("fields on a dtype that is not structured")
    if not (isinstance(names, tuple) and isinstance(fields, dict)):
        raise ValueError("fields that are not a tuple of names and a dict")
    if not all(isinstance(n, str) for n in names) or len(set(names)) != len(names):
        raise ValueError("field names that are not distinct strs")
    formats, offsets, titles = [], [], []
    for name in names:
        entry = fields.get(name)
        if not (isinstance(entry, tuple) and len(entry) in (2, 3)):
            raise ValueError(f"field {name!r} is {entry!r:.60}")
        fdtype = _as_dtype(entry[0], f"field {name!r}")
        offset = entry[1]
        title = entry[2] if len(entry) == 3 else None
        if not _is_size(offset) or not (title is None or isinstance(title, str)):
            raise ValueError(f"field {name!r} is {entry!r:.60}")
        formats.append(fdtype)
        offsets.append(offset)
        titles.append(title)
    # Extra keys of the fields dict are titles, pointing at a named field.
    expected = set(names) | {t for t in titles if t is not None}
    if set(fields) != expected:
        raise ValueError("fields that do not match the names and titles")
    if not _is_size(elsize):
        raise ValueError(f"an item size of {elsize}")
    layout: dict[str, Any] = {
        "names": list(names),
        "formats": formats,
        "offsets": offsets,
        "itemsize": elsize,
    }
    if any(t is not None for t in titles):
        layout["titles"] = titles
    # numpy's constructor checks that fields fit the item size and that object fields do not
    # overlap anything, and computes the flags itself.
    return np.dtype(layout, align=bool(flags & 0x80))


def _subarray(spec: str, subdescr: Any, elsize: int) -> Any:
    np = _np()
    if not (isinstance(subdescr, tuple) and len(subdescr) == 2):
        raise ValueError(f"a sub-array of {subdescr!r:.60}")
    sub, shape = subdescr
    if not (isinstance(shape, tuple) and len(shape) <= _MAX_NDIM and all(map(_is_size, shape))):
        raise ValueError(f"a sub-array shape of {shape!r:.60}")
    dt = np.dtype((_as_dtype(sub, "sub-array"), shape))
    if elsize != dt.itemsize:
        raise ValueError(f"an item size of {elsize} for {dt}")
    return dt


def _array_from(state: Any) -> Any:
    np = _np()
    if isinstance(state, tuple) and len(state) == 4:
        state = (1, *state)
    if not (isinstance(state, tuple) and len(state) == 5 and state[0] == 1):
        raise Refused(f"a numpy.ndarray with state {state!r:.120}")
    _version, shape, dtype, fortran, data = state
    if not (isinstance(shape, tuple) and len(shape) <= _MAX_NDIM and all(map(_is_size, shape))):
        raise Refused(f"a numpy.ndarray of shape {shape!r:.80}")
    if type(fortran) not in (bool, int) or fortran not in (0, 1):
        raise Refused(f"a numpy.ndarray with order flag {fortran!r:.40}")
    dt = _as_dtype(dtype, "numpy.ndarray")
    count = math.prod(shape)
    if dt.hasobject:
        if type(data) is not list or len(data) != count:
            raise Refused(f"a numpy {dt} array of {count} items from {type(data).__name__} data")
        if dt.kind == "O":
            data = [_value_of(x) for x in data]
        else:  # records of a structured dtype: tuples of field values
            data = [tuple(map(_value_of, x)) if type(x) is tuple else x for x in data]
    elif not isinstance(data, (bytes, bytearray)) or len(data) != count * dt.itemsize:
        size = len(data) if isinstance(data, (bytes, bytearray)) else type(data).__name__
        raise Refused(
            f"a numpy {dt} array of shape {shape} ({count * dt.itemsize} bytes) from {size} bytes"
        )
    array = np.empty(0, dtype=np.uint8)
    try:
        array.__setstate__((1, shape, dt, bool(fortran), data))
    except (TypeError, ValueError) as err:
        raise Refused(f"a numpy {dt} array of shape {shape}: {err}") from None
    return array


# --- after the load -------------------------------------------------------------------------


def resolve(obj: Any) -> Any:
    """`obj` with every recipe replaced by the numpy value it built, in place where it can be.

    Walks dicts (keys and values), lists, tuples, sets, object arrays and the ``__dict__`` of
    other objects; shared and cyclic references stay shared. Tuples and frozensets holding a
    recipe are rebuilt.

    Raises:
        Refused: a recipe that was never completed, or containers nested deeper than 400.
    """
    return _Resolver().run(obj)


class _Resolver:
    def __init__(self) -> None:
        np = _np()
        import torch

        self.np = np
        self.atoms: tuple[type, ...] = (
            str,
            bytes,
            bytearray,
            int,
            float,
            complex,
            type(None),
            torch.Tensor,
            torch.dtype,
            torch.device,
            np.generic,
            np.dtype,
        )
        self.done: dict[int, Any] = {}

    def run(self, obj: Any) -> Any:
        return self.visit(obj, 0)

    def visit(self, obj: Any, depth: int) -> Any:
        if isinstance(obj, self.atoms):
            return obj
        if isinstance(obj, (ArrayRecipe, DtypeRecipe)):
            value = obj.value()
            if value.dtype.hasobject if isinstance(value, self.np.ndarray) else False:
                self.visit_object_array(value, depth)
            return value
        if obj is NDArrayType:
            return self.np.ndarray
        key = id(obj)
        if key in self.done:
            return self.done[key]
        if depth > _MAX_DEPTH:
            raise Refused(f"containers nested more than {_MAX_DEPTH} deep")
        depth += 1
        self.done[key] = obj
        if isinstance(obj, dict):
            self.visit_dict(obj, depth)
        elif isinstance(obj, list):
            for i, item in enumerate(obj):
                new = self.visit(item, depth)
                if new is not item:
                    obj[i] = new
        elif isinstance(obj, tuple):
            items = [self.visit(item, depth) for item in obj]
            if any(a is not b for a, b in zip(items, obj, strict=True)):
                obj = type(obj)(items) if type(obj) is tuple else type(obj)(*items)
                self.done[key] = obj
        elif isinstance(obj, (set, frozenset)):
            items = [self.visit(item, depth) for item in obj]
            if any(a is not b for a, b in zip(items, obj, strict=True)):
                if isinstance(obj, set):
                    obj.clear()
                    obj.update(items)
                else:
                    obj = type(obj)(items)
                    self.done[key] = obj
        elif isinstance(obj, self.np.ndarray):
            if obj.dtype.hasobject:
                self.visit_object_array(obj, depth)
            return obj
        if not isinstance(obj, type):
            attrs = getattr(obj, "__dict__", None)
            if type(attrs) is dict:
                for name, value in list(attrs.items()):
                    new = self.visit(value, depth)
                    if new is not value:
                        attrs[name] = new
        return obj

    def visit_dict(self, obj: dict[Any, Any], depth: int) -> None:
        rekey = False
        for k, value in obj.items():
            if isinstance(k, (ArrayRecipe, DtypeRecipe)) or k is NDArrayType:
                rekey = True
            new = self.visit(value, depth)
            if new is not value:
                obj[k] = new  # an existing key: the dict's size and order do not change
        if rekey:
            items = [(self.visit(k, depth), v) for k, v in obj.items()]
            obj.clear()
            for k, v in items:
                obj[k] = v

    def visit_object_array(self, array: Any, depth: int) -> None:
        if array.dtype.kind != "O":
            return  # structured arrays with object fields: elements are records
        flat = array.reshape(-1) if array.flags.c_contiguous else None
        if flat is None:
            return
        for i in range(flat.shape[0]):
            item = flat[i]
            new = self.visit(item, depth + 1)
            if new is not item:
                flat[i] = new
