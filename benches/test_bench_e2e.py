"""End to end: a checkpoint file loaded into a model built beforehand, beside mmengine and torch.

Run with ``python benches/report.py`` (or ``pytest benches/test_bench_e2e.py
--benchmark-enable``; skipped otherwise). What is timed is the call a user makes, from the path
to the loaded model; building the model is not timed. Files are read from a warm page cache.

Two checkpoints, each written by the real tools as a ``.pth`` (``torch.save`` of
``{"meta": ..., "state_dict": ...}``, as mmengine's ``save_checkpoint`` writes) and as its
safetensors twin (``safetensors.torch.save_file`` of the state dict):

- ``moe``: the mixture-of-experts model of ``ckptmap demo --size large`` (4 layers x 4096
  experts of three bias-free projections, BatchNorms, auxiliary heads): about 49k small
  tensors, saved from DistributedDataParallel (every key under ``module.``).
- ``dense``: 256 ``Linear(1024, 2048)``, 2 GiB in 512 tensors, no prefix.

Each side loads with the same semantics as the rows it is compared with:

- ``copy`` rows copy into the model's existing parameters: ckptmap ``load_checkpoint``,
  mmengine ``load_checkpoint``, and torch's best practice ``torch.load(f, mmap=True,
  weights_only=True)`` + ``model.load_state_dict(sd)`` (safetensors: ``load_file`` +
  ``load_state_dict``); the ``module.`` prefix is stripped by each library's own default or,
  for torch, by ``consume_prefix_in_state_dict_if_present``.
- ``assign`` rows make the parameters the loaded tensors (``assign=True``; mmengine has no
  such mode).

Before every round (not timed) the model gets its original parameter objects back, zeroed,
so that after the last round the test can check that every tensor holds the file's values.
Copies run on one thread for every side (``torch.set_num_threads(1)``): on a shared 2-core
machine a copy split over two threads stalls whenever the other core is busy.

For the dense checkpoint, each side's peak memory is measured once more in a fresh process
(`harness.peak_memory`): mmengine reads the whole file into memory first; mmap-based readers
add file pages (RSS), not anonymous memory.
"""

from __future__ import annotations

import sys
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from harness import Rounds, Side, child_memory, peak_memory, require_enabled, sized, timed
from torch import nn
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

import ckptmap
from ckptmap.cli.demo_model import SIZES, DemoSize, FakeDDP
from ckptmap.cli.demo_model import Model as MoEModel
from ckptmap.cli.demo_model import build_model as build_moe

ROUNDS = {"moe": Rounds(2, 1), "dense": Rounds(3, 1)}
MOE_SIZE = sized(SIZES["large"], DemoSize(layers=4, experts=256, dim=32, hidden=64))
DENSE_LAYERS = sized(256, 16)
IN_FEATURES, OUT_FEATURES = 1024, 2048


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- the models and their files ------------------------------------------------------------------


class Dense(nn.Module):
    def __init__(self, layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(IN_FEATURES, OUT_FEATURES) for _ in range(layers))


def make_dense() -> Dense:
    """Allocated, resident parameters, without paying for initialisation."""
    with torch.device("meta"):
        model = Dense(DENSE_LAYERS)
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    return model


def make_moe() -> nn.Module:
    return build_moe(lambda: MoEModel(MOE_SIZE), seed=1)


MAKERS: dict[str, Callable[[], nn.Module]] = {"moe": make_moe, "dense": make_dense}
PREFIX = {"moe": "module.", "dense": ""}


def write_files(scenario: str, directory: Path) -> tuple[Path, Path]:
    """The scenario's ``.pth`` and ``.safetensors``, written by torch and safetensors."""
    from safetensors.torch import save_file

    if scenario == "moe":
        state = build_moe(lambda: FakeDDP(MoEModel(MOE_SIZE)), seed=0).state_dict()
    else:
        torch.manual_seed(0)
        state = OrderedDict((k, torch.rand(v.shape)) for k, v in make_dense().state_dict().items())
    pth, st = directory / f"{scenario}.pth", directory / f"{scenario}.safetensors"
    torch.save({"meta": {"epoch": 12, "iter": 120_000}, "state_dict": state}, pth)
    save_file(dict(state), str(st))
    return pth, st


