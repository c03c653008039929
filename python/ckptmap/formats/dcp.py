"""torch.distributed.checkpoint (DCP) directories: planned from ``.metadata``, read by range.

`torch.distributed.checkpoint.save` (``dcp.save(state_dict, checkpoint_id=directory)``) writes::

    directory/.metadata        a pickle of DCP's `Metadata`: every entry's dtype, shape, chunks
                               and where each chunk's bytes are (file, offset, length)
    directory/__0_0.distcp     rank 0's data; each chunk is one `torch.save` archive at its
    directory/__1_0.distcp     byte range, one after another (rank 1's data, ...)

`DcpCheckpoint(directory)` reads and checks ``.metadata`` and nothing else: names, dtypes,
shapes, chunks and byte ranges (`infos()`, the plan) need no tensor data. ``ckpt[name]`` then
reads exactly the byte ranges of that tensor's chunks (with ``pread``; torch's zip reader sees
only that window of the file) and, for a tensor that several ranks saved in pieces (a sharded
``DTensor``: FSDP, tensor parallelism), copies the pieces into one tensor of the full shape. A
load of 10% of the tensors reads about 10% of the bytes.

Safety. ``.metadata`` is a pickle, and torch's own reader (`FileSystemReader.read_metadata`)
unpickles it with plain `pickle.load`, which runs whatever code the file names. torch's
``weights_only`` unpickler can not read it either (it rejects the FRAME opcode of the pickle
protocol DCP writes). ckptmap reads it with its own restricted unpickler: `pickle.Unpickler`
whose `find_class` resolves exactly DCP's metadata dataclasses, ``torch.Size``, torch dtypes
and layouts, and path classes (``StorageMeta.checkpoint_id``, read as a plain string), plus
what the caller passes as ``allowed_globals``. The globals are listed from the opcodes first
(nothing executed) and any other one is refused before unpickling starts
(`UnsafeDcpPickleError`, an `UnsafeCheckpointError`). Each chunk's archive is loaded with
``torch.load(weights_only=True)``. Then every offset is checked before it is trusted: file
names are plain relative names inside the directory, byte ranges lie inside their files and
do not overlap, each chunk stores at least the bytes its dtype and shape need, the chunks of a
tensor lie inside its shape and cover it exactly once, and each archive holds a tensor of the
chunk's dtype and shape. Errors are `InvalidDcpCheckpointError` (naming the directory and what
is wrong), `UnsafeDcpPathError`, `ShardNotFoundError` (data files missing),
`UnsupportedDcpFeatureError` (e.g. compressed entries), `TensorNotFoundError`.

Non-tensor entries (DCP's ``BytesStorageMetadata``: an int step, a learning rate, a dataloader
state, pickled by `torch.save`) are not part of the tensor mapping; they are listed in
`DcpCheckpoint.objects` and loaded on request by `load_object`, through torch's
``weights_only`` unpickler with the caller's ``allowed_globals`` — never unrestricted.

Nesting. DCP flattens nested state dicts (``{"model": {...}, "optim": {...}}``) into dotted
names and records each one's original path. `load_dcp` (what `ckptmap.formats.load_file`
returns for a DCP directory) rebuilds that nesting as torch's own ``dcp_to_torch_save`` does
(string keys make dicts, integer keys lists), lazily: a `DcpTree` mapping whose tensors are
read the first time they are accessed, so ``checkpoint["model"]`` or a prefix filter reads
only the tensors it uses.

Not supported: DCP's safetensors serialization (`HuggingFaceStorageWriter`, which writes a
``*.index.json`` that `ckptmap.formats.sharded` reads), stream transforms (compression
extensions), and per-rank ``__<rank>.metadata`` files without a global ``.metadata``.
"""

from __future__ import annotations

import io
import os
import pathlib
import pickle
import reprlib
import stat
import zipfile
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, NamedTuple

import torch

from ckptmap._core import filter_prefix_keys
from ckptmap.errors import (
    CheckpointIsADirectoryError,
    CheckpointNotFoundError,
    CheckpointPermissionError,
    InvalidDcpCheckpointError,
    MissingDependencyError,
    ShardNotFoundError,
    TensorNotFoundError,
    UnsafeDcpPathError,
    UnsafeDcpPickleError,
    UnsafePathError,
    UnsupportedDcpFeatureError,
)
from ckptmap.formats.safetensors import map_location_fn
from ckptmap.formats.sniff import DCP_METADATA
from ckptmap.paths import check_path, check_relative_name, reject_special

__all__ = [
    "MAX_METADATA_BYTES",
    "METADATA_NAME",
    "DcpCheckpoint",
    "DcpChunk",
    "DcpObjectInfo",
    "DcpTensorInfo",
    "DcpTree",
    "is_dcp_directory",
    "load_dcp",
    "open_dcp",
    "read_metadata",
]

#: The file that makes a directory a DCP checkpoint.
METADATA_NAME = DCP_METADATA
#: A ``.metadata`` larger than this is refused before it is read (real ones are a few MB).
MAX_METADATA_BYTES = 256 * 1024 * 1024
# A list index in a nested path beyond this is refused (it would allocate a list that long).
_MAX_LIST_INDEX = 1 << 20


class DcpChunk(NamedTuple):
    """One stored piece of a tensor: where it sits in the tensor and in the files.

    Attributes:
        offsets: the index of its first element in the full tensor, per dimension.
        sizes: its shape.
        file: the data file, relative to the checkpoint directory (``"__1_0.distcp"``).
        start: the file offset of its archive's first byte.
        end: the file offset after its archive's last byte.
    """

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    file: str
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        """The bytes a load of this chunk reads (its archive's length)."""
        return self.end - self.start


