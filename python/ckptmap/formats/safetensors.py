"""safetensors files: a validated header, then tensors as zero-copy views of the mapped file.

`SafetensorsFile(path)` reads the header in Rust (`ckptmap._core.SafetensorsHeader`, which
checks the whole header before any offset is trusted) and maps the file. Nothing else is
read: names, dtypes, shapes and byte sizes (`infos()`, the plan) come from the header alone,
and each tensor is built on access as a view of the map, so a load that uses 10% of the
tensors reads about 10% of the file.

Views, not copies:
    A tensor whose bytes are aligned for its dtype is a view of the mapped pages
    (`torch.frombuffer`). The map is private copy-on-write (``MAP_PRIVATE``, as
    ``torch.load(mmap=True)`` maps): writing to a tensor changes this process's copy, never
    the file. **The file must not be truncated or rewritten while tensors from it are in
    use**: pages not yet read then show the new content, and reading past a truncated end
    kills the process with SIGBUS (as with any memory-mapped file, torch's included). Save to
    a new file and rename it over the old one instead (`ckptmap.atomic`): the old file's
    inode stays valid for as long as it is mapped. ``mmap=False`` reads the file into memory
    when it is opened instead: slower and as large as the file, but then nothing that happens
    to the file later can reach the tensors.

    A tensor whose bytes are not aligned for its dtype (files written with a header length
    that is not a multiple of 8, or with small tensors before large ones) is copied into
    fresh, aligned memory; only that tensor is copied.

Dtypes: every safetensors dtype with a torch equivalent: F64 F32 F16 BF16 I64 I32 I16 I8 U8
BOOL, C64 (complex64: a safetensors dtype since 0.4.3; complex128 is not one), F8_E4M3
F8_E5M2 F8_E4M3FNUZ F8_E5M2FNUZ F8_E8M0, and U16 U32 U64. The sub-byte floats F4, F6_E2M3
and F6_E3M2 appear in the plan, but reading their data raises `UnsupportedDtypeError` (torch
has no one-element-per-value type for them).
"""

from __future__ import annotations

import functools
import mmap as _mmap
import os
import stat
import sys
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from functools import cached_property
from typing import Any, NamedTuple

import torch

from ckptmap import streaming
from ckptmap._core import SafetensorsHeader, SafetensorsHeaderError, filter_prefix_keys
from ckptmap.errors import (
    CheckpointIsADirectoryError,
    CheckpointNotFoundError,
    CheckpointPermissionError,
    CorruptCheckpointError,
    InvalidSafetensorsError,
    MapLocationError,
    TensorNotFoundError,
    UnsupportedDtypeError,
)
from ckptmap.paths import check_path

__all__ = [
    "SafetensorsFile",
    "TensorInfo",
    "load_file",
    "load_safetensors",
    "map_location_fn",
    "open_safetensors",
]


class TensorInfo(NamedTuple):
    """What the header says about one tensor: enough to plan a load without its data.

    Attributes:
        name: the tensor's name.
        dtype: the torch-style dtype name (``"bfloat16"``; see the module docstring).
        shape: the shape.
        start: absolute file offset of the first byte.
        end: absolute file offset after the last byte.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        """The tensor's size in bytes."""
        return self.end - self.start

    @property
    def torch_dtype(self) -> torch.dtype | None:
        """The `torch.dtype`, or None where this torch has none."""
        return dtype_named(self.dtype)


@functools.cache
def dtype_named(name: str) -> torch.dtype | None:
    """This torch's dtype called `name` (``"bfloat16"``), or None where it has none."""
    dtype = getattr(torch, name, None)
    return dtype if isinstance(dtype, torch.dtype) else None


