"""Probes shared by the tests: did the GIL get released, is a tensor a map of a file."""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the torch-free tests (tests/core/) use ran_meanwhile too
    import torch


def ran_meanwhile(call: Callable[[], object]) -> bool:
    """Whether another Python thread got to run while `call` ran.

    The probe thread is woken just before the call and needs the GIL to record that it ran.
    With a switch interval far longer than the call, the interpreter never takes the GIL from
    the main thread, so the probe runs during the call only if the call releases the GIL.
    """
    go, done = threading.Event(), threading.Event()
    ran: list[bool] = []

    def probe() -> None:
        go.wait()
        ran.append(True)
        done.set()

    thread = threading.Thread(target=probe)
    thread.start()
    interval = sys.getswitchinterval()
    sys.setswitchinterval(30.0)
    try:
        go.set()
        call()
        meanwhile = bool(ran)
    finally:
        sys.setswitchinterval(interval)
    done.wait()
    thread.join()
    return meanwhile


def mapped_from(tensor: torch.Tensor, path: Path) -> bool:
    """Whether `tensor`'s memory is a map of `path` (per /proc/self/maps)."""
    address = tensor.untyped_storage().data_ptr()
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].strip() == str(path):
                start, end = (int(x, 16) for x in fields[0].split("-"))
                if start <= address < end:
                    return True
    return False


# -- sniffing by content ----------------------------------------------------------------------