class DcpTensorInfo(NamedTuple):
    """What ``.metadata`` says about one tensor: enough to plan a load without its data.

    Attributes:
        name: the flattened name (``"model.fc.weight"``).
        dtype: the torch-style dtype name (``"bfloat16"``).
        shape: the full tensor's shape.
        chunks: its stored pieces, in ``.metadata`` order (one for an unsharded tensor).
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    chunks: tuple[DcpChunk, ...]

    @property
    def torch_dtype(self) -> torch.dtype:
        """The `torch.dtype`."""
        dtype = getattr(torch, self.dtype)
        assert isinstance(dtype, torch.dtype)
        return dtype

    @property
    def nbytes(self) -> int:
        """The tensor's size in bytes (its dtype's size times its element count)."""
        return _numel(self.shape) * self.torch_dtype.itemsize

    @property
    def stored_bytes(self) -> int:
        """The bytes a load of this tensor reads: its chunks' archives."""
        return sum(chunk.nbytes for chunk in self.chunks)


class DcpObjectInfo(NamedTuple):
    """A non-tensor entry (a pickled object) and where its bytes are.

    Attributes:
        name: the flattened name (``"train_state.step"``).
        file: the data file, relative to the checkpoint directory.
        start: the file offset of its archive's first byte.
        end: the file offset after its archive's last byte.
    """

    name: str
    file: str
    start: int
    end: int


# --- reading .metadata safely -----------------------------------------------------------------


def _dcp_modules() -> tuple[Any, Any]:
    try:
        from torch.distributed.checkpoint import filesystem, metadata
    except ImportError as err:  # pragma: no cover - torch builds without torch.distributed
        raise MissingDependencyError(
            "reading a torch.distributed.checkpoint directory needs torch.distributed, which "
            f"this torch build ({torch.__version__}) lacks: install a torch build with "
            "distributed support",
            name="torch.distributed.checkpoint",
        ) from err
    return metadata, filesystem


def _pure_path(*parts: str) -> str:
    return str(pathlib.PurePosixPath(*parts))


def _pure_windows_path(*parts: str) -> str:
    return str(pathlib.PureWindowsPath(*parts))


def _metadata_globals() -> dict[str, Any]:
    """``module.name`` -> object: everything a DCP ``.metadata`` pickle may reference."""
    md, fs = _dcp_modules()
    allowed: dict[str, Any] = {
        f"{md.__name__}.{cls.__name__}": cls
        for cls in (
            md.Metadata,
            md.TensorStorageMetadata,
            md.BytesStorageMetadata,
            md.ChunkStorageMetadata,
            md.TensorProperties,
            md.MetadataIndex,
            md.StorageMeta,
            md._MEM_FORMAT_ENCODING,
        )
    }
    allowed[f"{fs.__name__}._StorageInfo"] = fs._StorageInfo
    allowed["torch.Size"] = torch.Size
    allowed["torch.serialization._get_layout"] = torch.serialization._get_layout
    allowed["collections.OrderedDict"] = OrderedDict
    # StorageMeta.checkpoint_id: a path, informational. Read as a string, never as a Path
    # (no file system access, and a WindowsPath can be read on Linux).
    for module in ("pathlib", "pathlib._local"):
        for name in ("PosixPath", "PurePosixPath", "Path"):
            allowed[f"{module}.{name}"] = _pure_path
        for name in ("WindowsPath", "PureWindowsPath"):
            allowed[f"{module}.{name}"] = _pure_windows_path
    return allowed


def _is_dtype(name: str) -> bool:
    return name.startswith("torch.") and isinstance(
        getattr(torch, name.removeprefix("torch."), None), torch.dtype
    )


def _extra_allowed(allowed_globals: Iterable[Any]) -> dict[str, Any]:
    """The caller's ``allowed_globals`` by the ``module.name`` a pickle would use."""
    out: dict[str, Any] = {}
    for entry in allowed_globals:
        if isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[1], str):
            out[entry[1]] = entry[0]
        else:
            module = getattr(entry, "__module__", None)
            name = getattr(entry, "__qualname__", None)
            if module and name:
                out[f"{module}.{name}"] = entry
    return out


class _MetadataUnpickler(pickle.Unpickler):
    """A pickle reader that resolves only the allowlisted globals (Python's own recipe)."""

    def __init__(self, file: IO[bytes], allowed: Mapping[str, Any]) -> None:
        super().__init__(file)
        self._allowed = allowed

    def find_class(self, module: str, name: str) -> Any:
        full = f"{module}.{name}"
        if full in self._allowed:
            return self._allowed[full]
        if module == "torch" and _is_dtype(full):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"global {full!r} is not allowed in DCP metadata")

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids are not allowed in DCP metadata")


