"""Records where and with what the benchmarks ran, in pytest-benchmark's JSON (machine_info).

`benches/report.py` renders these fields with the figures; they are read from the machine
while the benchmarks run, never when a report is rendered again later.
"""

from __future__ import annotations

import os
import platform
import subprocess
import threading
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
from harness import SCALE

CHECKOUT = Path(__file__).resolve().parents[1]
VERSIONED = ("torch", "mmengine-lite", "mmengine", "safetensors", "numpy", "huggingface_hub")


class LoadSampler:
    """The 1-minute load average every few seconds while the benchmarks run."""

    def __init__(self, every_s: float = 5.0) -> None:
        self.samples: list[float] = []
        self._every = every_s
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while True:
            self.samples.append(os.getloadavg()[0])
            if self._done.wait(self._every):
                return

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> dict[str, float]:
        self._done.set()
        self._thread.join()
        s = self.samples
        return {"min": min(s), "max": max(s), "mean": sum(s) / len(s), "samples": len(s)}


_RUN: dict[str, Any] = {}


def pytest_sessionstart(session: pytest.Session) -> None:
    if session.config.getoption("benchmark_enable", False):
        _RUN["started"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        _RUN["load_at_start"] = list(os.getloadavg())
        _RUN["sampler"] = LoadSampler()
        _RUN["sampler"].start()


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_gib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("MemTotal:"))
    except (OSError, StopIteration):
        return None
    return round(kib / 2**20, 1)


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], cwd=CHECKOUT, capture_output=True, text=True, timeout=30, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def _versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    import ckptmap

    versions["ckptmap"] = ckptmap.__version__
    return versions


def environment() -> dict[str, Any]:
    """The machine, the versions, the commit, the scale, the load: everything the report
    prints above the figures."""
    sampler = _RUN.get("sampler")
    # Changes to what is measured (untracked sources included), not to the results folder.
    dirty = _git(
        "status",
        "--porcelain",
        "--",
        "python",
        "rust",
        "benches",
        "Cargo.toml",
        "Cargo.lock",
        "pyproject.toml",
        ":!benches/results",
    )
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "ram_gib": _ram_gib(),
        "system": f"{platform.system()} {platform.release()} {platform.machine()}",
        "versions": _versions(),
        "commit": _git("rev-parse", "HEAD"),
        "uncommitted_changes": bool(dirty) if dirty is not None else None,
        "scale": SCALE,
        "started": _RUN.get("started"),
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "load_at_start": _RUN.get("load_at_start"),
        "load_at_end": list(os.getloadavg()),
        "load_1min": sampler.stop() if sampler is not None else None,
        "torch_threads": _torch_threads(),
    }


def _torch_threads() -> int | None:
    try:
        import torch
    except ImportError:
        return None
    return torch.get_num_threads()


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict) -> None:
    machine_info["ckptmap"] = environment()
