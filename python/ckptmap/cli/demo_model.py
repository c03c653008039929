"""The demo's synthetic mixture-of-experts model, its rules and its keys.

Shared by ``ckptmap demo`` and the benchmarks (``benches/``), so that the demo shows, at a
smaller size, the checkpoint the end-to-end benchmark measures.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "DEMO_RULES",
    "SIZES",
    "Backbone",
    "DemoSize",
    "FakeDDP",
    "Model",
    "build_model",
    "synthetic_keys",
]

#: The rules that load the training checkpoint into the inference model: strip the
#: DistributedDataParallel prefix, rename ``backbone`` to ``encoder`` and ``w1``..``w3`` to
#: ``proj1``..``proj3``.
DEMO_RULES: list[tuple[str, str]] = [
    (r"^module\.", ""),
    (r"^backbone\.", "encoder."),
    (r"\.w(\d)\.", r".proj\1."),
]

VOCAB = 1000


@dataclass(frozen=True)
class DemoSize:
    """The synthetic model's shape."""

    layers: int
    experts: int
    dim: int
    hidden: int


#: ``--size`` presets. medium (the demo's default) runs in well under 20 s on a quiet 2-core
#: machine, mmengine and torch included; large is the 49k-tensor model of the end-to-end
#: benchmark (benches/test_bench_e2e.py), whose baselines alone take half a minute.
SIZES: dict[str, DemoSize] = {
    "tiny": DemoSize(layers=2, experts=8, dim=8, hidden=16),
    "small": DemoSize(layers=4, experts=256, dim=32, hidden=64),
    "medium": DemoSize(layers=4, experts=1024, dim=32, hidden=64),
    "large": DemoSize(layers=4, experts=4096, dim=32, hidden=64),
}


class Expert(nn.Module):
    def __init__(self, dim: int, hidden: int, names: Sequence[str]) -> None:
        super().__init__()
        for i, name in enumerate(names):
            shape = (dim, hidden) if i == 1 else (hidden, dim)
            self.add_module(name, nn.Linear(shape[1], shape[0], bias=False))


class Layer(nn.Module):
    def __init__(self, size: DemoSize, names: Sequence[str], aux: bool) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(size.dim)
        self.experts = nn.ModuleList(
            Expert(size.dim, size.hidden, names) for _ in range(size.experts)
        )
        if aux:  # a training-only auxiliary head: unexpected in the inference model
            self.aux = nn.Linear(size.dim, 8)


class Backbone(nn.Module):
    def __init__(self, size: DemoSize, names: Sequence[str] = ("w1", "w2", "w3"), aux=True):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, size.dim)
        self.layers = nn.ModuleList(Layer(size, names, aux) for _ in range(size.layers))


class Model(nn.Module):
    """The model: ``backbone`` + ``head`` (training) or ``encoder`` + ``head`` (inference)."""

    def __init__(self, size: DemoSize, *, inference: bool = False) -> None:
        super().__init__()
        names = ("proj1", "proj2", "proj3") if inference else ("w1", "w2", "w3")
        self.add_module(
            "encoder" if inference else "backbone", Backbone(size, names, aux=not inference)
        )
        self.head = nn.Linear(size.dim, VOCAB)


class FakeDDP(nn.Module):
    """What DistributedDataParallel's state dict looks like: everything under ``module.``."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module


def build_model(factory: Callable[[], nn.Module], seed: int) -> nn.Module:
    """Builds a model on the CPU with torch's own init under `seed` (faster than building on
    the meta device and filling it, for many small modules); BatchNorm buffers get values too,
    so that loading them is checked as well."""
    torch.manual_seed(seed)
    model = factory()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm1d):
                module.running_mean.uniform_(-1, 1, generator=generator)  # type: ignore[union-attr]
                module.running_var.uniform_(0.5, 1.5, generator=generator)  # type: ignore[union-attr]
                module.num_batches_tracked.fill_(seed + 7)  # type: ignore[union-attr]
    return model


def synthetic_keys(count: int) -> list[str]:
    """Keys shaped like a mixture-of-experts model wrapped in DistributedDataParallel."""
    experts = 256
    per_layer = experts * 3
    layers = max(1, -(-count // per_layer))
    keys = [
        f"module.backbone.layers.{layer}.experts.{expert}.w{w}.weight"
        for layer in range(layers)
        for expert in range(experts)
        for w in (1, 2, 3)
    ]
    return keys[:count]
