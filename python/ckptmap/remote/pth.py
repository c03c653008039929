"""Remote torch zip checkpoints (``torch.save``'s ``.pth``) read by byte range.

A torch zip keeps its directory at the end of the file, its pickle (``data.pkl``: every
tensor's dtype, shape and record, none of their bytes) near the start, and each storage in a
record of its own. `RemotePthFile.open` fetches the end of the file, then what the Rust
reader asks for (the central directory, ``data.pkl`` and the small records) into a sparse
local file as large as the remote one, where every byte sits at its own offset and nothing
unfetched takes disk space. The reader is told which ranges are real
(``PthReader.open(known=...)``): it never reads a hole, and names what it still needs.

Loading tensors then fetches exactly their records, each with its local header (merged when
close, in parallel, on the pinned file version), has every fetched record's CRC-32 checked,
and builds the tensors as a local load does (views of a private map of the sparse file;
storages shared as torch shares them). The whole checkpoint (`Checkpoint.load`), and files
only torch can read (compressed members, pickles the reader does not run, big-endian
data), go through the scheme's download cache instead, as before.

The sparse file lives in the temp directory, never in the download cache (it is not the
file); it is removed when the checkpoint is closed or collected.
"""

from __future__ import annotations

import bisect
import os
import tempfile
import threading
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

from ckptmap._core import PthUnfetched
from ckptmap.errors import InvalidTorchZipError, TensorNotFoundError
from ckptmap.formats.pth import FALLBACK, PthFile, _picked
from ckptmap.opened import TensorEntry, _TorchZip
from ckptmap.remote.reader import RangeReader, fetch_all
from ckptmap.remote.safetensors import RangeOptions
from ckptmap.remote.spans import plan_requests

__all__ = ["RemotePthFile", "RemoteTorchZipCheckpoint"]

#: The first bytes fetched from the end: the end records and, for most files, the directory.
TAIL_BYTES = 256 << 10
#: At most this many bytes are held in memory between the network and the sparse file.
BATCH_BYTES = 256 << 20
# Rounds of "the reader needs more bytes" before giving up (each names all it needs at once:
# directory, then data.pkl and small records, then data past a long extra field).
_MAX_ROUNDS = 6