def map_location_fn(
    map_location: Any, source: str = "<safetensors>"
) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """Turns a `torch.load`-style `map_location` into a function on CPU tensors.

    Args:
        map_location: None or "cpu" (keep), a device or device string, a dict mapping
            location tags (``"cpu"``) to devices, or a callable ``(storage, location)``
            returning a storage or None, as `torch.load` calls it (location ``"cpu"``).
        source: the file, for messages.

    Returns:
        A function moving one tensor, or None when tensors stay where they are.

    Raises:
        MapLocationError: (a TypeError) `map_location` is none of the above. The returned
            function raises it when the callable raises or returns something that is not a
            storage.
    """
    if map_location is None:
        return None
    if isinstance(map_location, dict):
        return map_location_fn(map_location.get("cpu"), source)
    if isinstance(map_location, (str, torch.device, int)):
        device = torch.device(map_location)
        if device.type == "cpu":
            return None
        return lambda t: t.to(device)
    if callable(map_location):
        fn = map_location

        def call(t: torch.Tensor) -> torch.Tensor:
            storage = t.untyped_storage()
            try:
                moved = fn(storage, "cpu")
            except Exception as err:
                raise MapLocationError(source, f"raised {type(err).__name__}: {err}") from err
            if moved is None or moved is storage:
                return t
            if isinstance(moved, torch.TypedStorage):
                moved = moved.untyped()
            if not isinstance(moved, torch.UntypedStorage):
                raise MapLocationError(
                    source,
                    f"returned an object of type {type(moved).__name__}, not a storage or None",
                )
            out = torch.empty(0, dtype=t.dtype, device=moved.device)
            return out.set_(moved, t.storage_offset(), t.shape, t.stride())

        return call
    raise MapLocationError(
        source,
        f"is a {type(map_location).__name__}, not None, a device, a str, a dict or a callable,",
    )


