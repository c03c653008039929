"""Opening a checkpoint: its format, its tensor table and its other entries, before any tensor
data is read.

`open_checkpoint(path_or_uri)` is the first step of every load, ``inspect``, ``diff`` and
``convert``; `ckptmap.plan.plan_load` is the second. What an opened `Checkpoint` knows without
touching tensor bytes depends on the format:

================  =========================================================================
safetensors       the validated header: names, dtypes, shapes, byte ranges
sharded           the index plus each safetensors shard's header (torch shards are mapped)
DCP               ``.metadata``: names, dtypes, shapes, chunks and byte ranges
torch zip         ckptmap's Rust reader: names, dtypes, shapes and byte ranges from
                  ``data.pkl`` alone (`ckptmap.formats.pth`); files only torch can read
                  load through torch's safe loader, every tensor a view of the mapped file
legacy / pickle   nothing until the file is read whole (`Checkpoint.header_only` is False)
remote            http(s) / s3 safetensors and shard sets: headers read by byte range
                  (`ckptmap.remote`); other remote files are downloaded whole
a loaded object   what a custom URI scheme or the caller hands over (`Checkpoint.of`)
================  =========================================================================

A `Checkpoint` is a context manager; closing it releases the file maps it holds (tensors
already handed out stay valid: they keep their own reference to the map).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, NamedTuple

import torch

from ckptmap.errors import TorchScriptArchiveError
from ckptmap.formats import load_file
from ckptmap.formats.safetensors import SafetensorsFile
from ckptmap.formats.sharded import ShardedCheckpoint
from ckptmap.formats.sniff import Format, sniff
from ckptmap.report import LoggerLike
from ckptmap.schemes import CheckpointLoader, load_from_local
from ckptmap.statedict import find_state_dict

__all__ = ["URI_OPENERS", "Checkpoint", "TensorEntry", "open_checkpoint", "walk_tensors"]


class TensorEntry(NamedTuple):
    """One row of a checkpoint's tensor table (immutable; a named tuple, so that tables of
    100k rows build in a fraction of a frozen dataclass's time).

    Attributes:
        name: the tensor's key (in the state dict for `Checkpoint.entries`, a dotted path from
            the top of the checkpoint for `Checkpoint.all_entries`).
        dtype: torch's name for the dtype, without ``torch.`` (``"bfloat16"``).
        shape: the shape.
        nbytes: the tensor's size in bytes.
        file: the file holding its bytes, when the format says (safetensors, shards).
        start: absolute offset of its first byte in `file`, when known.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    file: str | None = None
    start: int | None = None

    @property
    def meta(self) -> torch.Tensor:
        """An empty tensor of this shape and dtype on the ``meta`` device (for dry runs)."""
        return torch.empty(self.shape, dtype=getattr(torch, self.dtype), device="meta")