class _NotByRange(Exception):
    """The checkpoint must be downloaded whole; `reason` says why (for the log line)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _SparseFile:
    """A temp file as large as the remote one, holding the fetched ranges at their offsets."""

    def __init__(self, size: int) -> None:
        fd, self.path = tempfile.mkstemp(prefix="ckptmap-remote-", suffix=".pth.part")
        self._fd = fd
        self._finalizer = weakref.finalize(self, _remove, fd, self.path)
        try:
            os.ftruncate(fd, size)
        except OSError:
            self._finalizer()
            raise
        self.size = size
        self.known: list[tuple[int, int]] = []

    def missing(self, ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
        """The parts of `ranges` (clipped to the file) not fetched yet, sorted and merged."""
        known = self.known
        starts = [k[0] for k in known]
        out: list[tuple[int, int]] = []
        for start, end in _merged(
            (max(0, a), min(self.size, b)) for a, b in ranges if a < self.size
        ):
            at = start
            # The known ranges that can overlap [start, end): from the last one starting at
            # or before `start` (they are sorted and disjoint).
            for k_start, k_end in known[max(0, bisect.bisect_right(starts, start) - 1) :]:
                if k_start >= end:
                    break
                if k_end <= at:
                    continue
                if k_start > at:
                    out.append((at, k_start))
                at = max(at, k_end)
            if at < end:
                out.append((at, end))
        return out

    def write(self, start: int, data: bytes) -> None:
        self._pwrite(start, data)
        self.known = _merged([*self.known, (start, start + len(data))])

    def _pwrite(self, start: int, data: bytes | np.ndarray) -> None:
        view = memoryview(data)
        while view:
            written = os.pwrite(self._fd, view, start)
            view, start = view[written:], start + written

    def fill(
        self, reader: RangeReader, ranges: Iterable[tuple[int, int]], options: RangeOptions
    ) -> int:
        """Fetches what `ranges` lacks, at most `BATCH_BYTES` in memory at a time; returns
        how many bytes were asked for."""
        asked = 0
        for batch in _batches(self.missing(ranges), BATCH_BYTES):
            # Uninitialised: every byte is written by the fetch (zeroing them costs a pass).
            buffers = [(start, np.empty(end - start, np.uint8)) for start, end in batch]
            requests = plan_requests(
                [(start, memoryview(buf)) for start, buf in buffers],
                gap_bytes=options.gap_bytes,
                request_bytes=options.request_bytes,
            )
            fetch_all([(reader, r) for r in requests], workers=options.workers)
            asked += sum(r.nbytes for r in requests)
            for start, buf in buffers:
                self._pwrite(start, buf)
            self.known = _merged([*self.known, *batch])  # once per batch, not per range
        return asked

    def close(self) -> None:
        self._finalizer()


def _remove(fd: int, path: str) -> None:
    os.close(fd)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _merged(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for start, end in sorted(r for r in ranges if r[0] < r[1]):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def _batches(ranges: list[tuple[int, int]], limit: int) -> list[list[tuple[int, int]]]:
    """`ranges` in groups of at most `limit` bytes (a longer range is cut)."""
    batches: list[list[tuple[int, int]]] = [[]]
    room = limit
    for start, end in ranges:
        while start < end:
            if room == 0:
                batches.append([])
                room = limit
            take = min(end - start, room)
            batches[-1].append((start, start + take))
            start, room = start + take, room - take
    return [b for b in batches if b]


class RemotePthFile(PthFile):
    """A remote torch zip checkpoint, its tables from the bytes fetched so far; build it
    with `open`.

    Attributes:
        uri: the checkpoint's URI.
        size: its size in bytes.
        fetched_bytes: how many bytes were asked of the server so far.
    """

    reader: RangeReader
    uri: str
    size: int
    fetched_bytes: int

    @classmethod
    def open(
        cls,
        reader: RangeReader,
        head: bytes,
        load_whole: Callable[[Any], Any],
        *,
        allowed_globals: Iterable[Any] = (),
        options: RangeOptions | None = None,
    ) -> RemotePthFile:
        """Reads the directory and pickle of the torch zip behind `reader` (probed already).

        Args:
            reader: the transport.
            head: the first bytes of the file (what the probe read).
            load_whole: ``load_whole(map_location)`` loads the whole checkpoint through the
                scheme's download cache (for what the reader can not build).
            allowed_globals: as for `ckptmap.formats.load_file`.
            options: how ranges are fetched.

        Raises:
            _NotByRange: only a whole download can read it (the log line says why).
            InvalidTorchZipError: the archive or pickle fails validation (named by URI).
            DownloadError and subclasses: the requests failed.
        """
        from ckptmap.formats import allowlist

        given = tuple(allowed_globals)
        f = cls.__new__(cls)
        f.reader, f.uri = reader, reader.uri
        assert reader.size is not None
        f.size = reader.size
        f._options = options or RangeOptions()
        f._load_whole = load_whole
        f._lock = threading.Lock()
        f._given_globals = given
        f._with_default = allowlist.with_default(given)
        try:
            f._sparse = _SparseFile(f.size)
        except OSError as err:  # e.g. a size past what the temp file system allows
            raise _NotByRange(f"no sparse working file of {f.size} bytes ({err})") from None
        try:
            f._sparse.write(0, head[: f.size])
            f.fetched_bytes = len(head)
            f._fill([(f.size - min(f.size, TAIL_BYTES), f.size)])
            f._open_known()
        except BaseException:
            f._sparse.close()
            raise
        return f

    def _fill(self, ranges: Iterable[tuple[int, int]]) -> None:
        self.fetched_bytes += self._sparse.fill(self.reader, ranges, self._options)

    def _open_known(self) -> None:
        """Opens the sparse file, fetching what the reader asks for until it has it all."""
        for _ in range(_MAX_ROUNDS):
            try:
                self._init(
                    self._sparse.path,
                    self._given_globals,
                    self._with_default,
                    known=self._sparse.known,
                )
                self.path = self.uri  # what messages name; the reader keeps its own file
            except PthUnfetched as err:
                if not self._sparse.missing(err.need):
                    break  # asks again for what it has: never loop
                self._fill(err.need)
                continue
            except InvalidTorchZipError as err:
                raise InvalidTorchZipError(self.uri, self.size, err.kind, err.detail) from None
            if self._reader is None:
                raise _NotByRange(f"only torch can read it ({self._unread})")
            if self._reader.fallback_reason is not None:
                raise _NotByRange(f"only torch can read it ({self._reader.fallback_reason})")
            if self._reader.byteorder == "big":
                raise _NotByRange("its data is big-endian")
            return
        raise InvalidTorchZipError(
            self.uri,
            self.size,
            "unfetched",
            "the reader kept asking for bytes that were fetched: the file is not laid out as "
            "a zip archive says",
        )

    def _fetch_rows(self, rows: list[int]) -> None:
        """Fetches the records of table `rows` (with their local headers) and opens again."""
        with self._lock:
            for _ in range(_MAX_ROUNDS):
                need = self._sparse.missing(self._reader.fetch_ranges(rows))
                if not need:
                    return
                self._fill(need)
                self._open_known()
            raise InvalidTorchZipError(
                self.uri, self.size, "unfetched", "a record's bytes could not be located"
            )

    def load(
        self,
        names: Iterable[str] | None = None,
        map_location: Any = None,
        mmap: bool = True,
    ) -> Any:
        """`PthFile.load`, fetching the records of `names` first; the whole checkpoint
        (`names` None) through the scheme's download cache."""
        if names is None:
            return self._load_whole(map_location)
        wanted = list(names)
        self._fetch_rows(self._rows_of(wanted))
        return super().load(wanted, map_location, mmap=True)

    def _load(self, wanted: list[str] | None, map_location: Any, mmap: bool) -> Any:
        # Never hand the sparse file to torch: its holes read as zeros.
        result = self._try_load(wanted, map_location, True)
        if result is not FALLBACK:
            return result
        loaded = self._load_whole(map_location)
        return loaded if wanted is None else _picked(self, loaded, wanted)

    def close(self) -> None:
        """Removes the sparse file (tensors already built keep their own map of it)."""
        self._sparse.close()

    def __repr__(self) -> str:
        tensors = len(self) if getattr(self, "_reader", None) is not None else 0
        return f"RemotePthFile({self.uri!r}, tensors={tensors})"