def _open_fd(path: str) -> int:
    """Opens `path` for reading, turning OS errors into ckptmap's typed errors."""
    if os.path.isdir(path):
        raise CheckpointIsADirectoryError(path)
    try:
        # O_NONBLOCK: a FIFO must not block the open; it is rejected just below.
        # O_BINARY: Windows' text mode must not touch the bytes (0 elsewhere).
        flags = os.O_RDONLY | getattr(os, "O_BINARY", 0)
        fd = os.open(path, flags | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError as err:
        raise CheckpointNotFoundError(path) from err
    except PermissionError as err:
        raise CheckpointPermissionError(path) from err
    except IsADirectoryError as err:
        raise CheckpointIsADirectoryError(path) from err
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise CorruptCheckpointError(
                path,
                0,
                "a special file (a pipe or a device), not a regular file",
                "save the checkpoint to a regular file first",
            )
    except BaseException:
        os.close(fd)
        raise
    return fd


def _read_header(fd: int, path: str) -> SafetensorsHeader:
    """The validated header of the file open as `fd`.

    The core maps the descriptor itself where it can (POSIX); elsewhere it reads `path`,
    which must still be the open file, so that the header describes the bytes mapped later.
    """
    from_fd = getattr(SafetensorsHeader, "from_fd", None)
    if from_fd is not None:
        return from_fd(fd, path)
    header = SafetensorsHeader.open(path)
    if not os.path.samestat(os.fstat(fd), os.stat(path)):
        raise CorruptCheckpointError(
            path,
            header.file_size,
            "a safetensors file that was replaced while it was being opened",
            "make sure nothing rewrites the file while it is loaded, then retry",
        )
    return header


class SafetensorsFile(Mapping[str, torch.Tensor]):
    """A lazy mapping of names to tensors over a memory-mapped safetensors file.

    Opening validates the header and maps the file; no tensor data is read. Each
    ``file[name]`` builds the tensor anew: a zero-copy view of the map (a copy for misaligned
    data), moved by `map_location` if one was given. Iteration follows the header's order.
    The map lives as long as this object or any tensor taken from it; `close()` only drops
    this object's reference. With ``mmap=False`` the file is read into memory instead and
    the tensors are views of that copy. See the module docstring for what must not happen to
    the file meanwhile.

    Args:
        path: the safetensors file.
        map_location: as for `torch.load` (see `map_location_fn`).
        mmap: map the file (None or True, the default) or, with False, read it whole into
            memory now: the tensors are then views of that private copy and no map of the
            file remains (the header is read through a map that is gone when this returns).

    Raises:
        CheckpointNotFoundError / DanglingSymlinkError / CheckpointIsADirectoryError /
            CheckpointPermissionError: the path can not be opened as a file.
        NotARegularFileError: a FIFO, socket or device (refused before it is opened).
        InvalidSafetensorsError: the header fails validation.
        CorruptCheckpointError: the file changed while it was being opened.
    """

    def __init__(
        self, path: str | os.PathLike[str], *, map_location: Any = None, mmap: bool | None = None
    ) -> None:
        self.path = check_path(path)
        self._move = map_location_fn(map_location, self.path)
        self.mapped = mmap is None or bool(mmap)
        # A map location on a GPU: `load` streams the bytes there (see ckptmap.streaming).
        self._device = streaming.named_device(map_location)
        fd = _open_fd(self.path)
        try:
            st = os.fstat(fd)
            self._identity = (st.st_dev, st.st_ino, st.st_size)
            try:
                self.header = _read_header(fd, self.path)
            except SafetensorsHeaderError as err:
                size = os.fstat(fd).st_size
                raise InvalidSafetensorsError(self.path, size, err.kind, err.detail) from None
            size = self.header.file_size
            self._map: _mmap.mmap | None = None
            if self.mapped:
                try:
                    # Private copy-on-write: writable for torch.frombuffer, never written back.
                    self._map = _mmap.mmap(fd, size, access=_mmap.ACCESS_COPY)
                except ValueError as err:  # shorter now than when the header was read
                    raise self._changed(fd, str(err)) from None
                buffer: _mmap.mmap | bytearray = self._map
            else:
                buffer = self._read_whole(fd, size)
        finally:
            os.close(fd)
        # Tensors hold this view, not the map: while one is alive the map can not be closed.
        self._view: memoryview | None = memoryview(buffer)
        self._names: list[str] = self.header.names
        self._index = {name: i for i, name in enumerate(self._names)}

    def _changed(self, fd: int, detail: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(
            self.path,
            os.fstat(fd).st_size,
            f"a safetensors file that changed while it was being opened ({detail})",
            "make sure nothing rewrites the file while it is loaded, then retry",
        )

    def _read_whole(self, fd: int, size: int) -> bytearray:
        """The file's `size` bytes, read into memory (malloc'd, so aligned for every dtype)."""
        buffer = bytearray(size)
        view = memoryview(buffer)
        done = 0
        with open(fd, "rb", buffering=0, closefd=False) as raw:
            raw.seek(0)
            while done < size:
                count = raw.readinto(view[done:])
                if not count:
                    raise self._changed(fd, f"it ended after {done:,} of {size:,} bytes")
                done += count
        return buffer

    # --- the plan: header only ---

    @property
    def metadata(self) -> dict[str, str]:
        """The header's ``__metadata__`` (empty when it has none)."""
        return self.header.metadata or {}

    @cached_property
    def _columns(self) -> tuple[list[str], list[tuple[int, ...]], list[tuple[int, int]]]:
        h = self.header
        return h.dtypes, h.shapes, h.byte_ranges

    @property
    def names(self) -> list[str]:
        """Tensor names, in header order."""
        return list(self._names)

    @property
    def dtypes(self) -> list[str]:
        """Torch-style dtype names, in header order (see `TensorInfo.dtype`)."""
        return list(self._columns[0])

    @property
    def shapes(self) -> list[tuple[int, ...]]:
        """Shapes, in header order."""
        return list(self._columns[1])

    @property
    def sizes(self) -> list[int]:
        """Each tensor's size in bytes, in header order."""
        return [end - start for start, end in self._columns[2]]

    def info(self, name: str) -> TensorInfo:
        """What the header says about tensor `name`."""
        i = self._position(name)
        dtypes, shapes, ranges = self._columns
        start, end = ranges[i]
        return TensorInfo(name, dtypes[i], shapes[i], start, end)

    def infos(self) -> list[TensorInfo]:
        """Every tensor's `TensorInfo`, in header order: the plan, read from the header alone.

        For very many tensors the columns (`names`, `dtypes`, `shapes`, `sizes`) are cheaper:
        they build no object per tensor.
        """
        dtypes, shapes, ranges = self._columns
        return [
            TensorInfo(n, d, s, r[0], r[1])
            for n, d, s, r in zip(self._names, dtypes, shapes, ranges, strict=True)
        ]

    @property
    def nbytes(self) -> int:
        """The size of the data section (every tensor's bytes)."""
        return self.header.file_size - self.header.data_offset

    # --- Mapping ---

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._tensor(self._position(name))

    def __contains__(self, name: object) -> bool:
        return name in self._index

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def keys(self) -> Any:
        # The header's own list: cheaper than the generic KeysView walk for 100k names.
        return self._index.keys()

    def __repr__(self) -> str:
        return f"SafetensorsFile({self.path!r}, tensors={len(self)}, nbytes={self.nbytes})"

    # --- loading ---

    def load(
        self,
        names: Iterable[str] | None = None,
        *,
        prefix: str | None = None,
        prefetch: bool | None = None,
    ) -> OrderedDict[str, torch.Tensor]:
        """Builds the tensors `names` (default: all), optionally only those under `prefix`.

        Only the selected tensors' pages are read, and only when the tensors are used (or
        now, in the background, with `prefetch`).

        Args:
            names: the tensors to build, in the order wanted (default: header order).
            prefix: keep only names under this module prefix ("backbone" keeps
                "backbone.x", not "backbone2.x"); names are not stripped.
            prefetch: start reading the selected tensors' bytes now (see `prefetch`).
                Default: when `names` or `prefix` selects a subset, whose tensors are then
                presumably all going to be used.

        Raises:
            TensorNotFoundError: a name in `names` that the file does not have.
        """
        positions: list[int] | range = (
            range(len(self._names)) if names is None else [self._position(n) for n in names]
        )
        if prefix is not None:
            chosen = [self._names[i] for i in positions]
            kept, _ = filter_prefix_keys(chosen, prefix, False)
            positions = [positions[k] for k in kept]
        engine = streaming.engine_for(self._device)
        if engine is not None and self._device is not None and sys.byteorder == "little":
            items = self.read_plan([self._names[i] for i in positions], self._device)
            tensors = streaming.read_tensors(items, engine=engine)
            return OrderedDict(zip((self._names[i] for i in positions), tensors, strict=True))
        if prefetch if prefetch is not None else (names is not None or prefix is not None):
            self._prefetch(positions)
        return OrderedDict((self._names[i], self._tensor(i)) for i in positions)

    def read_plan(self, names: Iterable[str], target: torch.device) -> list[streaming.ReadItem]:
        """The rows of `ckptmap.streaming.read_tensors` that read tensors `names` into new
        tensors on `target`: byte ranges from the header, checked against this very file.

        Raises:
            TensorNotFoundError: a name the file does not have.
            UnsupportedDtypeError: a tensor whose dtype torch can not hold.
        """
        if self._view is None:
            raise ValueError(f"{self.path!r}: this SafetensorsFile is closed; open it again")
        source = streaming.SourceFile(self.path, self._identity)
        dtypes, shapes, ranges = self._columns
        items = []
        for name in names:
            i = self._position(name)
            dtype = dtype_named(dtypes[i])
            if dtype is None:
                raise UnsupportedDtypeError(self.path, name, self.header.safetensors_dtypes[i])
            start, end = ranges[i]
            items.append(streaming.ReadItem(source, start, end, dtype, shapes[i], target))
        return items

    def prefetch(self, names: Iterable[str]) -> None:
        """Starts reading the bytes of tensors `names` into the page cache, in the background.

        Exactly their byte ranges (page-rounded, adjacent ones merged) are requested with
        ``madvise(MADV_WILLNEED)``: large reads instead of one page fault at a time, and none
        of the kernel's speculative read-around past the tensors, which on a cold cache can
        read megabytes of unused tensors per access. Advice only: it never fails a load.
        """
        self._prefetch([self._position(n) for n in names])

    def _prefetch(self, positions: Iterable[int]) -> None:
        advise = getattr(self._map, "madvise", None)
        willneed = getattr(_mmap, "MADV_WILLNEED", None)
        if advise is None or willneed is None:
            return
        ranges = self._columns[2]
        spans = sorted(ranges[i] for i in positions)
        merged: list[list[int]] = []
        for start, end in spans:
            if end == start:
                continue
            if merged and start <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], end)
            else:
                merged.append([start, end])
        for start, end in merged:
            aligned = start - start % _mmap.PAGESIZE
            try:
                advise(willneed, aligned, end - aligned)
            except OSError:  # pragma: no cover - advice only
                return

    def close(self) -> None:
        """Drops this object's reference to the map (tensors taken from it stay valid)."""
        # Never mmap.close(): tensors hold pointers into the map, and torch.frombuffer
        # does not keep the buffer exported; unmapping now would leave them dangling.
        self._view = None
        self._map = None

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _position(self, name: str) -> int:
        try:
            return self._index[name]
        except (KeyError, TypeError):
            raise TensorNotFoundError(self.path, name) from None

    def _tensor(self, i: int) -> torch.Tensor:
        view = self._view
        if view is None:
            raise ValueError(f"{self.path!r}: this SafetensorsFile is closed; open it again")
        dtypes, shapes, ranges = self._columns
        dtype = dtype_named(dtypes[i])
        if dtype is None:
            name = self.header.safetensors_dtypes[i]
            raise UnsupportedDtypeError(self.path, self._names[i], name)
        shape = shapes[i]
        start, end = ranges[i]
        nbytes = end - start
        if nbytes == 0:
            tensor = torch.empty(shape, dtype=dtype)
        elif start % dtype.itemsize == 0:
            # mmap's base is page-aligned, so the file offset decides the alignment.
            count = nbytes // dtype.itemsize
            tensor = torch.frombuffer(view, dtype=dtype, count=count, offset=start).view(shape)
        else:
            tensor = torch.empty(shape, dtype=dtype)
            raw = torch.frombuffer(view, dtype=torch.uint8, count=nbytes, offset=start)
            tensor.reshape(-1).view(torch.uint8).copy_(raw)
        if sys.byteorder == "big":  # pragma: no cover - safetensors data is little-endian
            tensor = torch.from_numpy(tensor.numpy().byteswap())
        return tensor if self._move is None else self._move(tensor)


