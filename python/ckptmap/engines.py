"""Copy engines: where a tensor lives, and how work is queued on a device and waited for.

`ckptmap.transfer` and `ckptmap.streaming` decide *what* to copy; an engine owns everything
that depends on the kind of device, so that the same planning code runs on a machine without
a GPU (and is tested there) and on one with CUDA:

- `place(tensor)`: `HOST` for CPU memory, a device index (>= 0) for a device the engine
  drives, `OTHER` for anything else (copied tensor by tensor, by torch); `places(tensors)`,
  the same for a list of CPU or CUDA tensors, at a fraction of the cost per tensor.
- `host_buffer(nbytes, device)`: staging memory on the host for copies to `device`
  (page-locked on CUDA, so host-to-device copies run asynchronously at full bandwidth).
- `issue(device, work)`: runs `work` with its device operations queued on the engine's copy
  stream for `device`, ordered after everything already queued on that device's current
  stream.
- `record(device)`: a wait function that returns once the work issued so far on that copy
  stream is done (the ring of staging buffers reuses a buffer only after it).
- `finish(devices)`: returns once every copy issued for those devices (on the copy stream or
  on the current stream) is complete: a load's copies are done when the load returns.
- `slot_bytes`, `slots`, `threads`: the size of the staging ring (`ckptmap.streaming`):
  at most `slots` host buffers of `slot_bytes` each, filled by `threads` reader threads
  (None: one per slot, at most the CPU count).

`CudaEngine` drives CUDA devices through one side stream per device; `HostEngine` (the
default without CUDA) runs everything inline. Tests substitute engines of their own with
`using_engine`.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Protocol

import torch

__all__ = [
    "HOST",
    "OTHER",
    "SLOTS",
    "SLOT_BYTES",
    "CopyEngine",
    "CudaEngine",
    "HostEngine",
    "current_engine",
    "engine_override",
    "using_engine",
]

#: `CopyEngine.place` of a tensor in host (CPU) memory.
HOST = -1
#: `CopyEngine.place` of a tensor on a device the engine does not drive (meta, mps, ...).
OTHER = -2
#: Bytes per staging buffer of the ring.
SLOT_BYTES = 16 << 20
#: Staging buffers in the ring: at most SLOTS x SLOT_BYTES of host memory per load, however
#: large the checkpoint (and pinned memory is slow to allocate: torch's caching host
#: allocator keeps it for the next load).
SLOTS = 8


def _done() -> None:
    """The wait function of work that is already complete."""


class CopyEngine(Protocol):
    """What `ckptmap.transfer` and `ckptmap.streaming` need from a device (see the module doc)."""

    slot_bytes: int
    slots: int
    threads: int | None

    def place(self, tensor: torch.Tensor) -> int:
        """`HOST`, the index of a device this engine drives, or `OTHER`."""
        ...

    def places(self, tensors: list[torch.Tensor]) -> list[int]:
        """`place` of each of `tensors`, which are all in CPU memory or on CUDA devices."""
        ...

    def can_stream_to(self, device: torch.device) -> bool:
        """Whether new tensors on `device` can be filled through this engine."""
        ...

    def host_buffer(self, nbytes: int, device: int) -> torch.Tensor:
        """A uint8 host tensor of `nbytes` bytes to stage copies to `device` in."""
        ...

    def issue(self, device: int, work: Callable[[], None]) -> None:
        """Runs `work`, its device operations queued on the copy stream of `device`."""
        ...

    def record(self, device: int) -> Callable[[], None]:
        """A function that waits until the work issued so far for `device` is done."""
        ...

    def finish(self, devices: Iterable[int]) -> None:
        """Waits until every copy issued for `devices` is complete."""
        ...


class HostEngine:
    """The engine of a machine without an accelerator: CPU memory only, everything inline."""

    slot_bytes = SLOT_BYTES
    slots = SLOTS
    threads: int | None = None

    def place(self, tensor: torch.Tensor) -> int:
        return HOST if tensor.is_cpu else OTHER

    def places(self, tensors: list[torch.Tensor]) -> list[int]:
        return [HOST if t.is_cpu else OTHER for t in tensors]

    def can_stream_to(self, device: torch.device) -> bool:
        return False

    def host_buffer(self, nbytes: int, device: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8)

    def issue(self, device: int, work: Callable[[], None]) -> None:
        work()

    def record(self, device: int) -> Callable[[], None]:
        return _done

    def finish(self, devices: Iterable[int]) -> None:
        pass


class CudaEngine:
    """CUDA devices: pinned staging buffers and one copy stream per device.

    Work is issued on the copy stream after making it wait for the device's current stream,
    so copies see every earlier write to their sources and destinations (a model just built
    or moved on the current stream). `finish` synchronizes the copy stream and the current
    stream of each device (copies that torch does tensor by tensor run on the current stream).
    """

    slot_bytes = SLOT_BYTES
    slots = SLOTS
    threads: int | None = None

    def __init__(self) -> None:
        self._streams: dict[int, torch.cuda.Stream] = {}
        self._lock = threading.Lock()

    def place(self, tensor: torch.Tensor) -> int:
        if tensor.is_cpu:
            return HOST
        if tensor.is_cuda:
            return tensor.get_device()
        return OTHER

    def places(self, tensors: list[torch.Tensor]) -> list[int]:
        # `get_device()` is the CUDA index, and -1 (HOST) in CPU memory: one call per tensor.
        return [t.get_device() for t in tensors]

    def can_stream_to(self, device: torch.device) -> bool:
        return device.type == "cuda"

    def host_buffer(self, nbytes: int, device: int) -> torch.Tensor:
        # From torch's caching host allocator: freed buffers are kept for the next load, and
        # a buffer freed while a copy from it is pending is not reused before the copy ends.
        # Under the target device, so that pinning never makes a context on another GPU.
        with torch.cuda.device(device):
            return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)

    def _stream(self, device: int) -> torch.cuda.Stream:
        stream = self._streams.get(device)
        if stream is None:
            with self._lock:
                stream = self._streams.get(device)
                if stream is None:
                    stream = self._streams[device] = torch.cuda.Stream(device=device)
        return stream

    def issue(self, device: int, work: Callable[[], None]) -> None:
        stream = self._stream(device)
        with torch.cuda.device(device):
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):
                work()

    def record(self, device: int) -> Callable[[], None]:
        # Blocking: the reader thread that waits sleeps instead of spinning on a core that
        # the other readers need.
        event = torch.cuda.Event(blocking=True)
        event.record(self._stream(device))
        return event.synchronize

    def finish(self, devices: Iterable[int]) -> None:
        for device in devices:
            if device < 0:
                continue
            self._stream(device).synchronize()
            torch.cuda.current_stream(device).synchronize()


_override: contextvars.ContextVar[CopyEngine | None] = contextvars.ContextVar(
    "ckptmap_copy_engine", default=None
)
_default: CopyEngine | None = None
_default_lock = threading.Lock()


def engine_override() -> CopyEngine | None:
    """The engine installed by `using_engine` in this context, if any."""
    return _override.get()


def current_engine() -> CopyEngine:
    """The engine in use: the one installed by `using_engine`, else the machine's default.

    The default is decided on first use (`torch.cuda.is_available()`), only once a load meets
    a tensor that is not in CPU memory or a map location on a device: a CPU-only load never
    initializes CUDA.
    """
    engine = _override.get()
    if engine is not None:
        return engine
    global _default
    if _default is None:
        with _default_lock:
            if _default is None:
                _default = CudaEngine() if torch.cuda.is_available() else HostEngine()
    return _default


@contextlib.contextmanager
def using_engine(engine: CopyEngine) -> Iterator[CopyEngine]:
    """Runs the block with `engine` as the copy engine (of this thread or task)."""
    token = _override.set(engine)
    try:
        yield engine
    finally:
        _override.reset(token)
