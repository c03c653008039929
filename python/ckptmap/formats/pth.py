"""torch zip checkpoints (``torch.save`` since 1.6) read by ckptmap's Rust core.

`read_pth(path)` opens a checkpoint without reading tensor data: the zip archive, every
storage record and every tensor's sizes, strides and offset are validated (a damaged file
raises `InvalidTorchZipError`), and `PthFile.table` lists the tensors (dotted names, dtypes,
shapes, strides, storage offsets and keys, byte ranges in the file) straight from
``data.pkl``. `PthFile.load` then returns what ``torch.load(path, weights_only=True,
mmap=True)`` returns, much faster: tensors are views of a private mapping of the file (one
storage per record, so tensors share storage exactly as torch's do), or of one in-memory
copy with ``mmap=False``.

Safe by construction: the reader's pickle machine knows the opcodes and globals that
``torch.save`` writes (containers, scalars, str, bytes, tensors, Parameters, dtypes,
``torch.Size``, ``torch.device``, ...) and can call nothing else. Other globals resolve
through the allowlist (``allowed_globals``, plus ``torch.serialization.add_safe_globals``),
whose objects are called exactly as torch's ``weights_only`` unpickler calls them. Whatever
the machine does not implement — a global outside the allowlist, quantized or sparse
tensors, tensor subclasses, a legacy file — is loaded by torch's own safe loader instead
(never an unsafe one), and ``fallback_reason`` says why.

When `map_location` names one device that a copy engine streams to (a CUDA device), tensors
are read straight from the file through ckptmap's staging ring of pinned buffers
(`ckptmap.streaming`) into new tensors there, instead of being built on the CPU and moved
storage by storage: the rows asked for (`load(names)`), or a whole checkpoint that is a plain
state dict. Only tensors whose bytes are the tensor can: contiguous, of a dtype this torch
has, each the only user of its storage among the rows asked for; otherwise (tensors sharing
a storage, which must keep sharing it, non-contiguous ones, Parameters with attributes, a
file not in this machine's byte order) the call loads the usual way, and a debug log says
why. Streamed tensors have storages of their own.

Differences from torch that remain: tensors come without the empty ``_backward_hooks``
dict that torch attaches to every loaded tensor (setting it costs more than building the
tensor); pickles of protocol 3 to 5, which torch's ``weights_only`` unpickler refuses, load.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import gc
import logging
import os
import sys
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from ckptmap import streaming
from ckptmap._core import PthFallback, PthFormatError, PthReader
from ckptmap.errors import (
    CheckpointIsADirectoryError,
    CheckpointNotFoundError,
    CheckpointPermissionError,
    InvalidTorchZipError,
    MapLocationError,
    NoStateDictError,
    _TypeName,
)
from ckptmap.formats.map_location import checked_map_location
from ckptmap.formats.pickled import _ZIP_FALLBACK, _load_torch_zip, built_safely
from ckptmap.formats.safetensors import dtype_named

__all__ = [
    "FALLBACK",
    "InvalidTorchZipError",
    "PthFile",
    "PthTable",
    "PthTensorInfo",
    "load_fast",
    "read_pth",
    "state_dict_shapes",
    "tensor_table",
]

logger = logging.getLogger("ckptmap")

#: What `load_fast` returns when torch's own loader must load the file.
FALLBACK: Any = _ZIP_FALLBACK


class PthTensorInfo(NamedTuple):
    """One tensor of the table (see `PthTable`)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    storage_offset: int
    storage_key: str
    start: int
    end: int
    nbytes: int
    requires_grad: bool
    parameter: bool


