"""The staging ring: bytes from files or host tensors to a device, read ahead by threads.

A load onto a GPU is bounded by how fast host memory reaches the device. Copying each tensor
on its own from pageable memory costs a driver round trip and a bounce through the driver's
own staging per tensor; copying from page-locked ("pinned") memory runs at the bus's speed
and asynchronously. So the bytes go through a small ring of pinned buffers ("slots"):

    reader threads:  fill slot k with the next planned bytes (pread from a file, memcpy
                     or a cast from a host tensor)          ─┐ while the device receives
    main thread:     in order, copy slot k to the device on  │ slot k-1, k-2, ...
                     the engine's copy stream, mark it      ─┘
                     (a slot is refilled only once its copy is done)

The work is cut into `Piece`s, each at most one slot: a chunk of one large tensor (copied
straight into its destination's bytes), or many small tensors packed together (copied into
one device buffer, then scattered into their destinations by `torch._foreach_copy_`, a few
launches instead of one per tensor). Pieces are packed into fills of one slot each, in order;
at most `slots` fills are in flight, so host memory stays at `slots x slot_bytes` whatever
the size of the load. Everything that depends on the device goes through a
`ckptmap.engines.CopyEngine`, so the ring runs, and is tested, on a machine without a GPU.

`read_tensors` is the entry point for files: a table of (file, byte range, dtype, shape,
destination) rows, as a checkpoint's plan gives them (the safetensors header, a shard
index), read into existing tensors or into new ones on a device.
"""

from __future__ import annotations

import ctypes
import math
import os
import stat
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import NamedTuple

import numpy as np
import torch
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from ckptmap.engines import (
    SLOT_BYTES,
    SLOTS,
    CopyEngine,
    HostEngine,
    current_engine,
    engine_override,
)
from ckptmap.errors import (
    CheckpointNotFoundError,
    CheckpointPermissionError,
    CorruptCheckpointError,
)

__all__ = [
    "ALIGN",
    "SLOTS",
    "SLOT_BYTES",
    "SMALL_BYTES",
    "FileRange",
    "Piece",
    "ReadItem",
    "SourceFile",
    "chunk_tensor",
    "engine_for",
    "named_device",
    "pack_tensors",
    "read_tensors",
    "run_ring",
]

#: Tensors below this size are packed together; larger ones are copied in their own pieces.
SMALL_BYTES = 1 << 20
#: Alignment of every piece in a slot (a multiple of every dtype's size).
ALIGN = 256
# preadv takes at most IOV_MAX (1024 on Linux) buffers per call.
_MAX_IOV = 512


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


# --- pieces ---------------------------------------------------------------------------------


class Piece(NamedTuple):
    """One unit of work of the ring: `nbytes` of staging, filled by `read`, sent by `deliver`.

    Attributes:
        nbytes: staging bytes it needs (at most one slot).
        read: fills a uint8 host tensor of `nbytes` bytes; runs in a reader thread. A
            `FileRange` is read with its neighbours in one `preadv`.
        deliver: issues the device copies out of that tensor; runs on the copy stream.
    """

    nbytes: int
    read: Callable[[torch.Tensor], None]
    deliver: Callable[[torch.Tensor], None]


def _into_slice(dst: torch.Tensor, start: int, stop: int) -> Callable[[torch.Tensor], None]:
    """Delivers staged bytes into elements [start, stop) of contiguous `dst` (same dtype)."""

    def deliver(region: torch.Tensor) -> None:
        dst.view(-1)[start:stop].copy_(region.view(dst.dtype), non_blocking=True)

    return deliver