def walk_tensors(obj: Any, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor nested in `obj` (mappings, lists, tuples), with its dotted path (a bare
    tensor at the top is ``"<top level>"``)."""
    if isinstance(obj, torch.Tensor):
        yield prefix or "<top level>", obj
    elif isinstance(obj, Mapping):
        for key, value in obj.items():
            yield from walk_tensors(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(obj, list | tuple):
        for i, value in enumerate(obj):
            yield from walk_tensors(value, f"{prefix}.{i}" if prefix else str(i))


def _entry_of(name: str, tensor: torch.Tensor) -> TensorEntry:
    dtype = str(tensor.dtype).removeprefix("torch.")
    return TensorEntry(name, dtype, tuple(tensor.shape), tensor.nbytes)


class Checkpoint:
    """An opened checkpoint (see the module docstring); build it with `open_checkpoint`.

    Attributes:
        source: the path or URI it was opened from.
        format: the format its content shows (`ckptmap.formats.sniff.Format`), or None for an
            object handed over by a custom URI scheme or the caller.
        looks_like: a short description of the content.
        header_only: the tensor table came without reading tensor data.
        size: the file's size in bytes (a sharded checkpoint's: its index's), when local.
    """

    size: int | None = None

    def __init__(
        self, source: str, fmt: Format | None, looks_like: str, *, header_only: bool
    ) -> None:
        self.source = source
        self.format = fmt
        self.looks_like = looks_like
        self.header_only = header_only

    # --- what every format answers ---

    def entries(self) -> list[TensorEntry]:
        """The state dict's tensors, keyed by their names in the state dict, in file order."""
        return [
            _entry_of(k, v) for k, v in self.state_dict().items() if isinstance(v, torch.Tensor)
        ]

    def keys(self) -> list[str]:
        """The state dict's keys, tensors or not, in order."""
        return list(self.state_dict())

    def all_entries(self) -> list[TensorEntry]:
        """Every tensor of the checkpoint (optimizer state included), by dotted path."""
        return [_entry_of(name, t) for name, t in walk_tensors(self.load())]

    @property
    def metadata(self) -> dict[str, str]:
        """The format's own string metadata (safetensors ``__metadata__``, an index's
        ``metadata``); empty where the format has none."""
        return {}

    @property
    def shards(self) -> int | None:
        """How many shard files, for a sharded checkpoint."""
        return None

    def load(self) -> Any:
        """The whole checkpoint, as `ckptmap._load_checkpoint` returns it."""
        raise NotImplementedError

    def state_dict(self, names: Iterable[str] | None = None) -> Mapping[str, Any]:
        """The weights (`find_state_dict` of `load`), or only the entries named in `names`.

        Only the tensors asked for are built, where the format allows it.
        """
        state_dict = find_state_dict(self.load(), self.source)
        if names is None:
            return state_dict
        return _subset(state_dict, names)

    def meta_state_dict(self) -> Mapping[str, Any]:
        """The state dict with every tensor replaced by an empty ``meta`` tensor of its shape and
        dtype (other values and torch's ``_metadata`` kept): what a dry run loads."""
        state_dict = self.state_dict()
        out: OrderedDict[str, Any] = OrderedDict(
            (k, v.to("meta") if isinstance(v, torch.Tensor) else v) for k, v in state_dict.items()
        )
        metadata = getattr(state_dict, "_metadata", None)
        if metadata is not None:
            out._metadata = metadata  # type: ignore[attr-defined]
        return out

    def close(self) -> None:
        """Releases what the checkpoint holds open (idempotent)."""

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        kind = self.format.value if self.format is not None else "object"
        return f"<ckptmap.Checkpoint {kind} {self.source!r}>"

    @classmethod
    def of(cls, obj: Any, source: str = "<checkpoint>") -> Checkpoint:
        """A `Checkpoint` over an object already in memory (a state dict, a loaded file)."""
        return _Loaded(obj, source, None, "a checkpoint in memory", header_only=True)


def _subset(state_dict: Mapping[str, Any], names: Iterable[str]) -> Mapping[str, Any]:
    out: OrderedDict[str, Any] = OrderedDict((n, state_dict[n]) for n in names)
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None:
        out._metadata = metadata  # type: ignore[attr-defined]
    return out


class _Loaded(Checkpoint):
    """A checkpoint whose object is (or becomes, on first use) fully in memory: pickles (torch
    zip ones as views of the mapped file) and what custom URI schemes return."""

    def __init__(
        self,
        obj: Any,
        source: str,
        fmt: Format | None,
        looks_like: str,
        *,
        header_only: bool,
    ) -> None:
        super().__init__(source, fmt, looks_like, header_only=header_only)
        self._obj = obj

    def load(self) -> Any:
        return self._obj

    def close(self) -> None:
        self._obj = None


class _Safetensors(Checkpoint):
    def __init__(self, path: str, looks_like: str, map_location: Any, mmap: bool | None) -> None:
        super().__init__(path, Format.SAFETENSORS, looks_like, header_only=True)
        self._file = SafetensorsFile(path, map_location=map_location)
        self._map_location = map_location
        self._mmap = mmap
        self._loaded: Any = None

    def entries(self) -> list[TensorEntry]:
        path = self._file.path
        return [
            TensorEntry(i.name, i.dtype, tuple(i.shape), i.nbytes, path, i.start)
            for i in self._file.infos()
        ]

    def meta_state_dict(self) -> Mapping[str, Any]:
        # From the header alone: no tensor is built.
        return OrderedDict((e.name, e.meta) for e in self.entries())

    def all_entries(self) -> list[TensorEntry]:
        return self.entries()

    def keys(self) -> list[str]:
        return [e.name for e in self.entries()]

    @property
    def metadata(self) -> dict[str, str]:
        return dict(self._file.metadata)

    def load(self) -> Any:
        if self._loaded is None:
            self._loaded = load_file(self.source, self._map_location, mmap=self._mmap)
        return self._loaded

    def state_dict(self, names: Iterable[str] | None = None) -> Mapping[str, Any]:
        if names is None:
            return super().state_dict()
        # Only the tensors asked for are built (views of the map).
        return OrderedDict((n, self._file[n]) for n in names)

    def close(self) -> None:
        self._file.close()
        self._loaded = None


class _TorchZip(Checkpoint):
    """A torch zip checkpoint opened by ckptmap's Rust reader (`ckptmap.formats.pth`): the
    tables come from ``data.pkl`` alone, tensors are built only when asked for (views of a
    private map of the file). Where the reader can not tell (a file only torch can read,
    a state dict made by allowlisted calls), the checkpoint is loaded whole, as before."""

    def __init__(self, pth_file: Any, looks_like: str, map_location: Any, options: dict) -> None:
        from ckptmap.errors import NoStateDictError

        try:
            where = pth_file.state_dict_path()
        except NoStateDictError:
            where = None  # raised again, with the loaded object, where it is asked for
        table_ok = where is not None and pth_file._reader.table_error is None
        mapped = options["mmap"] is not False
        super().__init__(pth_file.path, Format.TORCH_ZIP, looks_like, header_only=True)
        self.header_only = table_ok or mapped
        self._file = pth_file
        self._where: list[str] | None = where if table_ok else None
        self._map_location = map_location
        self._options = options
        self._loaded: Any = None

    def _rows(self) -> dict[str, int]:
        """Table row of each tensor of the state dict, by its key there."""
        assert self._where is not None
        lead = "".join(f"{part}." for part in self._where)
        rows: dict[str, int] = {}
        for i, name in enumerate(self._file.table.names):
            if name.startswith(lead):
                rows.setdefault(name[len(lead) :], i)
        return rows

    def entries(self) -> list[TensorEntry]:
        if self._where is None:
            return super().entries()
        table = self._file.table
        rows = self._rows()
        out = []
        for key, shape, dtype, _type in self._file.state_dict_items(self._where):
            row = rows.get(key) if isinstance(key, str) else None
            if shape is None or row is None:
                continue
            start = table.byte_ranges[row][0]
            out.append(TensorEntry(key, dtype, tuple(shape), table.nbytes[row], self.source, start))
        return out

    def all_entries(self) -> list[TensorEntry]:
        if self._where is None:
            return super().all_entries()
        t = self._file.table
        return [
            TensorEntry(name, dtype, tuple(shape), nbytes, self.source, span[0])
            for name, dtype, shape, nbytes, span in zip(
                t.names, t.dtypes, t.shapes, t.nbytes, t.byte_ranges, strict=True
            )
        ]

    def keys(self) -> list[str]:
        if self._where is None:
            return super().keys()
        return [item[0] for item in self._file.state_dict_items(self._where)]

    def meta_state_dict(self) -> Mapping[str, Any]:
        if self._where is not None:
            from ckptmap._core import PthFallback

            try:
                # Built by the reader with meta tensors: no tensor data, no torch unpickler.
                return self._file.meta_value(self._where)
            except PthFallback:
                pass
        return super().meta_state_dict()

    def load(self) -> Any:
        if self._loaded is None:
            self._loaded = load_file(self.source, self._map_location, **self._options)
        return self._loaded

    def state_dict(self, names: Iterable[str] | None = None) -> Mapping[str, Any]:
        if names is None or self._where is None or self._loaded is not None:
            return super().state_dict(names)
        wanted = list(names)
        rows = self._rows()
        if not all(isinstance(n, str) and n in rows for n in wanted):
            return super().state_dict(wanted)  # not only tensors: build the whole thing
        from ckptmap._core import PthFallback

        try:
            attrs = self._file.attrs_of(self._where)  # _metadata, checked where it is used
        except PthFallback:
            return super().state_dict(wanted)
        # Only the tensors asked for are built (views of a private map of the file).
        lead = "".join(f"{part}." for part in self._where)
        built = self._file.load(
            [lead + n for n in wanted], self._map_location, mmap=self._options["mmap"] is not False
        )
        out: OrderedDict[str, Any] = OrderedDict(zip(wanted, built.values(), strict=True))
        if "_metadata" in attrs:
            out._metadata = attrs["_metadata"]  # type: ignore[attr-defined]
        return out

    def close(self) -> None:
        self._loaded = None


class _Sharded(Checkpoint):
    def __init__(self, path: str, looks_like: str, map_location: Any, options: dict) -> None:
        super().__init__(path, Format.SHARDED, looks_like, header_only=True)
        self._sharded = ShardedCheckpoint(path, map_location=map_location, **options)
        self._map_location = map_location
        self._options = options
        self._loaded: Any = None

    def entries(self) -> list[TensorEntry]:
        files = self._sharded.shards
        return [
            TensorEntry(e.name, e.dtype, tuple(e.shape), e.nbytes, files.get(e.shard))
            for e in self._sharded.plan()
        ]

    def meta_state_dict(self) -> Mapping[str, Any]:
        # From the header alone: no tensor is built.
        return OrderedDict((e.name, e.meta) for e in self.entries())

    def all_entries(self) -> list[TensorEntry]:
        return self.entries()

    def keys(self) -> list[str]:
        return [e.name for e in self.entries()]

    @property
    def metadata(self) -> dict[str, str]:
        return {k: str(v) for k, v in self._sharded.metadata.items()}

    @property
    def shards(self) -> int | None:
        return len(self._sharded.shards)

    def load(self) -> Any:
        if self._loaded is None:
            self._loaded = load_file(self.source, self._map_location, **self._options)
        return self._loaded

    def state_dict(self, names: Iterable[str] | None = None) -> Mapping[str, Any]:
        if names is None:
            return super().state_dict()
        return OrderedDict((n, self._sharded[n]) for n in names)

    def close(self) -> None:
        self._sharded.close()
        self._loaded = None


class _Dcp(Checkpoint):
    """A torch.distributed.checkpoint directory: planned from ``.metadata``, read by range."""

    def __init__(self, path: str, looks_like: str, map_location: Any, options: dict) -> None:
        super().__init__(path, Format.DCP, looks_like, header_only=True)
        from ckptmap.formats.dcp import DcpCheckpoint

        self._dcp = DcpCheckpoint(
            path,
            map_location=map_location,
            weights_only=options["weights_only"],
            allowed_globals=options["allowed_globals"],
        )
        self._tree = self._dcp.tree()

    def _weights(self) -> Mapping[str, Any]:
        # The saved nesting, lazily: finding the state dict reads nothing.
        return find_state_dict(self._tree, self.source)

    def entries(self) -> list[TensorEntry]:
        from ckptmap.formats.dcp import DcpTree

        weights = self._weights()
        if not isinstance(weights, DcpTree):  # pragma: no cover - a tree's state dict is one
            return super().entries()
        out = []
        for key in weights:
            info = weights.tensor_info(key)
            if info is not None:
                out.append(_dcp_entry(key, info, self._dcp.files))
        return out

    def meta_state_dict(self) -> Mapping[str, Any]:
        # Tensors from .metadata alone; other entries (objects, nested trees) as they load.
        weights = self._weights()
        metas = {e.name: e.meta for e in self.entries()}
        return OrderedDict((k, metas[k] if k in metas else weights[k]) for k in weights)

    def all_entries(self) -> list[TensorEntry]:
        # DCP's flattened names are the dotted paths from the top.
        return [_dcp_entry(i.name, i, self._dcp.files) for i in self._dcp.infos()]

    def keys(self) -> list[str]:
        return list(self._weights())

    @property
    def shards(self) -> int | None:
        return len(self._dcp.files)

    def load(self) -> Any:
        return self._tree

    def state_dict(self, names: Iterable[str] | None = None) -> Mapping[str, Any]:
        weights = self._weights()
        if names is None:
            return weights
        # Only the tensors asked for are read (their byte ranges).
        return OrderedDict((n, weights[n]) for n in names)

    def close(self) -> None:
        self._dcp.close()


def _dcp_entry(name: str, info: Any, files: Mapping[str, str]) -> TensorEntry:
    # A tensor in one piece has one byte range; one split across ranks has several.
    chunk = info.chunks[0] if len(info.chunks) == 1 else None
    return TensorEntry(
        name,
        info.dtype,
        tuple(info.shape),
        info.nbytes,
        files[chunk.file] if chunk is not None else None,
        chunk.start if chunk is not None else None,
    )


#: Openers tried, in order, for a URI that is not a local path, before its scheme's loader:
#: ``opener(uri, loader, map_location, allowed_globals=...)`` returns a `Checkpoint`, or None
#: to let `loader` load the file whole. Importing ckptmap adds `ckptmap.remote.open_remote`
#: (http(s) and s3 safetensors files and shard sets, by byte range).
URI_OPENERS: list[Callable[..., Checkpoint | None]] = []


def open_file(
    path: str | os.PathLike[str],
    map_location: Any = None,
    *,
    weights_only: bool = True,
    allowed_globals: Iterable[Any] = (),
    mmap: bool | None = None,
) -> Checkpoint:
    """Opens a local checkpoint file (or sharded checkpoint directory), whatever its format.

    The arguments are those of `ckptmap.formats.load_file`.

    Raises:
        The errors of `ckptmap.formats.load_file`: missing, corrupt, unsafe, TorchScript, ...
    """
    sniffed = sniff(path)
    sniffed.raise_if_corrupt()
    if sniffed.format is Format.TORCHSCRIPT:
        raise TorchScriptArchiveError(sniffed.path)
    options = {
        "weights_only": weights_only,
        "allowed_globals": tuple(allowed_globals),
        "mmap": mmap,
    }
    opened: Checkpoint
    if sniffed.format is Format.SAFETENSORS:
        opened = _Safetensors(sniffed.path, sniffed.looks_like, map_location, mmap)
    elif sniffed.format is Format.SHARDED:
        opened = _Sharded(sniffed.path, sniffed.looks_like, map_location, options)
    elif sniffed.format is Format.DCP:
        opened = _Dcp(sniffed.path, sniffed.looks_like, map_location, options)
    elif sniffed.format is Format.TORCH_ZIP and weights_only:
        from ckptmap.formats.pth import PthFile

        pth_file = PthFile(sniffed.path, allowed_globals=options["allowed_globals"])
        opened = _TorchZip(pth_file, sniffed.looks_like, map_location, options)
    else:
        # Pickles, and formats that `load_file` knows but this module does not plan yet.
        obj = load_file(sniffed.path, map_location, **options)
        # A torch zip is mapped: its tensors are views whose pages have not been read.
        header_only = sniffed.format is Format.TORCH_ZIP and mmap is not False
        opened = _Loaded(
            obj, sniffed.path, sniffed.format, sniffed.looks_like, header_only=header_only
        )
    opened.size = sniffed.size
    return opened


def open_checkpoint(
    filename: str | os.PathLike[str],
    map_location: Any = None,
    logger: LoggerLike = None,
    *,
    allowed_globals: Iterable[Any] = (),
) -> Checkpoint:
    """Opens a checkpoint from a local path or any registered URI scheme.

    Local paths open without reading tensor data where the format allows it (see the module
    docstring). ``http(s)://`` and ``s3://`` safetensors files and shard sets open from their
    headers, read by byte range, and fetch only the tensors asked for (`ckptmap.remote`).
    Every other URI goes through `ckptmap.CheckpointLoader`'s registry (downloads through the
    cache, model zoos, S3, custom schemes) and is wrapped as it comes back.

    Args:
        filename: a local path (``~`` expanded), a directory holding a shard index, or a URI.
        map_location: as for `torch.load`.
        logger: where the "Loads checkpoint by ... backend" line goes (rank 0, INFO).
        allowed_globals: for pickle checkpoints, as for `ckptmap.formats.load_file`.

    Raises:
        The errors of the scheme's loader (`CheckpointNotFoundError`, `DownloadError`, ...).
    """
    from ckptmap.formats import allowlist

    path = os.fspath(filename)
    loader = CheckpointLoader._get_checkpoint_loader(path)
    # With the allowlist of the enclosing block (e.g. mmengine's patch(allowed_globals=...)).
    with allowlist.extended(allowed_globals) as allowed:
        CheckpointLoader.log_backend(path, loader, logger)
        if loader is load_from_local:
            return open_file(os.path.expanduser(path), map_location, allowed_globals=allowed)
        for opener in URI_OPENERS:
            opened = opener(path, loader, map_location, allowed_globals=allowed)
            if opened is not None:
                return opened
        obj = loader(path, map_location)
    return Checkpoint.of(obj, path)