@dataclass(frozen=True)
class PthTable:
    """The tensors of a checkpoint, one column per attribute, from ``data.pkl`` alone.

    Rows are the tensors reachable through dicts, lists and tuples, in the order a walk of
    the loaded checkpoint meets them, named by dotted paths (``"state_dict.fc.weight"``,
    ``"optimizer.state.0.exp_avg"``; ``"<top level>"`` for a lone tensor). A tensor reachable
    twice is listed twice.

    Attributes:
        names: dotted paths.
        dtypes: torch dtype names (``"bfloat16"``).
        shapes, strides: tuples of ints.
        storage_offsets: in elements, within the storage record.
        storage_keys: the record of each tensor (``"0"`` is ``<archive>/data/0``).
        byte_ranges: ``(start, end)`` absolute file offsets of the bytes the elements span.
        nbytes: numel x itemsize.
        requires_grad: as loaded.
        parameters: whether each row is an ``nn.Parameter``.
    """

    names: list[str]
    dtypes: list[str]
    shapes: list[tuple[int, ...]]
    strides: list[tuple[int, ...]]
    storage_offsets: list[int]
    storage_keys: list[str]
    byte_ranges: list[tuple[int, int]]
    nbytes: list[int]
    requires_grad: list[bool]
    parameters: list[bool]

    def __len__(self) -> int:
        return len(self.names)

    def infos(self) -> list[PthTensorInfo]:
        """The rows as records (the columns are cheaper for very many tensors)."""
        return [
            PthTensorInfo(n, d, s, st, o, k, r[0], r[1], b, g, p)
            for n, d, s, st, o, k, r, b, g, p in zip(
                self.names,
                self.dtypes,
                self.shapes,
                self.strides,
                self.storage_offsets,
                self.storage_keys,
                self.byte_ranges,
                self.nbytes,
                self.requires_grad,
                self.parameters,
                strict=True,
            )
        ]