def describe(scenario: str, fmt: str, expected: dict[str, torch.Tensor]) -> str:
    """The group name: the checkpoint as a reader of the report needs to know it."""
    nbytes = sum(t.numel() * t.element_size() for t in expected.values())
    size = f"{nbytes / 2**30:.1f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.0f} MiB"
    if scenario == "moe":
        s = MOE_SIZE
        return (
            f"MoE {fmt}: {s.layers} layers x {s.experts:,} experts, {len(expected):,} tensors, "
            f"{size}, keys under `module.`"
        )
    return f"dense {fmt}: {DENSE_LAYERS} Linear(1024, 2048), {len(expected):,} tensors, {size}"


# --- the sides -----------------------------------------------------------------------------------


def _torch_state(path: str, prefix: str) -> Any:
    sd = torch.load(path, mmap=True, weights_only=True)["state_dict"]
    if prefix:
        consume_prefix_in_state_dict_if_present(sd, prefix)
    return sd


def _safetensors_state(path: str, prefix: str) -> Any:
    from safetensors.torch import load_file

    sd = OrderedDict(load_file(path))
    if prefix:
        consume_prefix_in_state_dict_if_present(sd, prefix)
    return sd


def _mmengine_load(model: nn.Module, path: str, prefix: str) -> None:
    from mmengine.runner.checkpoint import load_checkpoint

    load_checkpoint(model, path, map_location="cpu", logger="silent")


@dataclass(frozen=True)
class Loader:
    side: Side
    formats: tuple[str, ...]
    run: Callable[[nn.Module, str, str], Any]


TORCH_NOTE = (
    "torch: `torch.load(f, mmap=True, weights_only=True)['state_dict']`, the MoE's `module.` "
    "prefix stripped by `consume_prefix_in_state_dict_if_present`, then `model.load_state_dict`"
)
ST_NOTE = (
    "safetensors: `safetensors.torch.load_file(f)`, the prefix stripped as for torch, then "
    "`model.load_state_dict`"
)

LOADERS: dict[str, Loader] = {
    "ckptmap-copy": Loader(
        Side("ckptmap", "`load_checkpoint(model, f)`", "copy"),
        (".pth", ".safetensors"),
        lambda m, p, _: ckptmap.load_checkpoint(m, p, map_location="cpu", logger="silent"),
    ),
    "ckptmap-assign": Loader(
        Side("ckptmap", "`load_checkpoint(model, f, assign=True)`", "assign"),
        (".pth", ".safetensors"),
        lambda m, p, _: ckptmap.load_checkpoint(
            m, p, map_location="cpu", logger="silent", assign=True
        ),
    ),
    "mmengine-copy": Loader(
        Side("mmengine", "`load_checkpoint(model, f)`", "copy"), (".pth",), _mmengine_load
    ),
    "torch-copy": Loader(
        Side("torch", "`torch.load(mmap=True)` + `load_state_dict(sd)`", "copy", TORCH_NOTE),
        (".pth",),
        lambda m, p, prefix: m.load_state_dict(_torch_state(p, prefix)),
    ),
    "torch-assign": Loader(
        Side(
            "torch",
            "`torch.load(mmap=True)` + `load_state_dict(sd, assign=True)`",
            "assign",
            TORCH_NOTE,
        ),
        (".pth",),
        lambda m, p, prefix: m.load_state_dict(_torch_state(p, prefix), assign=True),
    ),
    "safetensors-copy": Loader(
        Side("safetensors", "`load_file(f)` + `load_state_dict(sd)`", "copy", ST_NOTE),
        (".safetensors",),
        lambda m, p, prefix: m.load_state_dict(_safetensors_state(p, prefix)),
    ),
    "safetensors-assign": Loader(
        Side(
            "safetensors", "`load_file(f)` + `load_state_dict(sd, assign=True)`", "assign", ST_NOTE
        ),
        (".safetensors",),
        lambda m, p, prefix: m.load_state_dict(_safetensors_state(p, prefix), assign=True),
    ),
}


# --- the benchmark -------------------------------------------------------------------------------


