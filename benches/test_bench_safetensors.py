"""safetensors side by side: full load, 10% prefix load, and the header plan of 100k tensors.

Run with ``pytest benches/test_bench_safetensors.py --benchmark-enable -s`` (skipped
otherwise). Files live in a temporary directory and are read from a warm page cache.

- full load: a 1 GiB float32 model (128 ``Linear(1024, 2048)``) from one safetensors file into
  an allocated model, copying into the existing parameters. ckptmap: `load_checkpoint`
  (sniffing, key rules, module recursion, report) and the reader alone plus `load_into`;
  safetensors: ``safetensors.torch.load_model``. Goal: within 1.2x of safetensors.
- prefix load: the ``head.`` tensors only (13 of 128 layers, 10% of the bytes), into the same
  model. ckptmap: `SafetensorsFile.load(prefix=...)`; safetensors: ``safe_open`` and
  ``get_tensor`` for the same names. Goal: at most 0.2x of ckptmap's full load.
- plan: names, dtypes and shapes of a 100k-tensor file (header only). ckptmap:
  `SafetensorsFile(path)` columns (``names``, ``dtypes``, ``shapes``, ``sizes``), its
  `infos()` (one object per tensor) and the bare `SafetensorsHeader`; safetensors:
  ``safe_open`` then ``keys()`` and ``get_slice(name)`` ``.get_shape()`` / ``.get_dtype()``.

At the end, a table prints the ratios against the goals, and the share of the file's pages a
prefix load reads from a cold cache (``mincore`` after ``POSIX_FADV_DONTNEED``).
"""

from __future__ import annotations

import ctypes
import mmap
import os
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_model, save_file
from torch import nn

from ckptmap._core import SafetensorsHeader
from ckptmap.checkpoint import load_checkpoint
from ckptmap.formats.safetensors import SafetensorsFile, load_file
from ckptmap.module_load import load_into

IN_FEATURES, OUT_FEATURES = 1024, 2048
HEAD, BODY = 13, 115  # 10% of the layers (and bytes) under "head."
PLAN_TENSORS = 100_000
FULL = "safetensors: full load of 1 GiB into a model"
PREFIX = "safetensors: prefix load of 10% of 1 GiB"
PLAN = "safetensors: header plan of 100k tensors"
RESULTS: dict[str, float] = {}


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.head = nn.ModuleList(nn.Linear(IN_FEATURES, OUT_FEATURES) for _ in range(HEAD))
        self.body = nn.ModuleList(nn.Linear(IN_FEATURES, OUT_FEATURES) for _ in range(BODY))


def make_model() -> Model:
    """Allocated, resident parameters, without paying for initialisation."""
    with torch.device("meta"):
        model = Model()
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    return model