class RemoteTorchZipCheckpoint(_TorchZip):
    """A remote torch zip checkpoint opened by byte range (see the module docstring): its
    tables from ``data.pkl``, `state_dict(names)` fetching only those tensors' records,
    `load()` (the whole checkpoint) through the scheme's download cache.

    Args:
        pth_file: the file, its directory and pickle read.
        map_location: as for `torch.load`.
    """

    def __init__(self, pth_file: RemotePthFile, map_location: Any = None) -> None:
        options = {"mmap": True, "weights_only": True, "allowed_globals": pth_file._given}
        super().__init__(
            pth_file, "a torch zip checkpoint (read by byte range)", map_location, options
        )
        self.source = pth_file.uri
        self.size = pth_file.size

    def entries(self) -> list[TensorEntry]:
        # Offsets in the file are known only once a record's local header is fetched.
        return [e._replace(start=None) for e in super().entries()]

    def all_entries(self) -> list[TensorEntry]:
        return [e._replace(start=None) for e in super().all_entries()]

    def load(self) -> Any:
        if self._loaded is None:
            self._loaded = self._file.load(None, self._map_location)
        return self._loaded

    def state_dict(self, names: Iterable[str] | None = None) -> Mapping[str, Any]:
        if names is None or self._where is None:
            return super().state_dict(names)
        wanted = list(names)
        present = set(self.keys())
        for name in wanted:
            if name not in present:  # found out from the pickle, not by downloading
                raise TensorNotFoundError(self.source, name)
        return super().state_dict(wanted)

    def close(self) -> None:
        super().close()
        self._file.close()
