"""Checks of a ``torch.save`` zip checkpoint that torch itself does not make, before torch reads it.

`torch.load` trusts the archive in two ways that a damaged or hostile file can abuse:

- it inflates compressed members (``data.pkl`` deflated into a zip bomb) into memory with no
  cap. Here a compressed member may declare at most 64 MiB or 16 times its compressed size,
  whichever is larger (`ckptmap.zipdir.ZipEntry.too_inflated`; ``torch.save`` never
  compresses, so real checkpoints are far below either), and torch's reader never writes
  more than a member declares;
- with ``mmap=True`` it builds each storage from its record's offset and the size the
  pickle *declares* (numel x itemsize), not the record's actual size: a record smaller than
  declared yields a storage that runs on into the bytes of the next records. Here the pickle
  is replayed by Python's C unpickler with inert stand-ins for every global (nothing is
  imported, called or built), which collects each storage reference's declared size and each
  tensor's extent; a storage larger than its record, or a tensor reaching past its storage,
  is a `CorruptCheckpointError` naming the record. Without mmap, torch compares the sizes
  itself, and its message becomes the same typed error (`ckptmap.formats.pickled`).

The replay costs a fraction of torch's own unpickling (the C unpickler, no tensors built).
"""

from __future__ import annotations

import functools
import gc
import io
import pickle
import warnings
import zlib
from typing import Any, BinaryIO

from ckptmap.errors import CorruptCheckpointError
from ckptmap.formats.pickle_scan import pickle_globals
from ckptmap.paths import open_regular
from ckptmap.zipdir import ZipDirectoryError, ZipEntry, read_stored, read_zip_directory

__all__ = ["check_torch_zip"]

_REBUILDERS = frozenset(
    {
        ("torch._utils", "_rebuild_tensor_v2"),
        ("torch._utils", "_rebuild_tensor"),
        ("torch._utils", "_rebuild_qtensor"),
    }
)


class _Finding(Exception):
    """A problem the replay found: the storage key and what is wrong."""