class Target:
    """A built model, its original tensors, and the values a load must leave in it."""

    def __init__(self, scenario: str, pth: Path, st: Path) -> None:
        self.scenario = scenario
        self.files = {".pth": pth, ".safetensors": st}
        self.model = MAKERS[scenario]()
        self.saved = [(m, dict(m._parameters), dict(m._buffers)) for m in self.model.modules()]
        self.params = list(self.model.parameters())
        self.tensors = [*self.params, *self.model.buffers()]
        # The reference values, read by torch (memory-mapped: pages are read when compared).
        self.expected = _torch_state(str(pth), PREFIX[scenario])
        self.groups = {fmt: describe(scenario, fmt, self.expected) for fmt in self.files}

    def reset(self) -> None:
        """The original parameter objects back (an assign replaced them), zeroed."""
        for module, params, buffers in self.saved:
            module._parameters.clear()
            module._parameters.update(params)
            module._buffers.clear()
            module._buffers.update(buffers)
        with torch.no_grad():
            torch._foreach_zero_(self.tensors)

    def check(self, assigned: bool) -> None:
        """Every tensor holds the file's values; assigned or copied as the row claims."""
        state = self.model.state_dict()
        assert list(state) == list(self.expected)
        for name, value in state.items():
            assert torch.equal(value, self.expected[name]), name
        originals = {id(p) for p in self.params}
        kept = [id(p) in originals for p in self.model.parameters()]
        assert not any(kept) if assigned else all(kept)


@pytest.fixture(scope="module")
def moe(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Target:
    require_enabled(request)
    return Target("moe", *write_files("moe", tmp_path_factory.mktemp("moe")))


@pytest.fixture(scope="module")
def dense(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Target:
    require_enabled(request)
    return Target("dense", *write_files("dense", tmp_path_factory.mktemp("dense")))


def run(benchmark: Any, target: Target, fmt: str, loader_id: str, memory: bool) -> None:
    loader = LOADERS[loader_id]
    if loader.side.impl == "mmengine":
        pytest.importorskip("mmengine.runner.checkpoint")
    benchmark.group = target.groups[fmt]
    path = str(target.files[fmt])
    prefix = PREFIX[target.scenario]
    extra = {}
    if memory:
        extra = child_memory(__file__, target.scenario, loader_id, path)
    timed(
        benchmark,
        loader.side,
        lambda: loader.run(target.model, path, prefix),
        ROUNDS[target.scenario],
        kind="end to end",
        setup=target.reset,
        **extra,
    )
    target.check(assigned=loader.side.semantics == "assign")
    target.reset()  # drops the last round's tensors (and their maps)


def cases(fmt: str) -> list[str]:
    return [name for name, loader in LOADERS.items() if fmt in loader.formats]


@pytest.mark.parametrize("loader_id", cases(".pth"))
def test_moe_pth(benchmark, moe, loader_id):
    run(benchmark, moe, ".pth", loader_id, memory=False)


@pytest.mark.parametrize("loader_id", cases(".safetensors"))
def test_moe_safetensors(benchmark, moe, loader_id):
    run(benchmark, moe, ".safetensors", loader_id, memory=False)


@pytest.mark.parametrize("loader_id", cases(".pth"))
def test_dense_pth(benchmark, dense, loader_id):
    run(benchmark, dense, ".pth", loader_id, memory=True)


@pytest.mark.parametrize("loader_id", cases(".safetensors"))
def test_dense_safetensors(benchmark, dense, loader_id):
    run(benchmark, dense, ".safetensors", loader_id, memory=True)


# --- the memory probe, in a fresh process --------------------------------------------------------


def _child(scenario: str, loader_id: str, path: str) -> dict[str, float]:
    torch.set_num_threads(1)
    loader = LOADERS[loader_id]
    prefix = PREFIX[scenario]
    loader.run(MAKERS[scenario](), path, prefix)  # imports and lazy initialisation, not measured
    return peak_memory(MAKERS[scenario], lambda model: loader.run(model, path, prefix))


if __name__ == "__main__":
    import json

    if sys.argv[1:2] != ["--memory"]:
        raise SystemExit("usage: test_bench_e2e.py --memory SCENARIO LOADER PATH")
    print(json.dumps(_child(*sys.argv[2:5])))
