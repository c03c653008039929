"""Key work: `load_state_dict` of an in-memory state dict, ckptmap vs mmengine vs torch.

Run with ``python benches/report.py`` (or ``pytest benches/test_bench_load.py
--benchmark-enable``; skipped otherwise). No file is read: these rows time what grows with the
number of keys and modules, not a load from disk (``test_bench_e2e.py`` has those). Three
scenarios, each one benchmark group:

- 4 layers x 4096 experts of three bias-free Linear(4, 4): 49,152 tiny tensors in 65,546
  modules. torch and mmengine hand every child a dict filtered from its parent's, so each
  4096-wide ModuleList costs 4096 scans of 12,288 keys.
- 64 layers x 256 experts: as many keys, less wide (256 scans of 768 keys per layer).
- A ResNet-50-shaped model (320 keys, 25.6M parameters, 53 BatchNorms).

Copies run on one thread (`torch.set_num_threads(1)`) for every loader: on a shared 2-core
machine a large copy split over two OpenMP threads stalls whenever the second core is busy
(about 270 ms instead of 10 ms for ResNet-50's 100 MB), which swamps what is measured here. All
loaders use the same copy kernel, so the comparison stays fair.

Every state dict has the same small damage (two keys dropped, two unexpected ones, one shape
mismatch), so every loader also produces its report. After timing, each test checks that the
model ends exactly as expected, and ckptmap's flat message is compared with mmengine's. Every
side of a group runs the same timed and warm-up rounds.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import pytest
import torch
from harness import Rounds, Side, require_enabled, sized, timed
from torch import nn

from ckptmap.module_load import load_state_dict

mm_checkpoint = pytest.importorskip("mmengine.runner.checkpoint")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- models ---------------------------------------------------------------------------------


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
    def __init__(self, layers: int, experts: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(MoELayer(experts) for _ in range(layers))


class Bottleneck(nn.Module):
    def __init__(self, cin: int, width: int, stride: int, downsample: bool) -> None:
        super().__init__()
        cout = width * 4
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        if downsample:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )


class ResNet50(nn.Module):
    """torchvision's resnet50 module tree and shapes (torchvision is not a dependency)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = 64
        for i, (blocks, width) in enumerate([(3, 64), (4, 128), (6, 256), (3, 512)]):
            layer = []
            for b in range(blocks):
                stride = 2 if b == 0 and i > 0 else 1
                layer.append(Bottleneck(cin, width, stride, downsample=b == 0))
                cin = width * 4
            self.add_module(f"layer{i + 1}", nn.Sequential(*layer))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2048, 1000)


# --- scenarios ------------------------------------------------------------------------------