def _scatter(dsts: list[torch.Tensor], dtype: torch.dtype) -> Callable[[torch.Tensor], None]:
    """Delivers staged `dtype` elements, packed in order, into the tensors `dsts`.

    One host-to-device copy into a buffer on the device, then `torch._foreach_copy_` from
    views of it (made in C++ by `_unflatten_dense_tensors`, not in a Python loop).
    """
    device = dsts[0].device

    def deliver(region: torch.Tensor) -> None:
        staged = torch.empty(region.numel() // dtype.itemsize, dtype=dtype, device=device)
        staged.copy_(region.view(dtype), non_blocking=True)
        torch._foreach_copy_(dsts, _unflatten_dense_tensors(staged, dsts))

    return deliver


def _memmove_from(src: torch.Tensor, offset: int) -> Callable[[torch.Tensor], None]:
    """Reads the bytes of contiguous host tensor `src` from byte `offset` on."""

    def read(region: torch.Tensor) -> None:
        # ctypes releases the GIL around the call; torch's copy_ would start its own thread
        # pool from inside every reader thread.
        ctypes.memmove(region.data_ptr(), src.data_ptr() + offset, region.numel())

    return read


def _cast_from(
    src: torch.Tensor, start: int, stop: int, dtype: torch.dtype
) -> Callable[[torch.Tensor], None]:
    """Reads elements [start, stop) of contiguous host tensor `src`, cast to `dtype`."""

    def read(region: torch.Tensor) -> None:
        # torch casts on the host in host-to-device copies: the same kernel, here.
        region.view(dtype).copy_(src.view(-1)[start:stop])

    return read


def _flatten_from(srcs: list[torch.Tensor], dtype: torch.dtype) -> Callable[[torch.Tensor], None]:
    """Reads host tensors `srcs`, packed in order, cast to `dtype`."""

    def read(region: torch.Tensor) -> None:
        region.view(dtype).copy_(_flatten_dense_tensors(srcs))

    return read


def _steps(numel: int, itemsize: int, slot_bytes: int) -> list[tuple[int, int]]:
    """Element ranges of at most one slot (whole `ALIGN` units) covering `numel` elements."""
    step = max(1, (slot_bytes // ALIGN) * ALIGN // itemsize)
    return [(start, min(numel, start + step)) for start in range(0, numel, step)]


def chunk_tensor(dst: torch.Tensor, src: torch.Tensor, slot_bytes: int = SLOT_BYTES) -> list[Piece]:
    """Pieces that copy host tensor `src` into device tensor `dst`, at most a slot each.

    Both must be contiguous and of the same shape; a dtype difference is cast on the host.
    """
    if not (dst.is_contiguous() and src.is_contiguous()) or dst.shape != src.shape:
        raise ValueError("chunk_tensor needs contiguous tensors of the same shape")
    itemsize = dst.dtype.itemsize
    same = src.dtype == dst.dtype
    pieces = []
    for start, stop in _steps(dst.numel(), itemsize, slot_bytes):
        if same:
            read = _memmove_from(src, start * itemsize)
        else:
            read = _cast_from(src, start, stop, dst.dtype)
        pieces.append(Piece((stop - start) * itemsize, read, _into_slice(dst, start, stop)))
    return pieces


def pack_tensors(
    dsts: list[torch.Tensor],
    srcs: list[torch.Tensor],
    sizes: Sequence[int] | None = None,
    slot_bytes: int = SLOT_BYTES,
) -> list[Piece]:
    """Pieces that copy many small host tensors `srcs` into device tensors `dsts`.

    All `srcs` share one dtype, all `dsts` another (cast on the host where they differ) and
    one device; no tensor is empty, none is larger than a slot. `sizes` are the destinations'
    sizes in bytes, if the caller has them. The pairs are cut, in order, into runs of at
    most one slot.
    """
    dtype = dsts[0].dtype
    if sizes is None:
        sizes = [t.numel() * dtype.itemsize for t in dsts]
    ends = np.cumsum(np.asarray(sizes, dtype=np.int64))
    pieces = []
    first, done = 0, 0
    while first < len(dsts):
        # The longest run from `first` that fits a slot (at least one pair).
        stop = max(first + 1, int(np.searchsorted(ends, done + slot_bytes, side="right")))
        nbytes = int(ends[stop - 1]) - done
        pieces.append(_packed(dsts[first:stop], srcs[first:stop], dtype, nbytes))
        first, done = stop, int(ends[stop - 1])
    return pieces


def _packed(
    dsts: list[torch.Tensor], srcs: list[torch.Tensor], dtype: torch.dtype, nbytes: int
) -> Piece:
    return Piece(nbytes, _flatten_from(srcs, dtype), _scatter(dsts, dtype))


# --- the ring -------------------------------------------------------------------------------

Fill = list[tuple[Piece, int]]


def _plan_fills(pieces: Sequence[Piece], slot_bytes: int) -> list[Fill]:
    """Packs the pieces, in order, into fills of one slot each, every piece `ALIGN`ed."""
    fills: list[Fill] = []
    current: Fill = []
    used = 0
    for piece in pieces:
        if piece.nbytes > slot_bytes:
            raise ValueError(f"a piece of {piece.nbytes} bytes does not fit a slot of {slot_bytes}")
        offset = _align(used)
        if current and offset + piece.nbytes > slot_bytes:
            fills.append(current)
            current, offset = [], 0
        current.append((piece, offset))
        used = offset + piece.nbytes
    if current:
        fills.append(current)
    return fills


def _read_fill(slot: torch.Tensor, fill: Fill) -> None:
    """Fills `slot` with one fill's bytes; file ranges that follow each other are one read."""
    k = 0
    while k < len(fill):
        piece, offset = fill[k]
        k += 1
        first = piece.read
        if not isinstance(first, FileRange):
            piece.read(slot[offset : offset + piece.nbytes])
            continue
        views = [slot[offset : offset + piece.nbytes]]
        end = first.offset + piece.nbytes
        while k < len(fill):
            nxt, nxt_offset = fill[k]
            if not (
                isinstance(nxt.read, FileRange)
                and nxt.read.file is first.file
                and nxt.read.offset == end
            ):
                break
            views.append(slot[nxt_offset : nxt_offset + nxt.nbytes])
            end += nxt.nbytes
            k += 1
        first.file.pread(views, first.offset)


def run_ring(
    pieces: Sequence[Piece],
    device: int,
    *,
    engine: CopyEngine | None = None,
) -> None:
    """Moves `pieces` through the ring to `device`; every copy is done when it returns.

    The ring's size is the engine's: fills of up to `slot_bytes` are read by up to
    `threads` threads (None: one per slot, at most the CPU count) into at most `slots`
    buffers, and delivered in order on the engine's copy stream. A slot is refilled only after the
    copies out of it are done, so at most `slots` buffers of at most `slot_bytes` exist at
    once. An exception in a reader stops the load: nothing more is read or delivered, the
    copies already issued are waited for, and the exception is raised here.

    The destinations of different pieces must not overlap (`ckptmap.transfer` checks this
    for its copies; new tensors never do).
    """
    engine = engine or current_engine()
    fills = _plan_fills(pieces, engine.slot_bytes)
    if not fills:
        return
    slots = max(1, min(engine.slots, len(fills)))
    # Each slot is as large as the largest fill it will hold.
    sizes = [0] * slots
    for f, fill in enumerate(fills):
        piece, offset = fill[-1]
        sizes[f % slots] = max(sizes[f % slots], offset + piece.nbytes)
    buffers: list[torch.Tensor | None] = [None] * slots
    waits: list[Callable[[], None] | None] = [None] * slots
    workers = engine.threads if engine.threads is not None else min(slots, os.cpu_count() or 1)

    def buffer_for(f: int) -> torch.Tensor:
        # Allocated here, on the calling thread, under the target device (see CudaEngine).
        s = f % slots
        buffer = buffers[s]
        if buffer is None:
            buffer = buffers[s] = engine.host_buffer(sizes[s], device)
        return buffer

    def read(f: int, buffer: torch.Tensor, wait: Callable[[], None] | None) -> torch.Tensor:
        if wait is not None:
            wait()  # the copies out of this slot's previous fill are done
        with torch.no_grad():  # grad mode is per thread
            _read_fill(buffer, fills[f])
        return buffer

    def deliver(f: int, buffer: torch.Tensor) -> None:
        with torch.no_grad():
            for piece, offset in fills[f]:
                piece.deliver(buffer[offset : offset + piece.nbytes])

    def send(f: int, buffer: torch.Tensor) -> None:
        engine.issue(device, lambda: deliver(f, buffer))
        waits[f % slots] = engine.record(device)

    if workers <= 1 or len(fills) == 1:
        try:
            for f in range(len(fills)):
                send(f, read(f, buffer_for(f), waits[f % slots]))
        finally:
            engine.finish([device])
        return

    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ckptmap-read")
    pending: deque[Future[torch.Tensor]] = deque()
    try:
        submitted = 0
        while submitted < slots:
            pending.append(pool.submit(read, submitted, buffer_for(submitted), None))
            submitted += 1
        for f in range(len(fills)):
            send(f, pending.popleft().result())
            if submitted < len(fills):
                wait = waits[submitted % slots]
                pending.append(pool.submit(read, submitted, buffer_for(submitted), wait))
                submitted += 1
    finally:
        for future in pending:
            future.cancel()
        # Readers still running write into the slots: they end before anything is freed.
        pool.shutdown(wait=True)
        engine.finish([device])


# --- files ----------------------------------------------------------------------------------


_CHANGED_HINT = (
    "make sure nothing rewrites or replaces the checkpoint while it is loaded (save to a new "
    "file and rename it over the old one), then load it again"
)


def _changed(path: str, size: int, what: str) -> CorruptCheckpointError:
    """The error for a file that is not what it was when its plan was made."""
    return CorruptCheckpointError(path, size, what, _CHANGED_HINT)


class SourceFile(NamedTuple):
    """A file the plan reads from.

    Attributes:
        path: the file.
        identity: ``(st_dev, st_ino, st_size)`` when the plan was made (e.g. when the header
            was read), checked when the file is opened again for reading; None: unchecked.
    """

    path: str
    identity: tuple[int, int, int] | None = None


class ReadItem(NamedTuple):
    """One row of a read plan: a tensor's bytes in a file and where they go.

    Attributes:
        file: the file.
        start: offset of the tensor's first byte.
        end: offset after its last byte.
        dtype: the dtype of the bytes (little-endian, as checkpoint formats store them).
        shape: the tensor's shape.
        target: an existing contiguous tensor of that dtype and shape to fill, or the device
            on which to make a new one.
    """

    file: SourceFile
    start: int
    end: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    target: torch.Tensor | torch.device


class _OpenFile:
    """A file opened for reading by the ring (`pread` from any thread)."""

    def __init__(self, source: SourceFile) -> None:
        self.path = source.path
        try:
            self.fd = os.open(source.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError as err:
            raise CheckpointNotFoundError(
                source.path,
                f"checkpoint file {source.path!r} was removed while it was being loaded: "
                "make sure nothing deletes or moves it until the load returns",
            ) from err
        except PermissionError as err:
            raise CheckpointPermissionError(source.path) from err
        try:
            st = os.fstat(self.fd)
            self.size = st.st_size
            if not stat.S_ISREG(st.st_mode):
                raise _changed(self.path, self.size, "no longer a regular file")
            if source.identity is not None:
                dev, ino, size = source.identity
                if (st.st_dev, st.st_ino) != (dev, ino):
                    raise _changed(
                        self.path, self.size, "another file than the one whose header was read"
                    )
                if st.st_size != size:
                    raise _changed(
                        self.path,
                        self.size,
                        f"a file of {self.size} bytes, {size} when its header was read",
                    )
        except BaseException:
            os.close(self.fd)
            raise

    def pread(self, views: list[torch.Tensor], offset: int) -> None:
        """Reads consecutive bytes from `offset` into the uint8 host tensors `views`."""
        buffers = [v.numpy().data for v in views]
        position = offset
        k = 0
        while k < len(buffers):
            batch = buffers[k : k + _MAX_IOV]
            wanted = sum(b.nbytes for b in batch)
            got = _preadv(self.fd, batch, position)
            if got == 0:
                raise _changed(
                    self.path,
                    self.size,
                    f"a file that ends at byte {position}, before the tensor bytes its "
                    f"header places up to byte {offset + sum(b.nbytes for b in buffers)}",
                )
            position += got
            if got == wanted:
                k += len(batch)
                continue
            # A short read: skip what was filled, continue in the partly filled buffer.
            while got >= buffers[k].nbytes:
                got -= buffers[k].nbytes
                k += 1
            buffers[k] = buffers[k][got:]

    def close(self) -> None:
        os.close(self.fd)


def _preadv(fd: int, buffers: list[memoryview], offset: int) -> int:
    preadv = getattr(os, "preadv", None)
    if preadv is not None:
        return preadv(fd, buffers, offset)
    # Without preadv (not Linux or BSD): one pread per buffer, a copy each.
    total = 0
    for buffer in buffers:
        data = os.pread(fd, buffer.nbytes, offset + total)
        buffer[: len(data)] = data
        total += len(data)
        if len(data) < buffer.nbytes:
            break
    return total


class FileRange:
    """A piece's reader: its bytes are in `file` from `offset` (`_read_fill` merges neighbours)."""

    def __init__(self, file: _OpenFile, offset: int) -> None:
        self.file = file
        self.offset = offset

    def __call__(self, region: torch.Tensor) -> None:
        self.file.pread([region], self.offset)


def _check_target(item: ReadItem) -> torch.Tensor | torch.device:
    target = item.target
    if isinstance(target, torch.device):
        return target
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"a read target is a tensor or a torch.device, not {type(target)}")
    if target.dtype != item.dtype or tuple(target.shape) != tuple(item.shape):
        raise ValueError(
            f"read target of {target.dtype} {tuple(target.shape)} for bytes of {item.dtype} "
            f"{tuple(item.shape)}: copy through an intermediate tensor to cast or reshape"
        )
    if not target.is_contiguous():
        raise ValueError("read targets must be contiguous")
    return target


def read_tensors(
    items: Sequence[ReadItem],
    *,
    engine: CopyEngine | None = None,
) -> list[torch.Tensor]:
    """Reads tensors from files into their targets through the ring.

    New targets are allocated on their devices first (on the current stream); small tensors
    that lie next to each other in a file with one dtype are read with one `preadv` and
    scattered on the device together; large ones are read in slot-sized chunks straight into
    their targets' memory. Targets must not overlap one another.

    Args:
        items: the read plan (see `ReadItem`); targets are filled as the bytes say, no cast.
        engine: the copy engine (default: `ckptmap.engines.current_engine()`); its ring
            size is used (see `run_ring`).

    Returns:
        The target tensors, in the order of `items`.

    Raises:
        CorruptCheckpointError: a file was replaced or shortened since the plan was made.
        ValueError: an item whose byte range does not match its dtype and shape, or a target
            of another dtype or shape, or not contiguous.
        OSError: reading failed.
    """
    engine = engine or current_engine()
    targets: list[torch.Tensor] = []
    for item in items:
        numel = math.prod(item.shape)
        if item.end - item.start != numel * item.dtype.itemsize or item.start < 0:
            raise ValueError(
                f"{item.file.path!r}: bytes [{item.start}, {item.end}) do not hold a "
                f"{item.dtype} tensor of shape {tuple(item.shape)}"
            )
        target = _check_target(item)
        if isinstance(target, torch.device):
            target = torch.empty(item.shape, dtype=item.dtype, device=target)
        targets.append(target)
    by_device: dict[int, list[int]] = {}
    for i, target in enumerate(targets):
        if target.numel():
            by_device.setdefault(engine.place(target), []).append(i)
    if not by_device:
        return targets
    opened: dict[SourceFile, _OpenFile] = {}
    try:
        for source in dict.fromkeys(items[i].file for group in by_device.values() for i in group):
            opened[source] = _OpenFile(source)
        for device, group in by_device.items():
            # File order: sequential reads, and neighbours merged.
            group.sort(key=lambda i: (items[i].file.path, items[i].start))
            pieces = _file_pieces(
                [items[i] for i in group], [targets[i] for i in group], opened, engine.slot_bytes
            )
            # Targets in host memory need no device: the same ring, run inline.
            run_ring(pieces, device, engine=engine if device >= 0 else _host_engine(engine))
    finally:
        for file in opened.values():
            file.close()
    return targets


def _host_engine(engine: CopyEngine) -> HostEngine:
    host = HostEngine()
    host.slot_bytes, host.slots, host.threads = engine.slot_bytes, engine.slots, engine.threads
    return host


def _file_pieces(
    items: list[ReadItem],
    targets: list[torch.Tensor],
    opened: dict[SourceFile, _OpenFile],
    slot_bytes: int,
) -> list[Piece]:
    """Runs of small neighbouring tensors of one dtype, then chunks of the large ones."""
    pieces: list[Piece] = []
    run: list[int] = []
    run_bytes = 0

    def close_run() -> None:
        nonlocal run, run_bytes
        if run:
            first = items[run[0]]
            reader = FileRange(opened[first.file], first.start)
            dsts = [targets[i] for i in run]
            pieces.append(Piece(run_bytes, reader, _scatter(dsts, first.dtype)))
        run, run_bytes = [], 0

    for i, item in enumerate(items):
        nbytes = item.end - item.start
        if nbytes < SMALL_BYTES and nbytes <= slot_bytes:
            if run:
                last = items[run[-1]]
                if not (
                    last.file == item.file
                    and last.end == item.start
                    and last.dtype == item.dtype
                    and run_bytes + nbytes <= slot_bytes
                ):
                    close_run()
            run.append(i)
            run_bytes += nbytes
            continue
        close_run()
        target = targets[i]
        itemsize = item.dtype.itemsize
        for start, stop in _steps(target.numel(), itemsize, slot_bytes):
            reader = FileRange(opened[item.file], item.start + start * itemsize)
            deliver = _into_slice(target, start, stop)
            pieces.append(Piece((stop - start) * itemsize, reader, deliver))
    close_run()
    return pieces


def named_device(map_location: object) -> torch.device | None:
    """The device a plain `map_location` names (a device, a str, an int, or a dict mapping
    ``"cpu"`` to one of those), else None (None itself, other dicts, callables)."""
    if isinstance(map_location, dict):
        map_location = map_location.get("cpu")
    if isinstance(map_location, (str, torch.device, int)) and not isinstance(map_location, bool):
        return torch.device(map_location)
    return None


def engine_for(device: torch.device | None) -> CopyEngine | None:
    """The engine that fills new tensors on `device` through the ring, or None.

    CPU targets stream only under a test engine: a plain CPU load keeps its zero-copy
    views (and never asks whether CUDA is there).
    """
    if device is None:
        return None
    engine = engine_override()
    if engine is None:
        if device.type == "cpu":
            return None
        engine = current_engine()
    return engine if engine.can_stream_to(device) else None