def open_safetensors(
    path: str | os.PathLike[str], map_location: Any = None, *, mmap: bool | None = None
) -> SafetensorsFile:
    """Opens `path` as a lazy `SafetensorsFile` (header validated, data mapped, none read)."""
    return SafetensorsFile(path, map_location=map_location, mmap=mmap)


def load_file(
    path: str | os.PathLike[str], map_location: Any = None, *, mmap: bool | None = None
) -> OrderedDict[str, torch.Tensor]:
    """Loads every tensor of a safetensors file (what the dispatcher calls).

    Args:
        path: the safetensors file.
        map_location: as for `torch.load`.
        mmap: None or True: zero-copy views of the mapped file, whose pages are read when the
            tensors are used. False: the file is read into memory now and not mapped.

    Returns:
        The tensors in header order.
    """
    return SafetensorsFile(path, map_location=map_location, mmap=mmap).load()


def load_safetensors(
    path: str | os.PathLike[str], map_location: Any = None, *, mmap: bool | None = None
) -> tuple[OrderedDict[str, torch.Tensor], dict[str, str]]:
    """Like `load_file`, also returning the header's ``__metadata__`` (empty if none)."""
    with SafetensorsFile(path, map_location=map_location, mmap=mmap) as f:
        return f.load(), f.metadata