class PthFile:
    """A torch zip checkpoint opened by the Rust reader: validated, tensor data unread.

    Args:
        path: the checkpoint.
        allowed_globals: objects the pickle may use besides torch's own allowlist, as for
            `ckptmap.formats.load_file` (``(object, "module.name")`` pairs allowed).

    Raises:
        InvalidTorchZipError: the archive, a storage record or a tensor fails validation.
        CheckpointNotFoundError / CheckpointPermissionError / CheckpointIsADirectoryError:
            the path can not be read.
    """

    def __init__(self, path: str | os.PathLike[str], *, allowed_globals: Iterable[Any] = ()):
        from ckptmap.formats import allowlist

        given = (
            allowed_globals if isinstance(allowed_globals, str | bytes) else tuple(allowed_globals)
        )
        self._init(os.fspath(path), given, allowlist.with_default(given))

    @classmethod
    def _with_allowlist(
        cls, path: str, given: tuple[Any, ...], allowed: tuple[Any, ...]
    ) -> PthFile:
        """A `PthFile` whose allowlist (`given` with the default) was checked already."""
        f = cls.__new__(cls)
        f._init(path, given, allowed)
        return f

    def _init(
        self,
        path: str,
        given: tuple[Any, ...],
        allowed: tuple[Any, ...],
        known: list[tuple[int, int]] | None = None,
    ) -> None:
        # `known`: the byte ranges fetched so far of a remote file (`ckptmap.remote.pth`).
        self.path = path
        self._given = given
        self._allowed = _Allowlist.of(allowed)
        self._reader, self._unread = _open(self.path, self._allowed.names, known)
        self._load_fallback: str | None = None
        self._identity = _identity_of(self.path, self._reader)

    @property
    def fallback_reason(self) -> str | None:
        """Why torch's loader loads this file, or loaded it the last time (None: the Rust
        reader does)."""
        if self._reader is None:
            return self._unread
        return self._reader.fallback_reason or self._load_fallback

    @property
    def byteorder(self) -> str | None:
        """``"little"`` or ``"big"`` (None: no ``byteorder`` record, read as little)."""
        return self._ready().byteorder

    @property
    def version(self) -> int:
        """The archive format version."""
        return self._ready().version

    @property
    def pickle_protocol(self) -> int:
        """The protocol of ``data.pkl``."""
        return self._ready().protocol

    def _ready(self) -> Any:
        if self._reader is None:
            raise PthFallback(f"{self.path}: only torch can read this checkpoint ({self._unread})")
        return self._reader

    @functools.cached_property
    def table(self) -> PthTable:
        """The tensors, read from ``data.pkl`` alone (see `PthTable`).

        Raises:
            ckptmap._core.PthFallback: the reader can not list them (see `fallback_reason`,
                or a structure too deep or too shared to list).
        """
        r = self._ready()
        return PthTable(
            r.names,
            r.dtypes,
            r.shapes,
            r.strides,
            r.storage_offsets,
            r.storage_keys,
            r.byte_ranges,
            r.nbytes,
            r.requires_grad,
            r.parameters,
        )

    def load(
        self,
        names: Iterable[str] | None = None,
        map_location: Any = None,
        mmap: bool = True,
    ) -> Any:
        """What ``torch.load(path, map_location, weights_only=True, mmap=mmap)`` returns.

        With `names`, only those table rows are built: an ``OrderedDict`` of name to tensor,
        in the order given. Where the reader can not build the checkpoint, torch's safe
        loader does (``fallback_reason`` then says why).

        Args:
            names: table names to build (default: the whole checkpoint).
            map_location: as for `torch.load` (None, a device or str, a dict, a callable).
                One device that the copy engine streams to (CUDA): tensors are read through
                the staging ring where they can be (see the module docstring).
            mmap: map the file (tensors are views of its pages, read on use); False reads
                it into memory once, tensors being views of that copy.

        Raises:
            ckptmap.errors.TensorNotFoundError: a name not in the table.
        """
        wanted = None if names is None else list(names)
        return built_safely(self.path, self._given, lambda: self._load(wanted, map_location, mmap))

    def _load(self, wanted: list[str] | None, map_location: Any, mmap: bool) -> Any:
        result = self._try_load(wanted, map_location, mmap)
        if result is not FALLBACK:
            return result
        from ckptmap.formats.sniff import sniff

        loaded = _load_torch_zip(
            sniff(self.path), map_location, True, self._allowed.given, mmap=mmap
        )
        return loaded if wanted is None else _picked(self, loaded, wanted)

    def read_plan(self, names: Iterable[str], target: torch.device) -> list[streaming.ReadItem]:
        """The rows of `ckptmap.streaming.read_tensors` that read table rows `names` into new
        tensors on `target`: byte ranges from the table, checked against this very file (a
        file replaced or shortened since it was opened raises `CorruptCheckpointError` there).

        Only rows whose bytes are the tensor, as it is stored, can be read this way (see
        `stream_reason`); tensors come out contiguous, each with a storage of its own.

        Raises:
            ckptmap.errors.TensorNotFoundError: a name not in the table.
            ValueError: a row that can not be read as plain bytes (the message says why).
            ckptmap._core.PthFallback: the reader can not list the tensors.
        """
        rows = self._rows_of(names)
        reason = self._rows_reason(rows)
        if reason is not None:
            raise ValueError(f"{self.path!r}: {reason}")
        return self._plan(rows, target)

    def stream_reason(self, names: Iterable[str] | None = None) -> str | None:
        """Why table rows `names` (default: every row) can not be streamed to a device as
        plain bytes, or None when they can: a dtype this torch lacks, strides that are not
        the contiguous ones, two of the rows sharing a storage record (torch.load keeps them
        sharing it), or a file whose bytes are not in this machine's byte order."""
        reason = self._file_reason()
        if reason is not None:
            return reason
        rows = range(len(self.table)) if names is None else self._rows_of(names)
        return self._rows_reason(rows)

    def state_dict_shapes(
        self,
    ) -> OrderedDict[str, tuple[tuple[int, ...] | None, str | None]] | None:
        """The state dict's names, shapes and dtypes, found as `find_state_dict` finds it.

        Returns:
            name -> (shape, dtype), both None for entries that are not tensors; None when
            only loading the checkpoint can tell (a fallback, or objects made by calls).

        Raises:
            NoStateDictError: the checkpoint, or its ``state_dict`` / ``model`` entry, is not
                a mapping.
        """
        path = self.state_dict_path()
        if path is None:
            return None
        items = self._reader.mapping_items(path) or []
        return OrderedDict(
            (key, (shape, dtype) if shape is not None else (None, None))
            for key, shape, dtype, _type in items
        )

    def state_dict_path(self) -> list[str] | None:
        """Where the state dict sits, as `find_state_dict` finds it: ``[]`` (the whole
        checkpoint), ``["state_dict"]`` or ``["model"]``; None when only loading the
        checkpoint can tell (a fallback, or objects made by calls).

        Raises:
            NoStateDictError: the checkpoint, or its ``state_dict`` / ``model`` entry, is not
                a mapping.
        """
        if self._reader is None or self._reader.fallback_reason is not None:
            return None
        r = self._reader
        root = r.value_type([])
        if root is None:
            return None
        if root not in _MAPPINGS:
            raise NoStateDictError(self.path, _TypeName(root), "top-level object")
        keys = {item[0] for item in r.mapping_items([]) or ()}
        path: list[str] = []
        if "state_dict" in keys:
            found = r.value_type(["state_dict"])
            if found is None:
                return None
            if found not in _MAPPINGS:
                raise NoStateDictError(self.path, _TypeName(found), "'state_dict' entry")
            path = ["state_dict"]
        elif "model" in keys:
            found = r.value_type(["model"])
            if found is None:
                return None
            if found in _MAPPINGS:
                path = ["model"]
            elif found not in _TENSORS:
                raise NoStateDictError(self.path, _TypeName(found), "'model' entry")
        return path

    def state_dict_items(self, path: list[str]) -> list[tuple[Any, Any, Any, Any]]:
        """``(key, shape, dtype, type name)`` of the dict at `path` (see `state_dict_path`)."""
        return self._ready().mapping_items(path) or []

    def attrs_of(self, path: list[str]) -> dict[str, Any]:
        """The attributes ``data.pkl`` sets on the OrderedDict at `path` (``_metadata``), built
        without any tensor.

        Raises:
            ckptmap._core.PthFallback: only torch can build them.
        """
        hooks = self._allowed.hooks(None)
        return built_safely(
            self.path, self._given, lambda: self._ready().load(hooks, path=path, attrs=True)
        )

    def meta_value(self, path: list[str]) -> Any:
        """The value at `path` with every tensor an empty ``meta`` tensor of its shape and
        dtype (other values built as a load builds them; no tensor data read).

        Raises:
            ckptmap._core.PthFallback: only torch can build it.
        """
        hooks = self._allowed.hooks(None)

        def build() -> Any:
            with _gc_paused():
                return self._ready().load(hooks, path=path, meta=True)

        return built_safely(self.path, self._given, build)

    def _try_load(self, names: list[str] | None, map_location: Any, mmap: bool) -> Any:
        self._load_fallback = None
        if self._reader is None:
            self._log_fallback(self._unread or "")
            return FALLBACK
        map_location = checked_map_location(map_location, self.path)
        reason = self._reader.fallback_reason or _torch_state_reason(map_location, mmap)
        if reason is None and self._reader.byteorder is None:
            reason = _default_endianness_reason()
        restore: Any = None
        if reason is None:
            restore = _restore_for(map_location, self._reader.locations)
            if restore is FALLBACK:
                reason = f"map_location {map_location!r}"
        if reason is not None:
            self._log_fallback(reason)
            return FALLBACK
        streamed = self._streamed(names, map_location)
        if streamed is not None:
            return streamed
        rows = None if names is None else self._rows_of(names)
        hooks = self._allowed.hooks(restore)
        try:
            try:
                loaded = _build(self._reader, hooks, mmap, rows)
            except OSError as err:
                if not mmap or isinstance(err, FileNotFoundError | PermissionError):
                    raise
                logger.warning(
                    "%s can not be memory-mapped (%s): reading it into memory", self.path, err
                )
                loaded = _build(self._reader, hooks, False, rows)
        except PthFormatError as err:
            raise InvalidTorchZipError(
                self.path, self._reader.file_size, err.kind, err.detail
            ) from None
        except (OSError, MapLocationError):
            raise
        except PthFallback as err:
            self._log_fallback(str(err))
            return FALLBACK
        except Exception as err:  # an allowlisted callable failed: torch reports it its way
            self._log_fallback(f"{type(err).__name__}: {err}")
            return FALLBACK
        if names is None:
            return loaded
        return OrderedDict(zip(names, loaded, strict=True))

    # -- streaming to a device (ckptmap.streaming) ---------------------------------------------

    def _file_reason(self) -> str | None:
        if self._reader is None:
            return f"only torch can read this checkpoint ({self._unread})"
        if self._reader.fallback_reason is not None:
            return f"only torch can read this checkpoint ({self._reader.fallback_reason})"
        if self._reader.byteorder == "big" or sys.byteorder != "little":
            return "the file's byte order is not this machine's"
        if self._reader.table_error is not None:
            return f"no tensor table ({self._reader.table_error})"
        return None

    @functools.cached_property
    def _row_index(self) -> dict[str, int]:
        """Each table name's row (the last, for a name listed twice); built once per file."""
        return {name: i for i, name in enumerate(self.table.names)}

    def _rows_of(self, names: Iterable[str]) -> list[int]:
        index = self._row_index
        return [index[n] if n in index else _missing(self, n) for n in names]

    def _rows_reason(self, rows: Iterable[int]) -> str | None:
        """Why `rows` can not be read as plain bytes into tensors of their own (None: they can)."""
        t = self.table
        users: dict[str, str] = {}
        for i in rows:
            name = t.names[i]
            if dtype_named(t.dtypes[i]) is None:
                return f"{name!r} is of dtype {t.dtypes[i]}, which this torch lacks"
            if not _contiguous(t.shapes[i], t.strides[i]):
                return f"{name!r} is not contiguous (strides {t.strides[i]})"
            start, end = t.byte_ranges[i]
            if end - start != t.nbytes[i]:
                return f"{name!r} spans {end - start} bytes for {t.nbytes[i]} of data"
            key = t.storage_keys[i]
            if key in users:
                return f"{name!r} shares its storage with {users[key]!r}"
            users[key] = name
        return None

    def _plan(self, rows: list[int], target: torch.device) -> list[streaming.ReadItem]:
        t = self.table
        # The reader's own file: a remote checkpoint's is the local copy of its fetched bytes.
        source = streaming.SourceFile(self._ready().path, self._identity)
        items = []
        for i in rows:
            start, end = t.byte_ranges[i]
            dtype = dtype_named(t.dtypes[i])
            assert dtype is not None  # checked by _rows_reason
            items.append(streaming.ReadItem(source, start, end, dtype, t.shapes[i], target))
        return items

    def _stream_device(self, map_location: Any) -> torch.device | None:
        """The one device every storage goes to under `map_location` (None: not one)."""
        device = streaming.named_device(map_location)
        if device is None:
            return None
        if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
            return None  # torch.load's own message says which device is missing
        if not isinstance(map_location, dict):
            return device
        for location in self._reader.locations:
            try:
                if torch.device(map_location.get(location, location)) != device:
                    return None
            except (RuntimeError, TypeError, ValueError):
                return None
        return device

    def _streamed(self, names: list[str] | None, map_location: Any) -> Any:
        """The tensors `names` (None: the whole checkpoint, when it is a plain state dict)
        read through the staging ring onto the device `map_location` names; None where the
        load goes the usual way (logged at debug level, with why)."""
        device = self._stream_device(map_location)
        engine = streaming.engine_for(device)
        if engine is None or device is None:
            return None
        reason = self._file_reason()
        root: Any = None
        rows: list[int] = []
        if reason is None and names is None:
            root, reason = self._plain_root()
            rows = list(range(len(self.table)))
        elif reason is None and names is not None:
            rows = self._rows_of(names)
        reason = reason or self._rows_reason(rows) or self._params_reason(rows)
        if reason is not None:
            self._log_unstreamed(device, reason)
            return None
        t = self.table
        items = self._plan(rows, device)
        for k, i in enumerate(rows):
            shape, stride = t.shapes[i], t.strides[i]
            if tuple(stride) != _contiguous_strides(shape):
                # Contiguous with other strides on dimensions of size 1 (or empty): kept.
                empty = torch.empty_strided(shape, stride, dtype=items[k].dtype, device=device)
                items[k] = items[k]._replace(target=empty)
        tensors = streaming.read_tensors(items, engine=engine)
        built: list[torch.Tensor] = []
        for i, tensor in zip(rows, tensors, strict=True):
            if t.parameters[i]:
                built.append(torch.nn.Parameter(tensor, requires_grad=t.requires_grad[i]))
            else:
                built.append(tensor.requires_grad_(True) if t.requires_grad[i] else tensor)
        if root is None:
            assert names is not None
            return OrderedDict(zip(names, built, strict=True))
        root.update(zip(t.names, built, strict=True))
        return root

    def _plain_root(self) -> tuple[Any, str | None]:
        """An empty container of the checkpoint's type, attributes set, when the checkpoint
        is a plain state dict (a dict of str to tensors, each row its own record), else None
        and why."""
        r = self._reader
        kind = r.value_type([])
        if kind not in _MAPPINGS:
            return None, "the checkpoint is not a plain state dict"
        items = r.mapping_items([]) or []
        names = self.table.names
        if not items or len(items) != len(names):
            return None, "the checkpoint is not a plain state dict of tensors"
        for (key, shape, _dtype, _type), name in zip(items, names, strict=True):
            if shape is None or not isinstance(key, str) or key != name:
                return None, f"the checkpoint's entry {key!r} is not a tensor"
        if len(names) != r.record_count:  # storages shared, or used by other objects
            return None, self._rows_reason(range(len(names))) or "storages used elsewhere"
        try:
            attrs = self.attrs_of([])
        except PthFallback as err:
            return None, str(err)
        if any(True for _ in _walk_tensors(attrs, "")):
            return None, "the state dict's attributes hold tensors"
        if kind == "dict":
            return ({}, None) if not attrs else (None, "a dict with attributes")
        root: OrderedDict[str, Any] = OrderedDict()
        root.__dict__.update(attrs)
        return root, None

    def _params_reason(self, rows: list[int]) -> str | None:
        """Why the Parameters among `rows` can not be rebuilt from their data alone: a
        Parameter with attributes of its own (``_rebuild_parameter_with_state``)."""
        params = [i for i in rows if self.table.parameters[i]]
        if not params:
            return None
        try:
            with _gc_paused():
                built = self._ready().load(self._allowed.hooks(None), rows=params, meta=True)
        except PthFallback as err:
            return str(err)
        for i, param in zip(params, built, strict=True):
            if type(param) is not torch.nn.Parameter or torch._utils._get_obj_state(param):
                return f"the Parameter {self.table.names[i]!r} has attributes of its own"
        return None

    def _log_unstreamed(self, device: torch.device, reason: str) -> None:
        logger.debug(
            "%s: not streamed to %s through the staging ring, loaded the usual way (%s)",
            self.path,
            device,
            reason,
        )

    def _log_fallback(self, reason: str) -> None:
        if self._reader is not None and self._reader.fallback_reason is None:
            self._load_fallback = reason
        logger.info(
            "%s: loaded by torch's safe unpickler instead of ckptmap's reader (%s)",
            self.path,
            reason,
        )

    def __len__(self) -> int:
        return 0 if self._reader is None else len(self._reader)

    def __repr__(self) -> str:
        return f"PthFile({self.path!r}, tensors={len(self)}, fallback={self.fallback_reason!r})"


