"""What every side-by-side benchmark shares: sizes, labelled rows, equal rounds, memory probes.

A benchmark row says what it runs so that `benches/report.py` can pair it honestly:

- ``impl``: who runs it (``ckptmap``, ``mmengine``, ``torch``, ``safetensors``, ``python``,
  ``huggingface_hub``);
- ``call``: what the user would write, short (``load_checkpoint(model, f, assign=True)``);
- ``semantics``: rows are compared only with rows of the same semantics (``copy`` into
  existing parameters against ``copy``, ``assign`` against ``assign``, a durable ``.pth`` save
  against a durable ``.pth`` save);
- ``kind``: ``end to end`` (a file into a model), ``key work`` (an in-memory step),
  ``format`` (one format's reader alone), ``remote`` (from a URI) or ``save``.

`timed` runs every side of a group with the group's rounds and warm-up rounds, so no side gets
a best-of-five against another's single run. `peak_memory` measures one call in a fresh
process (VmHWM after a reset, and anonymous memory sampled every 2 ms), for rows where memory
matters.

``CKPTMAP_BENCH_SCALE=small`` (``benches/report.py --small``) shrinks every size to prove the
machinery in a minute; the report says so on every rendering of such results.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest

T = TypeVar("T")

SCALE = os.environ.get("CKPTMAP_BENCH_SCALE", "full")
if SCALE not in ("full", "small"):
    raise ValueError(f"CKPTMAP_BENCH_SCALE={SCALE!r}: use 'full' or 'small'")

KINDS = ("end to end", "key work", "format", "remote", "save")


def sized(full: T, small: T) -> T:
    """`full` for the real benchmark, `small` for a smoke run (``CKPTMAP_BENCH_SCALE=small``)."""
    return full if SCALE == "full" else small


@dataclass(frozen=True)
class Side:
    """One row of a comparison: who runs what, with which semantics."""

    impl: str
    call: str
    semantics: str = ""
    note: str = ""

    @property
    def ours(self) -> bool:
        return self.impl == "ckptmap"


@dataclass(frozen=True)
class Rounds:
    """Timed rounds and untimed warm-up rounds; one value per group, for every side."""

    rounds: int
    warmup: int = 1


def require_enabled(request: pytest.FixtureRequest) -> None:
    """Skips unless ``--benchmark-enable``: called by the fixtures that build big inputs, so a
    plain ``pytest benches`` neither builds nor times anything."""
    if not request.config.getoption("benchmark_enable", False):
        pytest.skip("benchmark: run with --benchmark-enable (or benches/report.py)")


def timed(
    benchmark: Any,
    side: Side,
    fn: Callable[[], T],
    rounds: Rounds,
    *,
    kind: str,
    setup: Callable[[], None] | None = None,
    **extra: Any,
) -> T:
    """Times `fn` as the group's `rounds` say and labels the row; returns the last result.

    `setup` runs before every round (warm-ups included) and is not timed.
    """
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r} is not one of {KINDS}")
    benchmark.extra_info.update(
        impl=side.impl,
        call=side.call,
        semantics=side.semantics,
        note=side.note,
        kind=kind,
        rounds=rounds.rounds,
        warmup_rounds=rounds.warmup,
        scale=SCALE,
        **extra,
    )
    return benchmark.pedantic(
        fn, setup=setup, rounds=rounds.rounds, warmup_rounds=rounds.warmup, iterations=1
    )


# --- peak memory of one call, in a fresh process -------------------------------------------------


def _anonymous_kib() -> int:
    with open("/proc/self/smaps_rollup") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("Anonymous:"))


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def peak_memory(prepare: Callable[[], Any], call: Callable[[Any], Any]) -> dict[str, float]:
    """Runs in the child: ``call(prepare())`` once, measured; returns MiB figures.

    ``prepare`` builds the inputs (a model, a state dict); what they hold is the baseline.
    "extra RSS" is the peak resident set (``VmHWM``, reset through ``/proc/self/clear_refs``)
    minus the resident set before the call; it counts file pages a memory map reads. "extra
    anonymous" is the peak of ``Anonymous`` in ``/proc/self/smaps_rollup`` (sampled every
    2 ms) minus its value before: memory the process owns, which the kernel can not drop.
    """
    inputs = prepare()
    anon_before = _anonymous_kib()
    rss_before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    peak_anon = anon_before
    done = threading.Event()

    def sample() -> None:
        nonlocal peak_anon
        while not done.is_set():
            peak_anon = max(peak_anon, _anonymous_kib())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        kept = call(inputs)  # kept alive until the figures are read
    finally:
        done.set()
        sampler.join()
    peak_anon = max(peak_anon, _anonymous_kib())
    peak_rss = _status_kib("VmHWM")
    del kept
    return {
        "peak_extra_anon_mib": (peak_anon - anon_before) / 1024,
        "peak_extra_rss_mib": (peak_rss - rss_before) / 1024,
    }


def child_memory(script: str, *args: str, timeout: float = 900) -> dict[str, float]:
    """Runs ``python script --memory args...`` and returns the JSON its last line prints."""
    out = subprocess.run(
        [sys.executable, script, "--memory", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "CKPTMAP_BENCH_SCALE": SCALE},
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"memory probe {args} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])  # mmengine may print before