class Scenario:
    """A model, a damaged state dict for it, and the state the model must end in."""

    def __init__(self, make: Callable[[], nn.Module]) -> None:
        torch.manual_seed(0)
        self.model = make()
        with torch.no_grad():
            sd = OrderedDict(
                (k, v.clone() + 1 if v.is_floating_point() else v.clone())
                for k, v in self.model.state_dict().items()
            )
        keys = [k for k, v in sd.items() if v.is_floating_point()]
        sd._metadata = self.model.state_dict()._metadata  # type: ignore[attr-defined]
        self.dropped = [keys[1], keys[-2]]
        for key in self.dropped:
            del sd[key]
        self.mismatched = keys[len(keys) // 2]
        sd[self.mismatched] = torch.zeros(sd[self.mismatched].numel() + 1)
        sd["layers_extra.weight"] = torch.zeros(1)
        sd[f"{keys[0].rsplit('.', 1)[0]}.stale_buffer"] = torch.zeros(1)
        self.state_dict = sd
        self.initial = {k: v.clone() for k, v in self.model.state_dict().items()}
        self.expected = {
            k: sd[k] if k in sd and k != self.mismatched else v for k, v in self.initial.items()
        }

    def reset(self) -> None:
        """Puts the model back as it was before the first load (not timed)."""
        with torch.no_grad():
            for key, value in self.model.state_dict().items():
                value.copy_(self.initial[key])

    def check(self) -> None:
        for key, value in self.model.state_dict().items():
            assert torch.equal(value, self.expected[key]), key


def _grab(logger_name: str) -> tuple[logging.Logger, list[str]]:
    records: list[str] = []

    class Grab(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    logger = logging.getLogger(logger_name)
    logger.handlers[:] = [Grab()]
    logger.propagate = False
    return logger, records


def _torch_load(model: nn.Module, sd: Any) -> None:
    try:
        model.load_state_dict(sd, strict=False)
    except RuntimeError as err:  # torch raises on the shape mismatch, after loading the rest
        assert "size mismatch" in str(err)


SIDES = {
    "ckptmap": Side("ckptmap", "`load_state_dict(model, sd)`", "copy"),
    "ckptmap-recursive": Side(
        "ckptmap",
        "`load_state_dict(model, sd, fast=False)`",
        "copy",
        "`fast=False`: ckptmap's module walk alone, one `_load_from_state_dict` call per "
        "module, without batching the copies of stock modules",
    ),
    "mmengine": Side("mmengine", "`load_state_dict(model, sd)`", "copy"),
    "torch": Side("torch", "`model.load_state_dict(sd, strict=False)`", "copy"),
}


def run(benchmark, scenario: Scenario, impl: str, rounds: Rounds) -> None:
    sd = scenario.state_dict
    model = scenario.model
    benchmark.extra_info["keys"] = len(sd)
    # Both libraries log their report, to a logger that keeps the messages.
    if impl == "ckptmap":
        ours_logger, _ = _grab("bench.ckptmap")
        fn: Callable[[], Any] = lambda: load_state_dict(model, sd, logger=ours_logger)  # noqa: E731
    elif impl == "ckptmap-recursive":
        ours_logger, _ = _grab("bench.ckptmap")
        fn = lambda: load_state_dict(model, sd, logger=ours_logger, fast=False)  # noqa: E731
    elif impl == "mmengine":
        logger, records = _grab("bench.mmengine")
        fn = lambda: mm_checkpoint.load_state_dict(model, sd, logger=logger)  # noqa: E731
    else:
        fn = lambda: _torch_load(model, sd)  # noqa: E731
    timed(benchmark, SIDES[impl], fn, rounds, kind="key work", setup=scenario.reset)
    scenario.check()
    if impl == "mmengine":
        ours = load_state_dict(model, sd, logger="silent", report="flat")
        assert records and records[-1] == ours.report("flat")
    elif impl.startswith("ckptmap"):
        result = load_state_dict(model, sd, logger="silent")
        assert sorted(result.missing_keys) == sorted(scenario.dropped)
        assert [m.name for m in result.mismatched] == [scenario.mismatched]
        assert len(result.unexpected_keys) == 2


IMPLS = list(SIDES)
WIDE = sized((4, 4096), (4, 256))
DEEP = sized((64, 256), (8, 256))


@pytest.fixture(scope="module")
def moe_wide(request: pytest.FixtureRequest) -> Scenario:
    require_enabled(request)
    return Scenario(lambda: MoE(*WIDE))


@pytest.fixture(scope="module")
def moe_deep(request: pytest.FixtureRequest) -> Scenario:
    require_enabled(request)
    return Scenario(lambda: MoE(*DEEP))


@pytest.fixture(scope="module")
def resnet50(request: pytest.FixtureRequest) -> Scenario:
    require_enabled(request)
    return Scenario(ResNet50)


def _group(layers: int, experts: int) -> str:
    return (
        f"load_state_dict: {layers} layers x {experts:,} experts of 3 Linear(4, 4), "
        f"{layers * experts * 3:,} tensors"
    )


@pytest.mark.benchmark(group=_group(*WIDE))
@pytest.mark.parametrize("impl", IMPLS)
def test_load_moe_wide(benchmark, moe_wide, impl):
    run(benchmark, moe_wide, impl, Rounds(2, 1))


@pytest.mark.benchmark(group=_group(*DEEP))
@pytest.mark.parametrize("impl", IMPLS)
def test_load_moe_deep(benchmark, moe_deep, impl):
    run(benchmark, moe_deep, impl, Rounds(5, 1))


@pytest.mark.benchmark(group="load_state_dict: ResNet-50 (320 keys, 25.6M parameters)")
@pytest.mark.parametrize("impl", IMPLS)
def test_load_resnet50(benchmark, resnet50, impl):
    run(benchmark, resnet50, impl, Rounds(20, 2))