class _Stub:
    """Stands in for every object the pickle builds: accepts anything, does nothing."""

    def __new__(cls, *args: Any, **kwargs: Any) -> _Stub:
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __call__(self, *args: Any, **kwargs: Any) -> _Stub:
        return _STUB

    def __setstate__(self, state: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def append(self, value: Any) -> None:
        pass

    def extend(self, values: Any) -> None:
        pass


@functools.cache
def _itemsize(name: str) -> int:
    """The element size of ``torch.<name>`` when it is a storage class (0 when it is not)."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the typed storage classes warn that they are legacy
        cls = getattr(torch, name, None)
        if cls is torch.UntypedStorage:
            return 1
        dtype = getattr(cls, "dtype", None) if isinstance(cls, type) else None
    return dtype.itemsize if isinstance(dtype, torch.dtype) else 0


#: Every stand-in is alike: one shared instance where none has to be created.
_STUB = _Stub()


class _StorageType:
    """A ``torch.<Name>Storage`` global, by name: its element size, nothing imported."""

    __slots__ = ("itemsize", "name")

    def __init__(self, name: str) -> None:
        self.name = name
        self.itemsize = _itemsize(name)


class _Storage:
    __slots__ = ("key", "numel")

    def __init__(self, key: str, numel: int) -> None:
        self.key = key
        self.numel = numel


class _Replay(pickle.Unpickler):
    """Replays ``data.pkl``: records storage references and checks tensor extents."""

    def __init__(self, data: bytes, record_sizes: dict[str, int]) -> None:
        super().__init__(io.BytesIO(data))
        self.record_sizes = record_sizes

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _REBUILDERS:
            return self._rebuild
        if module == "torch" and name.endswith("Storage"):
            return _StorageType(name)
        return _Stub

    def persistent_load(self, pid: Any) -> Any:
        if type(pid) is not tuple or len(pid) != 5 or pid[0] != "storage":
            return _STUB
        _, storage_type, key, _location, numel = pid
        if type(storage_type) is not _StorageType or type(key) is not str:
            return _STUB
        if type(numel) is not int or numel < 0:
            raise _Finding(key, f"declares {numel!r} elements")
        declared = numel * storage_type.itemsize
        actual = self.record_sizes.get(key)
        if actual is not None and declared > actual:
            raise _Finding(
                key,
                f"holds {actual:,} bytes but the pickle declares {numel:,} x "
                f"{storage_type.itemsize} = {declared:,} bytes ({storage_type.name}): reading "
                "it would return bytes of the records after it",
            )
        return _Storage(key, numel)

    def _rebuild(self, storage: Any, offset: Any, size: Any, stride: Any, *rest: Any) -> _Stub:
        if type(storage) is not _Storage:
            return _STUB
        if type(offset) is not int or type(size) is not tuple or type(stride) is not tuple:
            return _STUB  # not what torch.save writes; torch decides
        if offset < 0 or len(size) != len(stride):
            raise _Finding(storage.key, f"has a tensor with offset {offset}, shape {size}")
        end = offset + 1
        for extent, step in zip(size, stride):  # noqa: B905 - lengths checked above
            if type(extent) is not int or type(step) is not int:
                return _STUB
            if extent <= 0:
                if extent < 0:
                    raise _Finding(storage.key, f"has a tensor of shape {size}")
                return _STUB  # an empty tensor needs no element
            end += (extent - 1) * abs(step)
        if end > storage.numel:
            raise _Finding(
                storage.key,
                f"holds {storage.numel:,} elements, but a tensor of shape {size} (offset "
                f"{offset}, strides {stride}) reaches element {end:,}",
            )
        return _STUB


def _bomb_check(path: str, size: int, entry: ZipEntry) -> None:
    limit = entry.inflation_limit
    if entry.too_inflated:
        raise CorruptCheckpointError(
            path,
            size,
            f"a zip archive whose member {entry.name!r} would inflate from "
            f"{entry.compressed_size:,} to {entry.size:,} bytes (more than {limit:,}; a zip "
            "bomb?). torch.save never compresses; it was not inflated",
            "do not load this file unless you know where it comes from; re-save the weights "
            "with torch.save",
        )


def _pickle_bytes(f: BinaryIO, entry: ZipEntry) -> bytes:
    if not entry.compressed:
        return read_stored(f, entry)
    if entry.method != 8:
        raise ZipDirectoryError(f"member {entry.name!r} uses compression method {entry.method}")
    f.seek(entry.header_offset + 26)
    name_len, extra_len = (int.from_bytes(f.read(2), "little") for _ in range(2))
    f.seek(entry.header_offset + 30 + name_len + extra_len)
    inflater = zlib.decompressobj(-15)
    data = inflater.decompress(f.read(entry.compressed_size), entry.size + 1)
    if len(data) != entry.size:
        raise ZipDirectoryError(f"member {entry.name!r} does not inflate to its declared size")
    return data


def check_torch_zip(path: str, size: int, *, mmap: bool) -> bool:
    """Checks the archive at `path` before `torch.load` reads it (see the module docstring).

    Args:
        path: a file sniffed as a torch zip checkpoint.
        size: its size, for messages.
        mmap: whether torch will map it (only then are record sizes checked here).

    Returns:
        Whether torch may map it: False when a storage record is compressed (a mapped
        storage would hold the compressed bytes; read into memory, torch inflates them).

    Raises:
        CorruptCheckpointError: a compressed member past the inflation cap, a storage record
            smaller than the pickle declares, or a tensor reaching past its storage.
    """
    with open_regular(path) as f:
        try:
            directory = read_zip_directory(f, strict=False)
        except ZipDirectoryError:
            return mmap  # torch's reader reports a damaged archive in its own words
        for entry in directory.entries:
            _bomb_check(path, size, entry)
        if any(e.compressed and "/data/" in e.name for e in directory.entries):
            return False
        if not mmap:
            return False
        pickles = [e for e in directory.entries if e.name.endswith("data.pkl")]
        if len(pickles) != 1:
            return True
        prefix = pickles[0].name[: -len("data.pkl")]
        records = {
            e.name[len(prefix) + len("data/") :]: e.size
            for e in directory.entries
            if e.name.startswith(prefix + "data/")
        }
        try:
            data = _pickle_bytes(f, pickles[0])
        except ZipDirectoryError:
            return True
    try:
        # The C unpickler sizes its memo to the largest slot a pickle names: refuse damaged
        # slots (a 2**31 slot is 16 GiB) before replaying. torch's own unpickler, whose memo
        # is a dict, then reports the damage in its words.
        pickle_globals(io.BytesIO(data))
    except ValueError:
        return True
    collecting = gc.isenabled()
    gc.disable()
    try:
        _Replay(data, records).load()
    except _Finding as finding:
        key, problem = finding.args
        raise CorruptCheckpointError(
            path,
            size,
            f"a damaged torch zip checkpoint: its storage record {prefix}data/{key} {problem}",
            "re-download or re-save it; do not load it with other tools either",
        ) from None
    except Exception:
        return True  # a pickle the replay can not follow: torch's safe loader decides
    finally:
        if collecting:
            gc.enable()
    return True