def read_metadata(path: str | os.PathLike[str], *, allowed_globals: Iterable[Any] = ()) -> Any:
    """Reads a DCP directory's ``.metadata`` without running code from it.

    Args:
        path: the checkpoint directory (or its ``.metadata`` file).
        allowed_globals: objects the pickle may reference besides DCP's metadata classes.

    Returns:
        torch's `torch.distributed.checkpoint.metadata.Metadata`, unvalidated (`DcpCheckpoint`
        checks it).

    Raises:
        UnsafeDcpPickleError: the pickle references a global outside the allowlist (nothing
            was unpickled); an `UnsafeCheckpointError`.
        InvalidDcpCheckpointError: too large, truncated or not a pickle of DCP metadata.
    """
    from ckptmap.formats import allowlist
    from ckptmap.formats.pickled import dangerous_globals, pickle_globals

    allowed_globals = allowlist.checked(allowed_globals)  # nothing that runs code, ever
    directory, metadata_path = _locate(path)

    try:
        with open(metadata_path, "rb") as f:
            data = f.read(MAX_METADATA_BYTES + 1)
    except PermissionError as err:
        raise CheckpointPermissionError(metadata_path) from err
    if len(data) > MAX_METADATA_BYTES:
        raise InvalidDcpCheckpointError(
            directory, f"its {METADATA_NAME} is larger than {MAX_METADATA_BYTES:,} bytes"
        )
    allowed = {**_metadata_globals(), **_extra_allowed(allowed_globals)}
    try:
        found = pickle_globals(io.BytesIO(data))
    except ValueError as err:
        raise InvalidDcpCheckpointError(
            directory, f"its {METADATA_NAME} is not a complete pickle ({err})"
        ) from None
    refused = sorted(g for g in found if g not in allowed and not _is_dtype(g))
    if refused:
        raise UnsafeDcpPickleError(directory, METADATA_NAME, refused, dangerous_globals(refused))
    try:
        return _MetadataUnpickler(io.BytesIO(data), allowed).load()
    except pickle.UnpicklingError as err:
        if "is not allowed" in str(err):
            raise UnsafeDcpPickleError(directory, METADATA_NAME, [], reason=str(err)) from None
        raise InvalidDcpCheckpointError(
            directory, f"its {METADATA_NAME} can not be unpickled ({err})"
        ) from None
    except (EOFError, ValueError, TypeError, AttributeError, KeyError, IndexError) as err:
        raise InvalidDcpCheckpointError(
            directory, f"its {METADATA_NAME} can not be unpickled ({type(err).__name__}: {err})"
        ) from None
    except RecursionError:
        raise InvalidDcpCheckpointError(
            directory, f"its {METADATA_NAME} is nested too deeply"
        ) from None


def is_dcp_directory(path: str | os.PathLike[str]) -> bool:
    """Whether `path` is a directory holding a DCP ``.metadata`` file."""
    return os.path.isfile(os.path.join(os.fspath(path), METADATA_NAME))


def _locate(path: str | os.PathLike[str]) -> tuple[str, str]:
    """(directory, .metadata path) for a DCP directory or its ``.metadata``."""
    path = check_path(path)
    if os.path.isdir(path):
        directory = path
    elif os.path.basename(path) == METADATA_NAME:
        directory = os.path.dirname(os.path.abspath(path))
    else:
        raise InvalidDcpCheckpointError(
            path, f"it is a file, not a DCP checkpoint directory (one with a {METADATA_NAME})"
        )
    metadata_path = os.path.join(directory, METADATA_NAME)
    if not os.path.isfile(metadata_path):
        if os.path.exists(metadata_path):
            raise InvalidDcpCheckpointError(directory, f"its {METADATA_NAME} is not a file")
        raise CheckpointIsADirectoryError(directory)
    return directory, metadata_path


# --- validating the metadata into a plan --------------------------------------------------------