def read_pth(path: str | os.PathLike[str], *, allowed_globals: Iterable[Any] = ()) -> PthFile:
    """Opens `path` with the Rust reader (see `PthFile`)."""
    return PthFile(path, allowed_globals=allowed_globals)


def tensor_table(
    path: str | os.PathLike[str], *, allowed_globals: Iterable[Any] = ()
) -> PthTable | None:
    """The tensor table of the checkpoint at `path`, or None where only torch can read it."""
    f = PthFile(path, allowed_globals=allowed_globals)
    if f._reader is None or f.fallback_reason is not None or f._reader.table_error is not None:
        return None
    return f.table


def state_dict_shapes(
    path: str | os.PathLike[str], *, allowed_globals: Iterable[Any] = ()
) -> OrderedDict[str, tuple[tuple[int, ...] | None, str | None]] | None:
    """`PthFile.state_dict_shapes` of the checkpoint at `path`."""
    return PthFile(path, allowed_globals=allowed_globals).state_dict_shapes()


def load_fast(sniffed: Any, map_location: Any, allowed: Sequence[Any], *, mmap: bool) -> Any:
    """`ckptmap.formats.pickled.load_pickle`'s Rust path for a torch zip checkpoint.

    Returns:
        The loaded checkpoint, or `FALLBACK` when torch's loader must load it (logged).

    Raises:
        InvalidTorchZipError: the file fails validation.
    """
    given = tuple(allowed)
    f = PthFile._with_allowlist(sniffed.path, given, given)
    return f._try_load(None, map_location, mmap)


