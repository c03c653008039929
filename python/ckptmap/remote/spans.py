"""Which byte ranges to ask a server for: the tensors' ranges, merged when close, cut to a size.

Pure planning, no I/O: each wanted tensor is a destination (its file offset and the writable
memory its bytes go to). Destinations whose ranges lie at most `gap_bytes` apart are read in one
request (the bytes between them are read and dropped: one round trip costs more than a small
gap); requests are cut to at most `request_bytes`, so a large tensor or a long run of tensors is
fetched by several requests in parallel. A request never starts or ends with dropped bytes.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["Part", "RangeRequest", "plan_requests"]


@dataclass(frozen=True)
class Part:
    """A run of bytes in one request.

    Attributes:
        start: its absolute file offset.
        length: its size in bytes.
        dest: where the bytes go (exactly `length` bytes), or None for bytes to drop.
    """

    start: int
    length: int
    dest: memoryview | None


@dataclass(frozen=True)
class RangeRequest:
    """One ranged request: bytes ``[start, end)`` of the file, in `parts` order."""

    start: int
    end: int
    parts: tuple[Part, ...]

    @property
    def nbytes(self) -> int:
        """How many bytes the request transfers."""
        return self.end - self.start

    @property
    def useful_bytes(self) -> int:
        """How many of them land in a destination."""
        return sum(p.length for p in self.parts if p.dest is not None)


def _merged(targets: Iterable[tuple[int, memoryview]], gap_bytes: int) -> list[list[Part]]:
    """Destinations sorted by offset, in runs whose neighbours are at most `gap_bytes` apart
    (each run's gaps as parts without a destination)."""
    runs: list[list[Part]] = []
    end = -1
    for start, dest in sorted(((s, d) for s, d in targets if d.nbytes), key=lambda t: t[0]):
        if start < 0:
            raise ValueError(f"a destination at offset {start}")
        if runs and start < end:
            raise ValueError(f"destinations overlap at offset {start} (the previous ends at {end})")
        if runs and start - end <= gap_bytes:
            if start > end:
                runs[-1].append(Part(end, start - end, None))
        else:
            runs.append([])
        runs[-1].append(Part(start, dest.nbytes, dest))
        end = start + dest.nbytes
    return runs


def _cut(run: list[Part], request_bytes: int) -> list[RangeRequest]:
    """A run in requests of at most `request_bytes` (parts split where needed, gaps at the
    edges left out)."""
    requests: list[RangeRequest] = []
    current: list[Part] = []
    room = request_bytes

    def flush() -> None:
        nonlocal current, room
        while current and current[-1].dest is None:
            current.pop()
        if current:
            end = current[-1].start + current[-1].length
            requests.append(RangeRequest(current[0].start, end, tuple(current)))
        current, room = [], request_bytes

    for part in run:
        start, length, dest = part.start, part.length, part.dest
        while length:
            if not current and dest is None:
                break  # a request never starts with dropped bytes
            take = min(length, room)
            piece = dest[:take] if dest is not None else None
            current.append(Part(start, take, piece))
            start, length, room = start + take, length - take, room - take
            dest = dest[take:] if dest is not None else None
            if room == 0:
                flush()
    flush()
    return requests


def plan_requests(
    targets: Iterable[tuple[int, memoryview]], *, gap_bytes: int, request_bytes: int
) -> list[RangeRequest]:
    """The requests that fill every destination, in file order.

    Args:
        targets: ``(file offset, destination)`` pairs; a destination is a writable, flat
            byte view of exactly the tensor's size (empty ones need no request).
        gap_bytes: destinations at most this far apart share a request.
        request_bytes: the most bytes one request asks for (at least 1).

    Raises:
        ValueError: destinations that overlap, a negative offset, or `request_bytes` < 1.
    """
    if request_bytes < 1:
        raise ValueError(f"request_bytes must be at least 1, got {request_bytes}")
    out: list[RangeRequest] = []
    for run in _merged(targets, max(0, gap_bytes)):
        out.extend(_cut(run, request_bytes))
    return out
