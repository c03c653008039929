"""Devices in the tests: the real GPU when there is one, CPU stand-ins for one otherwise.

- `DEVICES`: pytest parameters ``"cpu"`` and ``"cuda"``; ``"cuda"`` is skipped, with the
  reason, on a machine without a GPU, and runs on one that has it.
- `data_parallel(module)`: a real `nn.DataParallel` that leaves `module` where it is.
- `FakeDevice`: a copy engine (`ckptmap.engines.CopyEngine`) on which chosen CPU tensors count
  as a device's, so that every device branch of `ckptmap.transfer` and `ckptmap.streaming`
  runs on CPU with real data, with a ring as small as a test wants.
- `DeferredDevice`: the same, but device work runs only when it is waited for, later and on
  whichever thread waits (a GPU runs queued copies asynchronously too): a slot refilled too
  early, or a load that returns before its copies are done, gives wrong values.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from unittest import mock

import pytest
import torch
from torch import nn

from ckptmap.engines import HOST, OTHER, SLOT_BYTES, SLOTS, CudaEngine

HAS_CUDA = torch.cuda.is_available()
NEEDS_CUDA = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
DEVICES = [pytest.param("cpu"), pytest.param("cuda", marks=NEEDS_CUDA)]


def data_parallel(module: nn.Module) -> nn.DataParallel:
    """`nn.DataParallel(module)` as it is built on a machine without a GPU.

    Where a GPU exists, `nn.DataParallel` moves its module to ``cuda:0`` (in place, so the
    caller's module too); its keys (``module.``) and its unwrapping do not depend on that, and
    tests that compare weights must not depend on whether a GPU is present. Its own
    constructor runs, told that no accelerator is available.
    """
    with mock.patch.object(torch.cuda, "is_available", return_value=False):
        wrapper = nn.DataParallel(module)
    assert wrapper.module is module and wrapper.device_ids == []
    return wrapper


class FakeDevice:
    """A copy engine on which registered CPU tensors are device 0's.

    Args:
        default: the place of CPU tensors that were not registered (`HOST`, or 0 to make
            every CPU tensor a device tensor).
        slot_bytes, slots, threads: the ring's size.

    Attributes:
        buffers: the sizes of the staging buffers handed out.
        issued: the devices work was issued for, in order.
        finished: the device lists `finish` was called with.
    """

    def __init__(
        self,
        *,
        default: int = HOST,
        slot_bytes: int = SLOT_BYTES,
        slots: int = SLOTS,
        threads: int | None = None,
    ) -> None:
        self.default = default
        self.slot_bytes = slot_bytes
        self.slots = slots
        self.threads = threads
        self._device: dict[int, torch.Tensor] = {}  # id -> tensor, kept alive: ids stay unique
        self.buffers: list[int] = []
        self.issued: list[int] = []
        self.finished: list[list[int]] = []

    def on_device(self, *tensors: torch.Tensor) -> None:
        """Makes `tensors` (these objects, not other views of their memory) device tensors."""
        for t in tensors:
            self._device[id(t)] = t

    def place(self, tensor: torch.Tensor) -> int:
        if id(tensor) in self._device:
            return 0
        return self.default if tensor.is_cpu else OTHER

    def places(self, tensors: list[torch.Tensor]) -> list[int]:
        return [self.place(t) for t in tensors]

    def can_stream_to(self, device: torch.device) -> bool:
        return device.type == "cpu"

    def host_buffer(self, nbytes: int, device: int) -> torch.Tensor:
        self.buffers.append(nbytes)
        return torch.empty(nbytes, dtype=torch.uint8)

    def issue(self, device: int, work: Callable[[], None]) -> None:
        self.issued.append(device)
        work()

    def record(self, device: int) -> Callable[[], None]:
        return lambda: None

    def finish(self, devices: Iterable[int]) -> None:
        self.finished.append(sorted(devices))


class DeferredDevice(FakeDevice):
    """A `FakeDevice` whose issued work runs only when a later wait or `finish` asks for it.

    Attributes:
        pending: work issued and not yet run.
        ran: how many pieces of work have run.
    """

    def __init__(self, **options: object) -> None:
        super().__init__(**options)  # type: ignore[arg-type]
        self.pending: list[Callable[[], None]] = []
        self.ran = 0
        self._lock = threading.RLock()

    def issue(self, device: int, work: Callable[[], None]) -> None:
        self.issued.append(device)
        with self._lock:
            self.pending.append(work)

    def _run_until(self, count: int) -> None:
        with self._lock:
            while self.ran < count:
                work = self.pending.pop(0)
                self.ran += 1
                work()

    def record(self, device: int) -> Callable[[], None]:
        with self._lock:
            mark = self.ran + len(self.pending)
        return lambda: self._run_until(mark)

    def finish(self, devices: Iterable[int]) -> None:
        with self._lock:
            self._run_until(self.ran + len(self.pending))
        super().finish(devices)


def small_cuda_engine(slot_bytes: int, slots: int, threads: int | None = None) -> CudaEngine:
    """The CUDA engine with a ring as small as the CPU tests use."""
    engine = CudaEngine()
    engine.slot_bytes = slot_bytes
    engine.slots = slots
    engine.threads = threads
    return engine