# -- internals ----------------------------------------------------------------------------------

_MAPPINGS = frozenset({"dict", "collections.OrderedDict"})
_TENSORS = frozenset({"torch.Tensor", "torch.nn.parameter.Parameter"})


# Faults of the archive that torch's own reader handles under ckptmap's checks
# (`ckptmap.formats.torch_zip_check`: compressed members inflate under a cap).
_TORCH_READS = frozenset({"compressed_member"})


def _open(
    path: str, names: list[str], known: list[tuple[int, int]] | None = None
) -> tuple[Any, str | None]:
    """The reader of `path`, or None and why torch's reader must read it.

    Raises:
        ckptmap._core.PthUnfetched: (`known` given) bytes to fetch before opening again.
    """
    try:
        return PthReader.open(path, names, known), None
    except PthFormatError as err:
        if err.kind in _TORCH_READS:
            return None, f"{err.kind.replace('_', ' ')}: {err.detail}"
        size = os.stat(path).st_size if os.path.exists(path) else 0
        raise InvalidTorchZipError(path, size, err.kind, err.detail) from None
    except IsADirectoryError as err:
        raise CheckpointIsADirectoryError(path) from err
    except FileNotFoundError as err:
        raise CheckpointNotFoundError(path) from err
    except PermissionError as err:
        raise CheckpointPermissionError(path) from err


