"""A remote safetensors file: its header read by byte range, then only the tensors asked for.

`RemoteSafetensors.open(reader)` asks for the file's first 16 bytes (the 8-byte header length
and the start of the JSON: enough to tell a safetensors file from a torch zip or a pickle, by
the download cache's own rule), then for the rest of the header, and validates it in the Rust
core (`SafetensorsHeader.from_header`) against the file size the server reported, before any
offset is trusted. `read_tensors` then allocates each wanted tensor, plans the ranges
(`ckptmap.remote.spans`) and fetches them in parallel straight into the tensors' memory.
"""

from __future__ import annotations

import sys
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ckptmap._core import SafetensorsHeader, SafetensorsHeaderError
from ckptmap.cache import SNIFF_SIZE
from ckptmap.errors import InvalidSafetensorsError, TensorNotFoundError, UnsupportedDtypeError
from ckptmap.formats.safetensors import TensorInfo, map_location_fn
from ckptmap.magic import checkpoint_kind
from ckptmap.remote.reader import RangeReader, fetch_all
from ckptmap.remote.spans import plan_requests

__all__ = ["RangeOptions", "RemoteSafetensors", "read_tensors"]


@dataclass(frozen=True)
class RangeOptions:
    """How tensors are fetched.

    Attributes:
        gap_bytes: tensors at most this far apart in the file share a request (the bytes
            between them are read and dropped).
        request_bytes: the most bytes one request asks for; larger runs are split so they
            are fetched in parallel.
        workers: requests in flight at once.
    """

    gap_bytes: int = 1 << 20
    request_bytes: int = 16 << 20
    workers: int = 8


class _NotSafetensors(Exception):
    """The file is not a safetensors file; `kind` is what the first bytes look like
    (``"zip"``, ``"pickle"``, or None when they look like no checkpoint), `head` those
    bytes."""

    def __init__(self, kind: str | None, head: bytes = b"") -> None:
        super().__init__(kind or "not a checkpoint")
        self.kind = kind
        self.head = head


class RemoteSafetensors:
    """A safetensors file read by byte range; build it with `open`.

    Attributes:
        reader: the transport, pinned to the file version whose header was read.
        header: the validated header.
    """

    def __init__(self, reader: RangeReader, header: SafetensorsHeader) -> None:
        self.reader = reader
        self.header = header
        self._names: list[str] = header.names
        self._index = {name: i for i, name in enumerate(self._names)}
        self._dtypes = header.dtypes
        self._shapes = header.shapes
        self._ranges = header.byte_ranges

    @classmethod
    def open(cls, reader: RangeReader) -> RemoteSafetensors:
        """Reads and validates the header of the file behind `reader`.

        Raises:
            _NoRangeSupport: the server does not serve byte ranges.
            _NotSafetensors: the file is something else (a torch zip, a pickle, ...).
            InvalidSafetensorsError: a safetensors file whose header fails validation.
            DownloadError and subclasses: the requests failed.
        """
        head = reader.probe(SNIFF_SIZE)
        kind = checkpoint_kind(head)
        if kind != "safetensors":
            raise _NotSafetensors(kind, head)
        size = reader.size
        assert size is not None
        try:
            header_len = SafetensorsHeader.header_length(head[:8], size, reader.uri)
            end = 8 + header_len
            rest = reader.read(len(head), end) if end > len(head) else b""
            header = SafetensorsHeader.from_header(head[8:end] + rest, size, reader.uri)
        except SafetensorsHeaderError as err:
            raise InvalidSafetensorsError(reader.uri, size, err.kind, err.detail) from None
        return cls(reader, header)

    @property
    def uri(self) -> str:
        return self.reader.uri

    @property
    def size(self) -> int:
        """The file's size in bytes."""
        return self.header.file_size

    @property
    def names(self) -> list[str]:
        """Tensor names, in header order."""
        return list(self._names)

    @property
    def metadata(self) -> dict[str, str]:
        """The header's ``__metadata__`` (empty when it has none)."""
        return self.header.metadata or {}

    def __contains__(self, name: object) -> bool:
        return name in self._index

    def info(self, name: str) -> TensorInfo:
        """What the header says about tensor `name`."""
        i = self._position(name)
        start, end = self._ranges[i]
        return TensorInfo(name, self._dtypes[i], self._shapes[i], start, end)

    def infos(self) -> list[TensorInfo]:
        """Every tensor's `TensorInfo`, in header order."""
        columns = zip(self._names, self._dtypes, self._shapes, self._ranges, strict=True)
        return [TensorInfo(n, d, s, r[0], r[1]) for n, d, s, r in columns]

    def _position(self, name: str) -> int:
        try:
            return self._index[name]
        except (KeyError, TypeError):
            raise TensorNotFoundError(self.uri, name) from None

    def allocate(
        self, names: Iterable[str]
    ) -> tuple[list[tuple[str, torch.Tensor]], list[tuple[int, memoryview]]]:
        """Empty CPU tensors for `names` and the ``(file offset, bytes)`` each must be filled
        from, before anything is fetched.

        Raises:
            TensorNotFoundError: a name the header does not have.
            UnsupportedDtypeError: a dtype torch can not hold (F4, F6_*).
        """
        tensors: list[tuple[str, torch.Tensor]] = []
        targets: list[tuple[int, memoryview]] = []
        for name in dict.fromkeys(names):  # a name asked twice is read once
            i = self._position(name)
            dtype = self.info(name).torch_dtype
            if dtype is None:
                raise UnsupportedDtypeError(self.uri, name, self.header.safetensors_dtypes[i])
            tensor = torch.empty(self._shapes[i], dtype=dtype)
            tensors.append((name, tensor))
            if tensor.numel():
                raw = tensor.reshape(-1).view(torch.uint8).numpy()
                targets.append((self._ranges[i][0], memoryview(raw)))
        return tensors, targets


def read_tensors(
    wanted: Sequence[tuple[RemoteSafetensors, Sequence[str]]],
    *,
    map_location: Any = None,
    options: RangeOptions | None = None,
) -> dict[str, torch.Tensor]:
    """Fetches the named tensors of one or more remote files, every request on one pool.

    Args:
        wanted: each file with the names to read from it.
        map_location: as for `torch.load`; tensors are built on the CPU, then moved.
        options: how ranges are merged and fetched (default `RangeOptions()`).

    Returns:
        The tensors by name, in the order asked.

    Raises:
        TensorNotFoundError, UnsupportedDtypeError: before anything is fetched.
        DownloadError and subclasses (`RemoteChangedError`, `IncompleteDownloadError`, ...):
            a request failed; no tensor is returned.
    """
    options = options or RangeOptions()
    built: list[tuple[str, torch.Tensor]] = []
    work = []
    for remote, names in wanted:
        tensors, targets = remote.allocate(names)
        built.extend(tensors)
        for request in plan_requests(
            targets, gap_bytes=options.gap_bytes, request_bytes=options.request_bytes
        ):
            work.append((remote.reader, request))
    fetch_all(work, workers=options.workers)
    move = map_location_fn(map_location)
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for name, tensor in built:
        if sys.byteorder == "big":  # pragma: no cover - safetensors data is little-endian
            tensor = torch.from_numpy(tensor.numpy().byteswap())
        out[name] = tensor if move is None else move(tensor)
    return out
