"""The torch zip reader end to end: ``load_checkpoint`` of a 49k-tensor ``.pth`` and ``ckptmap
inspect`` of a 100k-tensor one, side by side with mmengine and torch.

Run with ``python benches/report.py`` (or ``pytest benches/test_bench_pth_reader.py
--benchmark-enable``; skipped otherwise). Two groups, every side with the same rounds:

- ``load_checkpoint`` of the MoE checkpoint of ``test_bench_load`` (4 layers x 4096 experts of
  three bias-free ``Linear(4, 4)``, plus 8 BatchNorms and a head: 49,194 tensors, 24 MiB) saved
  as a DistributedDataParallel checkpoint (every key under ``module.``, ``_metadata`` kept,
  a ``meta`` entry), into a model built once outside the timing:

  - ``ckptmap``: ``ckptmap.load_checkpoint(model, path)`` (the Rust reader, then the key
    rules, then ckptmap's ``load_state_dict``);
  - ``mmengine``: ``mmengine.runner.checkpoint.load_checkpoint(model, path)``;
  - ``torch``: ``torch.load(path, weights_only=True)`` then ckptmap's loading of that
    checkpoint (``_load_checkpoint_to_model``: the same key rules and ``load_state_dict``), so
    the ratio is the reader's gain alone.

- ``ckptmap inspect`` of a checkpoint of 100,000 tiny tensors:

  - ``ckptmap``: ``inspect_checkpoint`` (the reader's table, from ``data.pkl`` alone);
  - ``torch``: the same summary built as before the reader existed: ``torch.load(mmap=True,
    weights_only=True)`` and a walk of the tensors (``inspect_checkpoint`` with the reader
    switched off).

Copies run on one thread for every loader (see ``test_bench_load``). Goals (issue 11): at
least 30x mmengine and 10x torch on the first, 20x on the second. ``--small`` runs 256
experts per layer and 10,000 tensors.
"""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Any

import pytest
import torch
from harness import Rounds, Side, require_enabled, sized, timed
from torch import nn

EXPERTS = sized(4096, 256)
TENSORS = 4 * EXPERTS * 3 + 42
MANY = sized(100_000, 10_000)
GROUP_LOAD = (
    f"MoE .pth read by the Rust reader: 4 layers x {EXPERTS:,} experts, {TENSORS:,} tensors, "
    "keys under `module.`"
)
GROUP_INSPECT = f"`ckptmap inspect` of a {MANY:,}-tensor .pth"
LOAD_ROUNDS = Rounds(sized(1, 2), 1)  # mmengine takes about 20 s per round at full size
INSPECT_ROUNDS = Rounds(sized(2, 3), 1)
SIDES = {
    "ckptmap": Side("ckptmap", "`load_checkpoint(model, f)`", "copy"),
    "torch": Side(
        "torch",
        "`torch.load(f, weights_only=True)` + ckptmap's `_load_checkpoint_to_model`",
        "copy",
        "torch reading: torch's restricted unpickler, then ckptmap's key rules and "
        "load_state_dict, so the ratio is the reader's alone",
    ),
    "mmengine": Side("mmengine", "`load_checkpoint(model, f)`", "copy"),
}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Expert(nn.Module):
    def __init__(self, d: int = 4) -> None:
        super().__init__()
        self.w1 = nn.Linear(d, d, bias=False)
        self.w2 = nn.Linear(d, d, bias=False)
        self.w3 = nn.Linear(d, d, bias=False)


class MoELayer(nn.Module):
    def __init__(self, experts: int) -> None:
        super().__init__()
        self.experts = nn.ModuleList(Expert() for _ in range(experts))


class MoE(nn.Module):
    """49,194 tensors at full size: 49,152 expert weights, 8 BatchNorms (40 tensors), a head
    (2)."""

    def __init__(self, layers: int = 4, experts: int = EXPERTS) -> None:
        super().__init__()
        self.layers = nn.ModuleList(MoELayer(experts) for _ in range(layers))
        self.norms = nn.ModuleList(nn.BatchNorm1d(4) for _ in range(8))
        self.head = nn.Linear(4, 4)


def build_model() -> MoE:
    with torch.device("meta"):
        model = MoE()
    return model.to_empty(device="cpu")


