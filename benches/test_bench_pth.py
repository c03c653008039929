"""Loading a 2 GiB ``.pth`` into a model: ckptmap vs mmengine's ``load_checkpoint`` vs torch.

Run with ``pytest benches/test_bench_pth.py --benchmark-enable -s`` (skipped otherwise).

The checkpoint is a torch.save zip of 256 float32 ``Linear(1024, 2048)`` layers (512 weights of
8 MiB and 256 biases: 2 GiB), written once to a temporary directory; every variant reads it
from the page cache. The model's parameters are allocated and touched before each load, so
"extra" memory is what the load itself adds.

- ``ckptmap``: ``ckptmap.formats.load_file`` (mmap, weights_only) then
  ``model.load_state_dict(sd, assign=True)``: parameters become views of the mapped file.
- ``mmengine``: ``mmengine.runner.checkpoint.load_checkpoint(model, path)``: reads the whole
  file into memory, then copies every tensor into the model.
- ``torch``: ``torch.load(mmap=True, weights_only=True)`` + ``assign=True``, the floor.

Times come from pytest-benchmark (in process, best of N). Memory comes from one fresh process
per variant: peak extra anonymous memory (``Anonymous`` in ``/proc/self/smaps_rollup``,
sampled every 2 ms during the load) and peak extra RSS (``VmHWM`` after resetting it through
``/proc/self/clear_refs``). Mapped pages are file-backed: they count in RSS once read, never
as anonymous memory, and the kernel can drop them under pressure. ``touch s`` is the time to
read every weight once after the load (page faults on the map; mmengine has read them all).
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

GIB = 2**30
LAYERS, IN_FEATURES, OUT_FEATURES = 256, 1024, 2048
MODEL_BYTES = LAYERS * (IN_FEATURES * OUT_FEATURES + OUT_FEATURES) * 4
GROUP = "load a 2 GiB .pth into a model"
IMPLS = ("ckptmap", "mmengine", "torch")
ROUNDS = {"ckptmap": 5, "torch": 5, "mmengine": 2}


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(IN_FEATURES, OUT_FEATURES) for _ in range(LAYERS))


def make_model() -> Model:
    """A model whose parameters are allocated and resident, without paying for init."""
    with torch.device("meta"):
        model = Model()
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    return model


def load(impl: str, model: Model, path: str) -> Model:
    if impl == "ckptmap":
        from ckptmap.formats import load_file

        model.load_state_dict(load_file(path), assign=True)
    elif impl == "torch":
        model.load_state_dict(torch.load(path, mmap=True, weights_only=True), assign=True)
    elif impl == "mmengine":
        from mmengine.runner.checkpoint import load_checkpoint

        load_checkpoint(model, path, map_location="cpu", logger="silent")
    else:
        raise ValueError(impl)
    return model


def touch_all(model: Model) -> float:
    total = 0.0
    with torch.no_grad():
        for p in model.parameters():
            total += float(p.sum())
    return total


# -- memory, measured in a fresh process per variant ---------------------------------------


def _anonymous_kib() -> int:
    with open("/proc/self/smaps_rollup") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("Anonymous:"))


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def measure(impl: str, path: str) -> dict[str, float]:
    """Runs in the child: load once, return time and memory figures."""
    load(impl, make_model(), path)  # warm the imports and lazy inits, then start clean
    model = make_model()
    anon_before = _anonymous_kib()
    rss_before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    peak_anon = anon_before
    done = threading.Event()

    def sample() -> None:
        nonlocal peak_anon
        while not done.is_set():
            peak_anon = max(peak_anon, _anonymous_kib())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample)
    sampler.start()
    start = time.perf_counter()
    model = load(impl, model, path)
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    peak_anon = max(peak_anon, _anonymous_kib())
    peak_rss = _status_kib("VmHWM")
    start = time.perf_counter()
    touch_all(model)
    touch = time.perf_counter() - start
    return {
        "child_load_s": seconds,
        "touch_s": touch,
        "peak_extra_anon_mib": (peak_anon - anon_before) / 1024,
        "peak_extra_rss_mib": (peak_rss - rss_before) / 1024,
        "extra_anon_pct_of_model": 100 * (peak_anon - anon_before) * 1024 / MODEL_BYTES,
    }


def run_child(impl: str, path: Path) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, __file__, impl, str(path)],
        capture_output=True,
        text=True,
        check=True,
        timeout=900,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])  # mmengine may print before


# -- the benchmark ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(request: pytest.FixtureRequest, tmp_path_factory) -> Path:
    if not request.config.getoption("benchmark_enable", False):
        pytest.skip("benchmark: run with --benchmark-enable")
    path = tmp_path_factory.mktemp("pth") / "model_2gib.pth"
    torch.manual_seed(0)
    state = {}
    for i in range(LAYERS):
        state[f"layers.{i}.weight"] = torch.randn(OUT_FEATURES, IN_FEATURES)
        state[f"layers.{i}.bias"] = torch.randn(OUT_FEATURES)
    torch.save(state, path)
    del state
    return path


RESULTS: dict[str, dict[str, Any]] = {}


@pytest.mark.benchmark(group=GROUP)
@pytest.mark.parametrize("impl", IMPLS)
def test_load_2gib_pth(benchmark, checkpoint: Path, impl: str, capsys) -> None:
    if impl == "mmengine":
        pytest.importorskip("mmengine")
    memory = run_child(impl, checkpoint)
    benchmark.extra_info.update(impl=impl, **memory)

    def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
        return (impl, make_model(), str(checkpoint)), {}

    model = benchmark.pedantic(load, setup=setup, rounds=ROUNDS[impl], iterations=1)
    # The same weights, whichever way they came.
    expected = torch.load(checkpoint, mmap=True, weights_only=True)
    for i in (0, LAYERS // 2, LAYERS - 1):
        assert torch.equal(model.layers[i].weight, expected[f"layers.{i}.weight"])
        assert torch.equal(model.layers[i].bias, expected[f"layers.{i}.bias"])
    RESULTS[impl] = {"best_s": benchmark.stats.stats.min, **memory}
    if len(RESULTS) == len(IMPLS):
        with capsys.disabled():
            print("\n" + table())


def table() -> str:
    mm = RESULTS.get("mmengine", {}).get("best_s")
    lines = [
        f"{GROUP}: {MODEL_BYTES / GIB:.2f} GiB in {2 * LAYERS} tensors (page cache warm)",
        f"{'impl':<10}{'load s':>9}{'vs mmengine':>13}{'extra anon MiB':>16}{'% of model':>12}"
        f"{'extra RSS MiB':>15}{'touch s':>9}",
    ]
    for impl, r in RESULTS.items():
        ratio = f"{mm / r['best_s']:.1f}x" if mm else "-"
        lines.append(
            f"{impl:<10}{r['best_s']:>9.3f}{ratio:>13}{r['peak_extra_anon_mib']:>16.1f}"
            f"{r['extra_anon_pct_of_model']:>11.1f}%{r['peak_extra_rss_mib']:>15.1f}"
            f"{r['touch_s']:>9.2f}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    print(json.dumps(measure(sys.argv[1], sys.argv[2])))