def _numel(shape: Iterable[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _int_tuple(value: Any) -> tuple[int, ...] | None:
    if not isinstance(value, (tuple, list)):
        return None
    if not all(type(v) is int and v >= 0 for v in value):
        return None
    return tuple(value)


@dataclass(frozen=True)
class _Plan:
    tensors: dict[str, DcpTensorInfo]
    objects: dict[str, DcpObjectInfo]
    paths: dict[str, tuple[str | int, ...]]
    files: dict[str, str]
    version: str | None


class _Checker:
    """Turns unpickled DCP metadata into a validated `_Plan`, or raises naming the problem."""

    def __init__(self, directory: str, metadata_path: str) -> None:
        self.directory = directory
        self.metadata_path = metadata_path
        self.root = Path(directory).resolve()

    def bad(self, reason: str) -> InvalidDcpCheckpointError:
        return InvalidDcpCheckpointError(self.directory, reason)

    def plan(self, meta: Any) -> _Plan:
        md, fs = _dcp_modules()
        if not isinstance(meta, md.Metadata):
            raise self.bad(f"its {METADATA_NAME} holds a {type(meta).__name__}, not DCP's Metadata")
        entries = getattr(meta, "state_dict_metadata", None)
        if not isinstance(entries, dict):
            raise self.bad("its metadata has no state_dict_metadata mapping")
        storage = self.storage(getattr(meta, "storage_data", None), fs)
        version = getattr(meta, "version", None)
        tensors: dict[str, DcpTensorInfo] = {}
        objects: dict[str, DcpObjectInfo] = {}
        for name, entry in entries.items():
            if not isinstance(name, str):
                raise self.bad(f"it has an entry named by a {type(name).__name__}: {_show(name)}")
            if isinstance(entry, md.TensorStorageMetadata):
                tensors[name] = self.tensor(name, entry, storage, md)
            elif isinstance(entry, md.BytesStorageMetadata):
                where = storage.get((name, None))
                if where is None:
                    raise self.bad(f"entry {name!r} has no storage record")
                file, start, end = where
                objects[name] = DcpObjectInfo(name, file, start, end)
            else:
                raise self.bad(f"entry {name!r} is a {type(entry).__name__}")
        paths = self.paths(getattr(meta, "planner_data", None), list(entries))
        used = {c.file for t in tensors.values() for c in t.chunks}
        used.update(o.file for o in objects.values())
        files = self.files(sorted(used))
        self.ranges(tensors, objects, files)
        return _Plan(tensors, objects, paths, files, version if isinstance(version, str) else None)

    def storage(self, data: Any, fs: Any) -> dict[tuple[str, Any], tuple[str, int, int]]:
        if not isinstance(data, dict):
            raise self.bad(
                "its metadata has no storage_data mapping (it was not written by DCP's "
                "FileSystemWriter)"
            )
        out: dict[tuple[str, Any], tuple[str, int, int]] = {}
        for index, info in data.items():
            fqn = getattr(index, "fqn", None)
            if not isinstance(fqn, str):
                raise self.bad(f"a storage record is keyed by {_show(index)}")
            offset = getattr(index, "offset", None)
            key = (fqn, None if offset is None else _int_tuple(offset))
            if offset is not None and key[1] is None:
                raise self.bad(f"the storage record of {fqn!r} has chunk offsets {_show(offset)}")
            if not isinstance(info, fs._StorageInfo):
                raise self.bad(
                    f"the storage record of {fqn!r} is a {type(info).__name__}, not the "
                    "file/offset/length record DCP's FileSystemWriter writes"
                )
            transforms = getattr(info, "transform_descriptors", None)
            if transforms:
                raise UnsupportedDcpFeatureError(
                    self.directory,
                    f"entry {fqn!r} is stored through the stream transforms "
                    f"{_show(transforms)} (e.g. compression)",
                )
            file = getattr(info, "relative_path", None)
            start = getattr(info, "offset", None)
            length = getattr(info, "length", None)
            if not isinstance(file, str):
                raise self.bad(f"the storage record of {fqn!r} names the file {_show(file)}")
            if type(start) is not int or type(length) is not int or start < 0 or length < 0:
                raise self.bad(
                    f"the storage record of {fqn!r} has the byte range offset={_show(start)}, "
                    f"length={_show(length)}"
                )
            if key in out:
                raise self.bad(f"{fqn!r} has two storage records for one chunk")
            out[key] = (file, start, start + length)
        return out

    def tensor(
        self,
        name: str,
        entry: Any,
        storage: Mapping[tuple[str, Any], tuple[str, int, int]],
        md: Any,
    ) -> DcpTensorInfo:
        properties = getattr(entry, "properties", None)
        dtype = getattr(properties, "dtype", None)
        if not isinstance(dtype, torch.dtype):
            raise self.bad(f"tensor {name!r} has the dtype {_show(dtype)}")
        shape = _int_tuple(getattr(entry, "size", None))
        if shape is None:
            raise self.bad(f"tensor {name!r} has the shape {_show(getattr(entry, 'size', None))}")
        raw_chunks = getattr(entry, "chunks", None)
        if not isinstance(raw_chunks, list) or not raw_chunks:
            raise self.bad(f"tensor {name!r} has no chunks")
        chunks = []
        for raw in raw_chunks:
            if not isinstance(raw, md.ChunkStorageMetadata):
                raise self.bad(f"a chunk of tensor {name!r} is a {type(raw).__name__}")
            offsets = _int_tuple(getattr(raw, "offsets", None))
            sizes = _int_tuple(getattr(raw, "sizes", None))
            if offsets is None or sizes is None or len(offsets) != len(shape):
                raise self.bad(
                    f"a chunk of tensor {name!r} (shape {list(shape)}) has offsets "
                    f"{_show(getattr(raw, 'offsets', None))} and sizes "
                    f"{_show(getattr(raw, 'sizes', None))}"
                )
            if len(sizes) != len(shape) or any(
                o + s > d for o, s, d in zip(offsets, sizes, shape, strict=True)
            ):
                raise self.bad(
                    f"a chunk of tensor {name!r} at offsets {list(offsets)} with sizes "
                    f"{list(sizes)} lies outside its shape {list(shape)}"
                )
            where = storage.get((name, offsets))
            if where is None:
                raise self.bad(
                    f"the chunk of tensor {name!r} at offsets {list(offsets)} has no storage record"
                )
            file, start, end = where
            need = _numel(sizes) * dtype.itemsize
            if end - start < need:
                raise self.bad(
                    f"the chunk of tensor {name!r} at offsets {list(offsets)} stores "
                    f"{end - start:,} bytes, fewer than the {need:,} its dtype "
                    f"({_dtype_name(dtype)}) and sizes {list(sizes)} need"
                )
            chunks.append(DcpChunk(offsets, sizes, file, start, end))
        self.cover(name, shape, chunks)
        return DcpTensorInfo(name, _dtype_name(dtype), shape, tuple(chunks))

    def cover(self, name: str, shape: tuple[int, ...], chunks: list[DcpChunk]) -> None:
        """Checks that the chunks tile the tensor: total size right and no two overlap."""
        total = sum(_numel(c.sizes) for c in chunks)
        if total != _numel(shape):
            raise self.bad(
                f"the chunks of tensor {name!r} hold {total:,} elements, but its shape "
                f"{list(shape)} has {_numel(shape):,}"
            )
        if len(chunks) < 2 or not shape:
            return
        boxes = [c for c in chunks if _numel(c.sizes)]
        # Sweep along the dimension whose offsets vary most: for the usual row or column
        # splits no two chunks share a span there, and the scan is linear.
        dim = max(range(len(shape)), key=lambda d: len({c.offsets[d] for c in boxes}))
        boxes.sort(key=lambda c: c.offsets[dim])
        active: list[DcpChunk] = []
        for box in boxes:
            low = box.offsets[dim]
            active = [a for a in active if a.offsets[dim] + a.sizes[dim] > low]
            for other in active:
                if all(
                    max(o1, o2) < min(o1 + s1, o2 + s2)
                    for o1, s1, o2, s2 in zip(
                        box.offsets, box.sizes, other.offsets, other.sizes, strict=True
                    )
                ):
                    raise self.bad(
                        f"two chunks of tensor {name!r} overlap (at offsets "
                        f"{list(other.offsets)} and {list(box.offsets)})"
                    )
            active.append(box)

    def paths(self, planner_data: Any, names: list[str]) -> dict[str, tuple[str | int, ...]]:
        """Each entry's original nested path (DCP's planner_data), checked for consistency."""
        if planner_data is None:
            return {name: (name,) for name in names}
        if not isinstance(planner_data, dict):
            raise self.bad(f"its planner_data is a {type(planner_data).__name__}, not a mapping")
        paths: dict[str, tuple[str | int, ...]] = {}
        for name in names:
            raw = planner_data.get(name, (name,))
            if not isinstance(raw, (tuple, list)) or not raw:
                raise self.bad(f"the nested path of {name!r} is {_show(raw)}")
            path = tuple(raw)
            if type(path[0]) is not str or not all(
                type(p) is str or (type(p) is int and 0 <= p < _MAX_LIST_INDEX) for p in path
            ):
                raise self.bad(f"the nested path of {name!r} is {_show(raw)}")
            paths[name] = path
        return paths

    def files(self, names: list[str]) -> dict[str, str]:
        out: dict[str, str] = {}
        missing: list[str] = []
        for name in names:
            try:
                parts = check_relative_name(name, what="DCP data file", root=self.directory)
            except UnsafePathError as err:
                raise UnsafeDcpPathError(self.directory, name, err.reason) from None
            joined = self.root.joinpath(*parts)
            resolved = joined.resolve()
            if not resolved.is_relative_to(self.root):
                raise UnsafeDcpPathError(
                    self.directory, name, f"it resolves to {str(resolved)!r}, outside the directory"
                )
            reject_special(joined, what="DCP data file", named_by=self.metadata_path)
            if not joined.is_file():
                missing.append(name)
            out[name] = str(joined)
        if missing:
            raise ShardNotFoundError(self.metadata_path, self.directory, missing)
        return out

    def ranges(
        self,
        tensors: Mapping[str, DcpTensorInfo],
        objects: Mapping[str, DcpObjectInfo],
        files: Mapping[str, str],
    ) -> None:
        """Checks that every byte range lies inside its file and no two overlap."""
        spans: dict[str, list[tuple[int, int, str]]] = {f: [] for f in files}
        for t in tensors.values():
            for c in t.chunks:
                spans[c.file].append((c.start, c.end, t.name))
        for o in objects.values():
            spans[o.file].append((o.start, o.end, o.name))
        for file, items in spans.items():
            size = os.stat(files[file]).st_size
            items.sort()
            previous: tuple[int, int, str] | None = None
            for start, end, name in items:
                if end > size:
                    raise self.bad(
                        f"entry {name!r} is stored at bytes {start:,}-{end:,} of {file!r}, "
                        f"which has only {size:,} bytes (a truncated or mismatched data file)"
                    )
                if previous is not None and start < previous[1]:
                    raise self.bad(
                        f"entries {previous[2]!r} and {name!r} overlap in {file!r} (bytes "
                        f"{previous[0]:,}-{previous[1]:,} and {start:,}-{end:,})"
                    )
                previous = (start, end, name)


_REPR = reprlib.Repr()
_REPR.maxlevel = 3
_REPR.maxstring = _REPR.maxother = 80


def _show(value: Any) -> str:
    """A short repr of an untrusted value for a message (bounded depth and length)."""
    try:
        return _REPR.repr(value)
    except Exception:  # a hostile object whose repr fails or recurses
        return f"<a {type(value).__name__}>"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# --- reading byte ranges --------------------------------------------------------------------


class _Window(io.RawIOBase):
    """A read-only, seekable view of bytes ``[start, end)`` of an open file (by ``pread``)."""

    def __init__(self, fd: int, start: int, end: int) -> None:
        super().__init__()
        self._fd = fd
        self._start = start
        self._length = end - start
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._length}[whence]
        if base + offset < 0:
            raise ValueError("negative seek position")
        self._pos = base + offset
        return self._pos

    def readinto(self, buffer: Any) -> int:
        n = min(len(buffer), self._length - self._pos)
        if n <= 0:
            return 0
        data = os.pread(self._fd, n, self._start + self._pos)
        got = len(data)
        memoryview(buffer).cast("B")[:got] = data
        self._pos += got
        return got


def _open_data(path: str) -> int:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError as err:
        raise CheckpointNotFoundError(path) from err
    except PermissionError as err:
        raise CheckpointPermissionError(path) from err
    if not stat.S_ISREG(os.fstat(fd).st_mode):  # pragma: no cover - checked when opened
        os.close(fd)
        raise CheckpointNotFoundError(path)
    return fd


class DcpCheckpoint(Mapping[str, torch.Tensor]):
    """A lazy mapping of names to tensors over a DCP checkpoint directory.

    Opening reads and validates ``.metadata`` only. Each ``ckpt[name]`` reads that tensor's
    chunks (exactly their byte ranges) and returns a new CPU tensor of the full shape, moved
    by `map_location` if one was given; nothing is cached. Iteration follows ``.metadata``
    order. Non-tensor entries are not in the mapping: see `objects` and `load_object`.

    Args:
        path: the checkpoint directory (or its ``.metadata`` file).
        map_location: as for `torch.load`.
        weights_only: must stay True for object entries (False is refused: DCP objects are
            loaded through the safe unpickler only).
        allowed_globals: objects the ``.metadata`` pickle and the object entries' pickles may
            reference besides the defaults (as for `ckptmap.formats.load_file`).

    Raises:
        CheckpointNotFoundError / CheckpointIsADirectoryError (no ``.metadata``) /
            CheckpointPermissionError: the directory can not be used.
        UnsafeDcpPickleError: ``.metadata`` references a global outside the allowlist.
        InvalidDcpCheckpointError: the metadata or data files fail validation.
        UnsafeDcpPathError: a data file name that could leave the directory.
        ShardNotFoundError: data files the metadata names that do not exist (all listed).
        UnsupportedDcpFeatureError: entries stored through stream transforms.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        map_location: Any = None,
        weights_only: bool = True,
        allowed_globals: Iterable[Any] = (),
    ) -> None:
        self.path, self.metadata_path = _locate(path)
        self._allowed = tuple(allowed_globals)
        self._weights_only = weights_only
        self._move = map_location_fn(map_location)
        metadata = read_metadata(self.path, allowed_globals=self._allowed)
        plan = _Checker(self.path, self.metadata_path).plan(metadata)
        self._tensors = plan.tensors
        self._objects = plan.objects
        #: Each entry's original nested path (``("model", "fc.weight")``), tensors and objects.
        self.paths: dict[str, tuple[str | int, ...]] = plan.paths
        #: The data files the metadata uses: relative name -> path.
        self.files: dict[str, str] = plan.files
        #: The metadata's version string (``"1.0.0"``), when it has one.
        self.version: str | None = plan.version
        self._names = list(self._tensors)
        self._closed = False

    # --- the plan: metadata only ---

    @property
    def names(self) -> list[str]:
        """Tensor names, in ``.metadata`` order."""
        return list(self._names)

    @property
    def dtypes(self) -> list[str]:
        """Torch-style dtype names, in ``.metadata`` order."""
        return [self._tensors[n].dtype for n in self._names]

    @property
    def shapes(self) -> list[tuple[int, ...]]:
        """Full shapes, in ``.metadata`` order."""
        return [self._tensors[n].shape for n in self._names]

    @property
    def sizes(self) -> list[int]:
        """Each tensor's size in bytes (dtype size x element count), in ``.metadata`` order."""
        return [self._tensors[n].nbytes for n in self._names]

    @property
    def objects(self) -> list[str]:
        """The non-tensor entries' names (load one with `load_object`)."""
        return list(self._objects)

    @property
    def nbytes(self) -> int:
        """The size of every tensor, in bytes."""
        return sum(self.sizes)

    def info(self, name: str) -> DcpTensorInfo:
        """What ``.metadata`` says about tensor `name`."""
        try:
            return self._tensors[name]
        except (KeyError, TypeError):
            raise self._not_found(name) from None

    def infos(self) -> list[DcpTensorInfo]:
        """Every tensor's `DcpTensorInfo`, in ``.metadata`` order: the plan."""
        return [self._tensors[n] for n in self._names]

    def object_info(self, name: str) -> DcpObjectInfo:
        """Where the non-tensor entry `name` is stored."""
        try:
            return self._objects[name]
        except (KeyError, TypeError):
            raise self._not_found(name) from None

    def byte_ranges(self, names: Iterable[str] | None = None) -> dict[str, list[tuple[int, int]]]:
        """The byte ranges a load of tensors `names` (default: all) reads, per data file."""
        chosen = self._names if names is None else names
        out: dict[str, list[tuple[int, int]]] = {}
        for name in chosen:
            for chunk in self.info(name).chunks:
                out.setdefault(chunk.file, []).append((chunk.start, chunk.end))
        return {file: sorted(spans) for file, spans in out.items()}

    # --- Mapping ---

    def __getitem__(self, name: str) -> torch.Tensor:
        info = self.info(name)
        tensor = self._read_tensor(info)
        return tensor if self._move is None else self._move(tensor)

    def __contains__(self, name: object) -> bool:
        return name in self._tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def keys(self) -> Any:
        return self._tensors.keys()

    def __repr__(self) -> str:
        return (
            f"DcpCheckpoint({self.path!r}, tensors={len(self)}, objects={len(self._objects)}, "
            f"files={len(self.files)})"
        )

    # --- loading ---

    def load(
        self, names: Iterable[str] | None = None, *, prefix: str | None = None
    ) -> OrderedDict[str, torch.Tensor]:
        """Reads the tensors `names` (default: all), optionally only those under `prefix`.

        Only the selected tensors' byte ranges are read.

        Args:
            names: the tensors to read, in the order wanted (default: ``.metadata`` order).
            prefix: keep only names under this module prefix (``"model"`` keeps
                ``"model.x"``, not ``"model2.x"``); names are not stripped.

        Raises:
            TensorNotFoundError: a name in `names` that the checkpoint does not have.
        """
        chosen = self._names if names is None else [self.info(n).name for n in names]
        if prefix is not None:
            kept, _ = filter_prefix_keys(chosen, prefix, False)
            chosen = [chosen[k] for k in kept]
        return OrderedDict((name, self[name]) for name in chosen)

    def load_object(self, name: str) -> Any:
        """Unpickles the non-tensor entry `name` with torch's ``weights_only`` unpickler.

        Raises:
            TensorNotFoundError: no such object entry.
            UnsafeDcpPickleError: it needs globals outside the allowlist (extend it with
                ``allowed_globals``); nothing was executed.
            InvalidDcpCheckpointError: its bytes are not a `torch.save` archive.
        """
        info = self.object_info(name)
        if not self._weights_only:
            raise UnsupportedDcpFeatureError(
                self.path,
                "weights_only=False was asked for, but object entries of DCP checkpoints are "
                "only ever loaded with the safe unpickler; pass allowed_globals=[...] with the "
                "classes they need instead",
            )
        from ckptmap.formats import allowlist
        from ckptmap.formats.pickled import allowing, dangerous_globals
        from ckptmap.formats.safe_numpy import recipes_made, resolve

        # The default allowlist too (numpy values, HistoryBuffers), as for every pickle load.
        allowed = allowlist.with_default(self._allowed)
        with self._window(info.file, info.start, info.end) as window:
            try:
                with allowing(allowed), recipes_made() as made:
                    loaded = torch.load(window, map_location="cpu", weights_only=True)
                return resolve(loaded) if made else loaded
            except pickle.UnpicklingError as err:
                window.seek(0)
                found = self._archive_globals(window, name, info.file)
                needed = sorted(found - set(_extra_allowed(allowed)))
                reason = str(err).split("\n")[0]
                raise UnsafeDcpPickleError(
                    self.path, name, needed, dangerous_globals(needed), reason
                ) from None
            except (RuntimeError, EOFError, ValueError) as err:
                raise self._damaged(name, info.file, err) from None

    def tree(self) -> DcpTree:
        """The checkpoint with its original nesting, read lazily (see `DcpTree`)."""
        return DcpTree._build(self)

    def close(self) -> None:
        """Marks this checkpoint closed (tensors already read stay valid)."""
        self._closed = True

    def __enter__(self) -> DcpCheckpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- internals ---

    def _not_found(self, name: object) -> TensorNotFoundError:
        kind = "an object entry" if isinstance(name, str) and name in self._objects else None
        detail = (
            f"{name!r} in DCP checkpoint {self.path!r} is {kind}, not a tensor: load it with "
            "load_object()"
            if kind
            else None
        )
        return TensorNotFoundError(self.path, str(name), detail)

    def _window(self, file: str, start: int, end: int) -> _OpenWindow:
        if self._closed:
            raise ValueError(f"{self.path!r}: this DcpCheckpoint is closed; open it again")
        return _OpenWindow(self.files[file], start, end)

    def _damaged(self, name: str, file: str, err: BaseException) -> InvalidDcpCheckpointError:
        first = str(err).split("\n")[0]
        return InvalidDcpCheckpointError(
            self.path,
            f"the bytes of entry {name!r} in {file!r} are not a torch.save archive "
            f"({type(err).__name__}: {first})",
        )

    def _archive_globals(self, window: IO[bytes], name: str, file: str) -> set[str]:
        from ckptmap.formats.pickled import pickle_globals

        try:
            with zipfile.ZipFile(window) as archive:
                pkl = next(n for n in archive.namelist() if n.endswith("/data.pkl"))
                with archive.open(pkl) as stream:
                    return pickle_globals(io.BytesIO(stream.read()))
        except (zipfile.BadZipFile, StopIteration, ValueError, OSError) as err:
            raise self._damaged(name, file, err) from None

    def _read_chunk(self, info: DcpTensorInfo, chunk: DcpChunk) -> torch.Tensor:
        with self._window(chunk.file, chunk.start, chunk.end) as window:
            try:
                value = torch.load(window, map_location="cpu", weights_only=True)
            except pickle.UnpicklingError as err:
                raise self._damaged(info.name, chunk.file, err) from None
            except (RuntimeError, EOFError, ValueError) as err:
                raise self._damaged(info.name, chunk.file, err) from None
        dtype = info.torch_dtype
        if not isinstance(value, torch.Tensor) or value.dtype != dtype:
            found = (
                f"a {_dtype_name(value.dtype)} tensor"
                if isinstance(value, torch.Tensor)
                else f"a {type(value).__name__}"
            )
            raise InvalidDcpCheckpointError(
                self.path,
                f"the chunk of tensor {info.name!r} at offsets {list(chunk.offsets)} in "
                f"{chunk.file!r} holds {found}, not the {info.dtype} tensor the metadata says",
            )
        if tuple(value.shape) != chunk.sizes:
            raise InvalidDcpCheckpointError(
                self.path,
                f"the chunk of tensor {info.name!r} at offsets {list(chunk.offsets)} in "
                f"{chunk.file!r} has shape {list(value.shape)}, not {list(chunk.sizes)}",
            )
        return value

    def _read_tensor(self, info: DcpTensorInfo) -> torch.Tensor:
        if len(info.chunks) == 1 and info.chunks[0].sizes == info.shape:
            return self._read_chunk(info, info.chunks[0])
        out = torch.empty(info.shape, dtype=info.torch_dtype)
        for chunk in info.chunks:
            piece = self._read_chunk(info, chunk)
            target = out
            for dim, (offset, size) in enumerate(zip(chunk.offsets, chunk.sizes, strict=True)):
                target = target.narrow(dim, offset, size)
            target.copy_(piece)
        return out


class _OpenWindow:
    """``with _OpenWindow(path, start, end) as f``: a `_Window` over an fd closed on exit."""

    def __init__(self, path: str, start: int, end: int) -> None:
        self._fd = _open_data(path)
        self._window = _Window(self._fd, start, end)

    def __enter__(self) -> _Window:
        return self._window

    def __exit__(self, *exc: object) -> None:
        os.close(self._fd)


# --- the nested view --------------------------------------------------------------------------


class _Leaf(NamedTuple):
    name: str
    is_tensor: bool


_Node = Any  # _Leaf | dict[str, _Node] | list[_Node | None]


class DcpTree(Mapping[str, Any]):
    """One level of a DCP checkpoint's original nesting, read lazily.

    Keys are the original keys at this level (``"model"``, ``"fc.weight"``); values are
    tensors (read from the files on first access, then kept), objects (`load_object`, on
    first access), nested `DcpTree`s, or lists (built in full when accessed). Nothing is read
    to answer ``in``, ``len`` or iteration.
    """

    def __init__(self, checkpoint: DcpCheckpoint, children: dict[str, _Node]) -> None:
        self._checkpoint = checkpoint
        self._children = children
        self._values: dict[str, Any] = {}

    @classmethod
    def _build(cls, checkpoint: DcpCheckpoint) -> DcpTree:
        root: dict[str, _Node] = {}
        for name, path in checkpoint.paths.items():
            _insert(checkpoint, root, path, _Leaf(name, name in checkpoint))
        return cls(checkpoint, root)

    @property
    def checkpoint(self) -> DcpCheckpoint:
        """The `DcpCheckpoint` this view reads from."""
        return self._checkpoint

    def tensor_info(self, key: str) -> DcpTensorInfo | None:
        """The plan of the tensor at `key` (None when `key` holds no tensor); reads nothing."""
        node = self._children[key]
        if isinstance(node, _Leaf) and node.is_tensor:
            return self._checkpoint.info(node.name)
        return None

    def __getitem__(self, key: str) -> Any:
        if key in self._values:
            return self._values[key]
        value = self._resolve(self._children[key])
        if not isinstance(value, DcpTree):
            self._values[key] = value
        return value

    def __contains__(self, key: object) -> bool:
        return key in self._children

    def __iter__(self) -> Iterator[str]:
        return iter(self._children)

    def __len__(self) -> int:
        return len(self._children)

    def __repr__(self) -> str:
        return f"DcpTree({self._checkpoint.path!r}, keys={len(self)})"

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickled (torch.save, deepcopy) as the OrderedDict it stands for, every value read:
        # a saved checkpoint never refers to ckptmap's classes.
        return (OrderedDict, (), None, None, iter(self.items()))

    def _resolve(self, node: _Node) -> Any:
        if isinstance(node, _Leaf):
            if node.is_tensor:
                return self._checkpoint[node.name]
            return self._checkpoint.load_object(node.name)
        if isinstance(node, dict):
            return DcpTree(self._checkpoint, node)
        return [None if item is None else self._resolve(item) for item in node]


def _insert(
    checkpoint: DcpCheckpoint, root: dict[str, _Node], path: tuple[str | int, ...], leaf: _Leaf
) -> None:
    """Places `leaf` at `path`, as DCP's own unflattening does (int keys make lists)."""
    container: Any = root
    for i, key in enumerate(path):
        last = i == len(path) - 1
        fresh: _Node = leaf if last else ({} if type(path[i + 1]) is str else [])
        if isinstance(container, dict):
            if type(key) is not str:
                raise _conflict(checkpoint, leaf.name, path)
            current = container.get(key)
            if current is None:
                container[key] = current = fresh
        else:
            if type(key) is not int:
                raise _conflict(checkpoint, leaf.name, path)
            if len(container) <= key:
                container.extend([None] * (key + 1 - len(container)))
            current = container[key]
            if current is None:
                container[key] = current = fresh
        if last:
            if current is not leaf:
                raise _conflict(checkpoint, leaf.name, path)
        elif isinstance(current, _Leaf) or type(current) is not type(fresh):
            raise _conflict(checkpoint, leaf.name, path)
        container = current


def _conflict(
    checkpoint: DcpCheckpoint, name: str, path: tuple[str | int, ...]
) -> InvalidDcpCheckpointError:
    return InvalidDcpCheckpointError(
        checkpoint.path,
        f"the nested path {list(path)!r} of entry {name!r} collides with another entry's",
    )


def open_dcp(
    path: str | os.PathLike[str], map_location: Any = None, **options: Any
) -> DcpCheckpoint:
    """Opens a DCP directory lazily (see `DcpCheckpoint` for `options`)."""
    return DcpCheckpoint(path, map_location=map_location, **options)


def load_dcp(path: str | os.PathLike[str], map_location: Any = None, **options: Any) -> DcpTree:
    """What `ckptmap.formats.load_file` returns for a DCP directory: its nested, lazy view.

    For ``dcp.save(model.state_dict())`` that is a mapping of the state dict's keys to
    tensors; for ``dcp.save({"model": ..., "optimizer": ...})`` a mapping with those keys,
    as `torch.load` of the same state saved by `torch.save` would give (DCP turns tuples into
    lists and non-str dict keys into str). Tensors are read on first access.

    Args:
        path: the checkpoint directory (or its ``.metadata``).
        map_location: as for `torch.load`.
        **options: ``weights_only``, ``allowed_globals`` (see `DcpCheckpoint`).
    """
    return DcpCheckpoint(path, map_location=map_location, **options).tree()