def _identity_of(path: str, reader: Any) -> tuple[int, int, int] | None:
    """``(st_dev, st_ino, size)`` of the file the reader opened, for the ring to check."""
    if reader is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    # The reader's size, not the path's now: a file changed since then fails the check.
    return (st.st_dev, st.st_ino, reader.file_size)


def _contiguous_strides(shape: Sequence[int]) -> tuple[int, ...]:
    strides = []
    step = 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


def _contiguous(shape: Sequence[int], stride: Sequence[int]) -> bool:
    """Whether elements in row-major order are consecutive in memory (`Tensor.is_contiguous`:
    strides of dimensions of size 1, and of empty tensors, do not matter)."""
    if any(size == 0 for size in shape):
        return True
    expected = 1
    for size, step in zip(reversed(shape), reversed(stride), strict=True):
        if size != 1:
            if step != expected:
                return False
            expected *= size
    return True


def _missing(f: PthFile, name: str) -> Any:
    from ckptmap.errors import TensorNotFoundError

    raise TensorNotFoundError(
        f.path,
        name,
        f"{f.path!r} has no tensor named {name!r}: check the name (its table lists them)",
    )


def _picked(f: PthFile, loaded: Any, wanted: list[str]) -> OrderedDict[str, torch.Tensor]:
    """The tensors `wanted` (table names) of a checkpoint loaded whole."""
    found = dict(_walk_tensors(loaded, ""))
    return OrderedDict((n, found[n] if n in found else _missing(f, n)) for n in wanted)