@pytest.fixture(scope="module")
def moe(request: pytest.FixtureRequest, tmp_path_factory) -> tuple[MoE, Path, dict[str, Any]]:
    require_enabled(request)
    model = build_model()
    torch.manual_seed(0)
    source = model.state_dict()
    state = collections.OrderedDict(
        (f"module.{k}", torch.randn_like(v) if v.is_floating_point() else torch.zeros_like(v))
        for k, v in source.items()
    )
    state._metadata = collections.OrderedDict(  # type: ignore[attr-defined]
        (f"module.{k}" if k else "module", v)
        for k, v in source._metadata.items()  # type: ignore[attr-defined]
    )
    path = tmp_path_factory.mktemp("moe") / "moe_ddp.pth"
    torch.save({"meta": {"epoch": 12, "iter": 48_000}, "state_dict": state}, path)
    assert len(state) == TENSORS
    expected = {k.removeprefix("module."): state[k] for k in list(state)[::997]}
    return model, path, expected


def load(impl: str, model: nn.Module, path: Path) -> None:
    if impl == "ckptmap":
        import ckptmap

        ckptmap.load_checkpoint(model, path, map_location="cpu", logger="silent")
    elif impl == "mmengine":
        from mmengine.runner.checkpoint import load_checkpoint

        load_checkpoint(model, str(path), map_location="cpu", logger="silent")
    elif impl == "torch":
        from ckptmap.checkpoint import _load_checkpoint_to_model

        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        _load_checkpoint_to_model(model, checkpoint, logger="silent")
    else:
        raise ValueError(impl)


@pytest.mark.benchmark(group=GROUP_LOAD)
@pytest.mark.parametrize("impl", ["ckptmap", "torch", "mmengine"])
def test_load_checkpoint_moe_pth(benchmark, moe, impl: str) -> None:
    model, path, expected = moe

    def zero() -> None:
        with torch.no_grad():
            for p in model.parameters():
                p.zero_()

    timed(benchmark, SIDES[impl], lambda: load(impl, model, path), LOAD_ROUNDS,
          kind="end to end", setup=zero)  # fmt: skip
    state = model.state_dict()
    for key, value in expected.items():
        assert torch.equal(state[key], value), key


# -- inspect -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def many(request: pytest.FixtureRequest, tmp_path_factory) -> Path:
    require_enabled(request)
    path = tmp_path_factory.mktemp("inspect") / "many.pth"
    state = {f"blocks.{i // 100}.part.{i % 100}.weight": torch.ones(4) for i in range(MANY)}
    torch.save({"state_dict": state, "meta": {"step": 1}}, path)
    return path


def inspect_before(path: Path) -> dict[str, Any]:
    """`inspect_checkpoint` as it ran before the reader: torch.load(mmap=True), then a walk."""
    from types import SimpleNamespace

    from ckptmap import opened
    from ckptmap.cli.summary import inspect_checkpoint
    from ckptmap.formats import load_file, pth
    from ckptmap.formats.sniff import Format

    def loaded(pth_file: Any, looks_like: str, map_location: Any, options: dict) -> Any:
        obj = load_file(pth_file.path, map_location, **options)
        return opened._Loaded(obj, pth_file.path, Format.TORCH_ZIP, looks_like, header_only=True)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(pth, "PthFile", lambda path, **kwargs: SimpleNamespace(path=path))
        m.setattr(pth, "load_fast", lambda *args, **kwargs: pth.FALLBACK)
        m.setattr(opened, "_TorchZip", loaded)
        return inspect_checkpoint(path)


@pytest.mark.benchmark(group=GROUP_INSPECT)
@pytest.mark.parametrize("impl", ["ckptmap", "torch"])
def test_inspect_100k_pth(benchmark, many: Path, impl: str) -> None:
    from ckptmap.cli.summary import inspect_checkpoint

    if impl == "ckptmap":
        side = Side("ckptmap", "`inspect_checkpoint(f)`: the reader's table", "summary")
        fn = inspect_checkpoint
    else:
        side = Side(
            "torch",
            "`inspect_checkpoint(f)` as before the reader: `torch.load(mmap=True)`, then a walk",
            "summary",
        )
        fn = inspect_before
    summary = timed(benchmark, side, lambda: fn(many), INSPECT_ROUNDS, kind="format")
    assert summary["tensor_count"] == MANY and summary["total_bytes"] == 16 * MANY
    assert summary == inspect_before(many)