@pytest.fixture(scope="module")
def files(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    if not request.config.getoption("benchmark_enable", False):
        pytest.skip("benchmark: run with --benchmark-enable")
    root = tmp_path_factory.mktemp("safetensors")
    model_path = root / "model_1gib.safetensors"
    torch.manual_seed(0)
    state = {k: torch.randn_like(v) for k, v in make_model().state_dict().items()}
    save_file(state, str(model_path))
    del state
    plan_path = root / "plan_100k.safetensors"
    plan_path.write_bytes(many_tensors(PLAN_TENSORS))
    return model_path, plan_path


def many_tensors(n: int) -> bytes:
    """A file of `n` small tensors, names as in a wide MoE model."""
    entries = []
    for i in range(n):
        name = f"model.layers.{i // 4096}.experts.{i % 4096}.w"
        entries.append(
            f'"{name}":{{"dtype":"F16","shape":[2,2],"data_offsets":[{8 * i},{8 * i + 8}]}}'
        )
    text = ("{" + ",".join(entries) + "}").encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + bytes(8 * n)


@pytest.fixture(scope="module")
def model() -> Model:
    return make_model()


def check(model: Model, path: Path, head_only: bool = False) -> None:
    with safe_open(str(path), "pt") as f:
        for name in ("head.0.weight", "head.12.bias", "body.114.weight"):
            if head_only and not name.startswith("head."):
                continue
            assert torch.equal(model.get_parameter(name), f.get_tensor(name)), name


# --- full load ---------------------------------------------------------------------------------


@pytest.mark.benchmark(group=FULL)
def test_full_ckptmap_load_checkpoint(benchmark, files, model, tmp_path) -> None:
    path = files[0]
    benchmark.extra_info["impl"] = "ckptmap"
    benchmark.pedantic(
        load_checkpoint, args=(model, str(path)), kwargs={"strict": True}, rounds=5,
        warmup_rounds=1,
    )  # fmt: skip
    check(model, path)
    RESULTS["full ckptmap load_checkpoint"] = benchmark.stats.stats.min


@pytest.mark.benchmark(group=FULL)
def test_full_ckptmap_reader_load_into(benchmark, files, model) -> None:
    path = files[0]
    benchmark.extra_info["impl"] = "ckptmap"

    def run() -> None:
        result = load_into(model, load_file(path))
        assert not result.missing_keys and not result.unexpected_keys

    benchmark.pedantic(run, rounds=5, warmup_rounds=1)
    check(model, path)
    RESULTS["full ckptmap reader+load_into"] = benchmark.stats.stats.min


@pytest.mark.benchmark(group=FULL)
def test_full_safetensors_load_model(benchmark, files, model) -> None:
    path = files[0]
    benchmark.extra_info["impl"] = "safetensors"
    benchmark.pedantic(load_model, args=(model, str(path)), rounds=5, warmup_rounds=1)
    check(model, path)
    RESULTS["full safetensors load_model"] = benchmark.stats.stats.min


# --- prefix load -------------------------------------------------------------------------------


@pytest.mark.benchmark(group=PREFIX)
def test_prefix_ckptmap(benchmark, files, model) -> None:
    path = files[0]
    benchmark.extra_info["impl"] = "ckptmap"

    def run() -> None:
        with SafetensorsFile(path) as f:
            load_into(model, f.load(prefix="head"))

    benchmark.pedantic(run, rounds=5, warmup_rounds=1)
    check(model, path, head_only=True)
    RESULTS["prefix ckptmap"] = benchmark.stats.stats.min
    RESULTS["prefix cold read share"] = cold_read_share(path)


@pytest.mark.benchmark(group=PREFIX)
def test_prefix_safetensors(benchmark, files, model) -> None:
    path = files[0]
    benchmark.extra_info["impl"] = "safetensors"

    def run() -> None:
        with safe_open(str(path), "pt") as f:
            state = {k: f.get_tensor(k) for k in f.keys() if k.startswith("head.")}
        model.load_state_dict(state, strict=False)

    benchmark.pedantic(run, rounds=5, warmup_rounds=1)
    check(model, path, head_only=True)
    RESULTS["prefix safetensors"] = benchmark.stats.stats.min


def cold_read_share(path: Path) -> float:
    """The share of the data pages a prefix load reads from a cold cache."""
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    target = make_model()
    with SafetensorsFile(path) as f:
        load_into(target, f.load(prefix="head"))
        start = f.header.data_offset
    return resident(path, start)


def resident(path: Path, start: int) -> float:
    size = path.stat().st_size
    fd = os.open(path, os.O_RDONLY)
    mm = mmap.mmap(fd, size, access=mmap.ACCESS_COPY)
    os.close(fd)
    addr = torch.frombuffer(memoryview(mm), dtype=torch.uint8, count=1).data_ptr()
    pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    vec = (ctypes.c_ubyte * pages)()
    libc = ctypes.CDLL(None)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    assert libc.mincore(ctypes.c_void_p(addr), ctypes.c_size_t(size), vec) == 0
    first = start // mmap.PAGESIZE
    return sum(v & 1 for v in vec[first:]) / (pages - first)


# --- header plan -------------------------------------------------------------------------------


@pytest.mark.benchmark(group=PLAN)
def test_plan_ckptmap_safetensors_file(benchmark, files) -> None:
    path = files[1]
    benchmark.extra_info["impl"] = "ckptmap"

    def run() -> list[Any]:
        with SafetensorsFile(path) as f:
            return f.infos()

    infos = benchmark.pedantic(run, rounds=10, warmup_rounds=1)
    assert len(infos) == PLAN_TENSORS and infos[-1].shape == (2, 2)
    RESULTS["plan ckptmap SafetensorsFile.infos"] = benchmark.stats.stats.min


@pytest.mark.benchmark(group=PLAN)
def test_plan_ckptmap_columns(benchmark, files) -> None:
    path = files[1]
    benchmark.extra_info["impl"] = "ckptmap"

    def run() -> tuple[list[str], list[str], list[tuple[int, ...]], list[int]]:
        with SafetensorsFile(path) as f:
            return f.names, f.dtypes, f.shapes, f.sizes

    names, _, shapes, sizes = benchmark.pedantic(run, rounds=10, warmup_rounds=1)
    assert len(names) == PLAN_TENSORS and shapes[-1] == (2, 2) and sizes[-1] == 8
    RESULTS["plan ckptmap SafetensorsFile columns"] = benchmark.stats.stats.min


@pytest.mark.benchmark(group=PLAN)
def test_plan_ckptmap_core_header(benchmark, files) -> None:
    path = files[1]
    benchmark.extra_info["impl"] = "ckptmap"

    def run() -> tuple[list[str], list[tuple[int, ...]], list[str]]:
        h = SafetensorsHeader.open(path)
        return h.names, h.shapes, h.dtypes

    names, shapes, _ = benchmark.pedantic(run, rounds=10, warmup_rounds=1)
    assert len(names) == PLAN_TENSORS and shapes[-1] == (2, 2)
    RESULTS["plan ckptmap SafetensorsHeader"] = benchmark.stats.stats.min


@pytest.mark.benchmark(group=PLAN)
def test_plan_safetensors_safe_open(benchmark, files) -> None:
    path = files[1]
    benchmark.extra_info["impl"] = "safetensors"

    def run() -> tuple[list[str], list[list[int]], list[str]]:
        with safe_open(str(path), "pt") as f:
            names = list(f.keys())
            slices = [f.get_slice(n) for n in names]
            return names, [s.get_shape() for s in slices], [s.get_dtype() for s in slices]

    names, shapes, _ = benchmark.pedantic(run, rounds=5, warmup_rounds=1)
    assert len(names) == PLAN_TENSORS and shapes[-1] == [2, 2]
    RESULTS["plan safetensors safe_open"] = benchmark.stats.stats.min


def test_zz_summary(files, capsys) -> None:
    r = RESULTS
    if len(r) < 9:
        pytest.skip("run the whole module for the summary")
    full = r["full ckptmap reader+load_into"]
    lines = [
        "",
        f"{'scenario':<58}{'seconds':>10}",
        *(f"{k:<58}{v:>10.4f}" for k, v in r.items() if "share" not in k),
        "",
        "full load, ckptmap reader+load_into / safetensors load_model: "
        f"{r['full ckptmap reader+load_into'] / r['full safetensors load_model']:.2f}x "
        "(goal <= 1.2x)",
        f"prefix load / ckptmap full load: {r['prefix ckptmap'] / full:.3f}x (goal <= 0.2x)",
        f"prefix load, ckptmap / safetensors: {r['prefix ckptmap'] / r['prefix safetensors']:.2f}x",
        f"prefix load from a cold cache read {r['prefix cold read share']:.1%} of the data pages",
        "plan, SafetensorsFile.infos / safe_open: "
        f"{r['plan ckptmap SafetensorsFile.infos'] / r['plan safetensors safe_open']:.3f}x",
        "plan, SafetensorsFile columns / safe_open: "
        f"{r['plan ckptmap SafetensorsFile columns'] / r['plan safetensors safe_open']:.3f}x",
        "plan, SafetensorsHeader / safe_open: "
        f"{r['plan ckptmap SafetensorsHeader'] / r['plan safetensors safe_open']:.3f}x",
    ]
    if "full ckptmap load_checkpoint" in r:
        lines.append(
            "full load, ckptmap load_checkpoint / safetensors load_model: "
            f"{r['full ckptmap load_checkpoint'] / r['full safetensors load_model']:.2f}x"
        )
    with capsys.disabled():
        print("\n".join(lines))