def _walk_tensors(obj: Any, prefix: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Tensors in dicts, lists and tuples, named as `PthTable` names them."""
    if isinstance(obj, torch.Tensor):
        yield prefix or "<top level>", obj
    elif isinstance(obj, Mapping):
        for key, value in obj.items():
            yield from _walk_tensors(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(obj, list | tuple):
        for i, value in enumerate(obj):
            yield from _walk_tensors(value, f"{prefix}.{i}" if prefix else str(i))


def _build(reader: Any, hooks: _Hooks, mmap: bool, rows: list[int] | None) -> Any:
    """`PthReader.load`, with the cyclic garbage collector paused."""
    with _gc_paused():
        return reader.load(hooks, mmap=mmap, rows=rows)


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    # Building 100k containers and tensors triggers the cyclic collector over and over, each
    # time walking the whole heap (a fifth of the load time); nothing built here is garbage.
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _torch_state_reason(map_location: Any, mmap: bool) -> str | None:
    """Why torch's global loading state asks for torch's own loader, if it does."""
    ser = torch.serialization
    tls = getattr(ser, "_serialization_tls", None)
    if tls is not None and getattr(tls, "skip_data", False):
        return "torch.serialization.skip_data is active"
    guards = getattr(torch, "_guards", None)
    if guards is not None and guards.detect_fake_mode(None) is not None:
        return "a fake tensor mode is active"
    if mmap:
        import mmap as _mmap

        options = (
            ser.get_default_mmap_options() if hasattr(ser, "get_default_mmap_options") else None
        )
        if options is not None and options != _mmap.MAP_PRIVATE:
            return "torch's default mmap options are not MAP_PRIVATE"
    is_meta = getattr(ser, "_is_meta_location", None)
    if is_meta is not None and is_meta(map_location):
        return "map_location is the meta device"
    return None


def _default_endianness_reason() -> str | None:
    ser = torch.serialization
    getter = getattr(ser, "get_default_load_endianness", None)
    if getter is None:
        return None
    endianness = getter()
    if endianness is None or endianness == ser.LoadEndianness.LITTLE:
        return None
    return f"no byteorder record and torch's default load endianness is {endianness}"


def _restore_for(map_location: Any, locations: list[str]) -> Any:
    """torch.load's restore_location for `map_location`; None where every storage stays on
    the CPU as it is."""
    if map_location is None:
        targets: list[Any] = list(locations)
    elif isinstance(map_location, str):
        targets = [map_location] * len(locations)
    elif isinstance(map_location, torch.device):
        targets = [str(map_location)] * len(locations)
    elif isinstance(map_location, dict):
        targets = [map_location.get(loc, loc) for loc in locations]
    elif isinstance(map_location, bytes) or callable(map_location):
        targets = [None]
    else:
        return FALLBACK
    if all(t == "cpu" and type(t) is str for t in targets):
        return None
    getter = getattr(torch.serialization, "_get_restore_location", None)
    return getter(map_location) if getter is not None else _restore_location(map_location)


def _restore_location(map_location: Any) -> Callable[[Any, str], Any]:
    # torch.serialization._get_restore_location, for a torch that renamed it.
    default = torch.serialization.default_restore_location
    if isinstance(map_location, dict):
        return lambda storage, location: default(storage, map_location.get(location, location))
    if isinstance(map_location, (str, bytes)):
        return lambda storage, location: default(storage, map_location)
    if isinstance(map_location, torch.device):
        return lambda storage, location: default(storage, str(map_location))

    def restore(storage: Any, location: str) -> Any:
        result = map_location(storage, location)
        return default(storage, location) if result is None else result

    return restore


class _Allowlist:
    """The allowlist as the reader needs it: names for parsing, objects for building."""

    def __init__(self, given: tuple[Any, ...], names: list[str], objects: list[Any]) -> None:
        self.given = given
        self.names = names
        self.objects = objects
        own = _torch_allowed_globals()
        # torch's BUILD applies to instances of any allowed global.
        self.build_types = [*own.values(), *objects]

    @classmethod
    def of(cls, given: tuple[Any, ...]) -> _Allowlist:
        own = _torch_allowed_globals()
        entries: dict[str, Any] = {}
        for entry in (*torch.serialization.get_safe_globals(), *given):
            if isinstance(entry, tuple):
                if len(entry) != 2 or not isinstance(entry[1], str):
                    raise TypeError(
                        "allowlist entries are objects or (object, 'module.name') pairs, "
                        f"not {entry!r}"
                    )
                obj, name = entry
            else:
                obj, name = entry, f"{entry.__module__}.{entry.__qualname__}"
            if name not in own:  # torch's own entries win, as in torch's unpickler
                entries[name] = obj
        return cls(given, list(entries), list(entries.values()))

    def hooks(self, restore: Any) -> _Hooks:
        return _Hooks(self, restore)

    def build(self, inst: Any, state: Any) -> None:
        """torch's ``weights_only`` BUILD for objects made by allowlisted callables."""
        if type(inst) is torch.Tensor or type(inst) is torch.nn.Parameter:
            raise PthFallback("BUILD of a tensor made by an allowlisted callable")
        if type(inst) is OrderedDict:
            inst.__dict__.update(state)
            return
        if type(inst) not in self.build_types:
            raise PthFallback(f"BUILD of a {type(inst).__qualname__}, which is not allowlisted")
        if hasattr(inst, "__setstate__"):
            inst.__setstate__(state)
            return
        slotstate = None
        if isinstance(state, tuple) and len(state) == 2:
            state, slotstate = state
        if state:
            inst.__dict__.update(state)
        if slotstate:
            for k, v in slotstate.items():
                setattr(inst, k, v)

    @staticmethod
    def newobj(cls: Any, args: tuple[Any, ...]) -> Any:
        """torch's ``weights_only`` NEWOBJ for allowlisted classes."""
        if torch._C._is_pybind11_type(cls):
            raise PthFallback(f"NEWOBJ of the pybind11 class {cls!r}")
        return cls.__new__(cls, *args)


class _Hooks:
    """What `PthReader.load` calls (see its docstring in ``rust/py/pth.rs``)."""

    def __init__(self, allowlist: _Allowlist, restore: Any) -> None:
        static = _static_hooks()
        self.from_dlpack = static.from_dlpack
        self.empty = torch.empty
        self.parameter = torch.nn.Parameter
        self.set_obj_state = torch._utils._set_obj_state
        self.ordered_dict = OrderedDict
        self.int_from_bytes = _int_from_bytes
        self.callables = static.callables
        self.dtypes = static.dtypes
        self.build = allowlist.build
        self.newobj = allowlist.newobj
        self.allowed = allowlist.objects
        self.restore = restore


class _StaticHooks(NamedTuple):
    from_dlpack: Any
    callables: list[Any]
    dtypes: list[Any]


@functools.cache
def _static_hooks() -> _StaticHooks:
    import _codecs

    known = {
        ("collections", "Counter"): collections.Counter,
        ("builtins", "set"): set,
        ("builtins", "complex"): complex,
        ("builtins", "bytearray"): bytearray,
        ("_codecs", "encode"): _codecs.encode,
        ("torch", "Size"): torch.Size,
        ("torch", "device"): torch.device,
    }
    callables = [known[name] for name in PthReader.callable_names()]
    dtypes = [dtype_named(name) for name in PthReader.dtype_names()]
    return _StaticHooks(torch._C._from_dlpack, callables, dtypes)


def _int_from_bytes(data: bytes) -> int:
    return int.from_bytes(data, "little", signed=True)


@functools.cache
def _torch_allowed_globals() -> dict[str, Any]:
    from torch import _weights_only_unpickler

    return dict(_weights_only_unpickler._get_allowed_globals())
