"""One format's reader: a prefix load of a safetensors file, and the header plan of 100k tensors.

Run with ``python benches/report.py`` (or ``pytest benches/test_bench_safetensors.py
--benchmark-enable``; skipped otherwise). Files live in a temporary directory and are read
from a warm page cache. Full loads of a safetensors file into a model are end-to-end rows
(``test_bench_e2e.py``).

- prefix load: the ``head.`` tensors only (13 of 128 ``Linear(1024, 2048)`` layers, 10% of a
  1 GiB file) into the model's ``head``, copying. ckptmap: ``_load_checkpoint_with_prefix``
  + ``load_state_dict``; safetensors: ``safe_open`` and ``get_tensor`` for the same names,
  then torch's ``load_state_dict``. The ckptmap row also records the share of the file's data
  pages such a load reads from a cold cache (``mincore`` after ``POSIX_FADV_DONTNEED``).
- plan: names, dtypes and shapes of a 100k-tensor file, from its header. ckptmap:
  ``open_checkpoint(f).entries()``; safetensors: ``safe_open``, ``keys()``, then
  ``get_slice(name)`` ``.get_shape()`` / ``.get_dtype()``.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import struct
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch
from harness import Rounds, Side, require_enabled, sized, timed
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import ckptmap

IN_FEATURES, OUT_FEATURES = 1024, 2048
HEAD, BODY = sized((13, 115), (2, 14))  # 10% of the layers (and bytes) under "head."
PLAN_TENSORS = sized(100_000, 10_000)
ROUNDS = Rounds(5, 1)
MIB = (HEAD + BODY) * (IN_FEATURES + 1) * OUT_FEATURES * 4 // 2**20
PREFIX = f"prefix load: `head.` of a {MIB:,} MiB file ({HEAD} of {HEAD + BODY} layers)"
PLAN = f"header plan of a {PLAN_TENSORS:,}-tensor file"


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
    require_enabled(request)
    root = tmp_path_factory.mktemp("safetensors")
    model_path = root / "model.safetensors"
    torch.manual_seed(0)
    state = {k: torch.randn_like(v) for k, v in make_model().state_dict().items()}
    save_file(state, str(model_path))
    del state
    plan_path = root / "plan.safetensors"
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


def zero_head(model: Model) -> None:
    with torch.no_grad():
        for p in model.head.parameters():
            p.zero_()


def check_head(model: Model, path: Path) -> None:
    with safe_open(str(path), "pt") as f:
        for name in f.keys():
            if name.startswith("head."):
                assert torch.equal(model.get_parameter(name), f.get_tensor(name)), name


# --- prefix load -------------------------------------------------------------------------------


@pytest.mark.benchmark(group=PREFIX)
def test_prefix_ckptmap(benchmark, files, model) -> None:
    path = files[0]
    side = Side(
        "ckptmap", "`load_state_dict(model.head, _load_checkpoint_with_prefix('head', f))`", "copy"
    )

    def run() -> None:
        sd = ckptmap._load_checkpoint_with_prefix("head", path)
        ckptmap.load_state_dict(model.head, sd, strict=True)

    share = cold_read_share(path)
    timed(benchmark, side, run, ROUNDS, kind="format", setup=lambda: zero_head(model))
    benchmark.extra_info["note"] = (
        f"prefix load: from a cold page cache, ckptmap's read {share:.0%} of the file's data "
        f"pages ({HEAD} of {HEAD + BODY} layers asked for)"
    )
    check_head(model, path)


@pytest.mark.benchmark(group=PREFIX)
def test_prefix_safetensors(benchmark, files, model) -> None:
    path = files[0]
    side = Side(
        "safetensors",
        "`safe_open(f)`, `get_tensor` of each `head.` key, `model.head.load_state_dict(sd)`",
        "copy",
    )

    def run() -> None:
        with safe_open(str(path), "pt") as f:
            sd = OrderedDict(
                (k.removeprefix("head."), f.get_tensor(k))
                for k in f.keys()
                if k.startswith("head.")
            )
        model.head.load_state_dict(sd)

    timed(benchmark, side, run, ROUNDS, kind="format", setup=lambda: zero_head(model))
    check_head(model, path)


def cold_read_share(path: Path) -> float:
    """The share of the data pages a prefix load reads from a cold cache; the file is read
    whole again afterwards, so the timed rows find it warm."""
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    target = make_model()
    sd = ckptmap._load_checkpoint_with_prefix("head", path)
    ckptmap.load_state_dict(target.head, sd, strict=True)
    with path.open("rb") as f:
        start = 8 + struct.unpack("<Q", f.read(8))[0]  # where the tensor data begins
    share = resident(path, start)
    path.read_bytes()
    return share


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
def test_plan_ckptmap(benchmark, files) -> None:
    path = files[1]
    side = Side("ckptmap", "`open_checkpoint(f).entries()`", "header")

    def run() -> list[Any]:
        with ckptmap.open_checkpoint(path) as ckpt:
            return ckpt.entries()

    entries = timed(benchmark, side, run, ROUNDS, kind="format")
    assert len(entries) == PLAN_TENSORS and entries[-1].shape == (2, 2)


@pytest.mark.benchmark(group=PLAN)
def test_plan_safetensors(benchmark, files) -> None:
    path = files[1]
    side = Side("safetensors", "`safe_open(f)`: `keys()`, `get_slice(k)` shape and dtype", "header")

    def run() -> tuple[list[str], list[list[int]], list[str]]:
        with safe_open(str(path), "pt") as f:
            names = list(f.keys())
            slices = [f.get_slice(n) for n in names]
            return names, [s.get_shape() for s in slices], [s.get_dtype() for s in slices]

    names, shapes, _ = timed(benchmark, side, run, ROUNDS, kind="format")
    assert len(names) == PLAN_TENSORS and shapes[-1] == [2, 2]
