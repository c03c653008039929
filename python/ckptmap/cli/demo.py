"""`ckptmap demo`: the main job on a synthetic large model, timed beside mmengine and torch.

A mixture-of-experts model (``layers`` x ``experts`` x three projections, BatchNorm layers,
auxiliary heads that the inference model does not have) is trained nowhere: its weights are
random. It is saved as a DistributedDataParallel checkpoint (every key under ``module.``, a
``meta`` entry), then loaded

- into the inference model with ``load_checkpoint(..., revise_keys=DEMO_RULES)``, which strips
  ``module.``, renames ``backbone`` to ``encoder`` and ``w1``..``w3`` to ``proj1``..``proj3``;
- into a bare backbone with ``_load_checkpoint_with_prefix("module.backbone", ...)``;

by ckptmap, by mmengine (when installed) and by torch's own path (``torch.load``, the seeds'
``re.sub`` loop, ``Module.load_state_dict``). Every loaded model is checked equal, parameter
by parameter, to the source weights; the command fails (exit 1) if one is not.

``ckptmap demo --keys N`` times the key rules alone on N synthetic keys against ``re.sub``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import re
import tempfile
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import nn

from ckptmap import __version__
from ckptmap._core import KeyRules
from ckptmap.cli.common import format_size
from ckptmap.revise import revise_keys

__all__ = [
    "DEMO_RULES",
    "SIZES",
    "DemoSize",
    "add_demo_parser",
    "build_model",
    "run_demo",
    "synthetic_keys",
]

T = TypeVar("T")

DEMO_RULES: list[tuple[str, str]] = [
    (r"^module\.", ""),
    (r"^backbone\.", "encoder."),
    (r"\.w(\d)\.", r".proj\1."),
]


@dataclass(frozen=True)
class DemoSize:
    """The synthetic model's shape."""

    layers: int
    experts: int
    dim: int
    hidden: int


#: ``--size`` presets. medium (the default) takes a few seconds on a 2-core machine, most of
#: them mmengine's; large is the 49k-key model of the design's reference numbers.
SIZES: dict[str, DemoSize] = {
    "tiny": DemoSize(layers=2, experts=8, dim=8, hidden=16),
    "small": DemoSize(layers=4, experts=256, dim=32, hidden=64),
    "medium": DemoSize(layers=4, experts=1024, dim=32, hidden=64),
    "large": DemoSize(layers=4, experts=4096, dim=32, hidden=64),
}

VOCAB = 1000


# --- the synthetic model ------------------------------------------------------------------------


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


# --- helpers ----------------------------------------------------------------------------------


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


def _best_of(repeat: int, fn: Callable[[], T]) -> tuple[float, T]:
    best, result = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result  # type: ignore[return-value]


def _re_sub_loop(keys: Sequence[str], rules: Sequence[tuple[str, str]]) -> list[str]:
    out = []
    for key in keys:
        for pattern, repl in rules:
            key = re.sub(pattern, repl, key)
        out.append(key)
    return out


def _seeds_revise(state_dict: dict[str, Any], rules: Sequence[tuple[str, str]]) -> OrderedDict:
    # What mmengine's `_load_checkpoint_to_model` does with `revise_keys`.
    for pattern, repl in rules:
        state_dict = OrderedDict({re.sub(pattern, repl, k): v for k, v in state_dict.items()})
    return state_dict  # type: ignore[return-value]


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.WARNING:
            self.messages.append(record.getMessage())


@contextlib.contextmanager
def _captured_logger() -> Iterator[tuple[logging.Logger, _Capture]]:
    logger = logging.getLogger("ckptmap.cli.demo")
    handler = _Capture()
    logger.addHandler(handler)
    old = logger.propagate, logger.level
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    try:
        yield logger, handler
    finally:
        logger.removeHandler(handler)
        logger.propagate, logger.level = old


def _mmengine() -> Any:
    """mmengine's checkpoint module, or None when mmengine is not installed."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from mmengine.runner import checkpoint  # type: ignore[import-untyped]
    except Exception:
        return None
    return checkpoint


def _equal(model: nn.Module, expected: dict[str, torch.Tensor]) -> bool:
    """Every tensor of `model`'s state is the expected one (keys it lacks were unexpected)."""
    state = model.state_dict()
    return bool(state) and all(
        name in expected and torch.equal(value, expected[name]) for name, value in state.items()
    )


def _timed(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> float:
    start = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - start


# --- the demo -----------------------------------------------------------------------------------


def run_keys_demo(args: argparse.Namespace) -> int:
    """The key rules alone on `args.keys` synthetic keys, beside ``re.sub``."""
    keys = synthetic_keys(args.keys)
    rules = KeyRules(DEMO_RULES)
    print(f"ckptmap {__version__} demo: {len(keys):,} keys like {keys[-1]!r}")
    for (pattern, repl), native in zip(DEMO_RULES, rules.native, strict=True):
        engine = "rust" if native else "python re"
        print(f"  rule {pattern!r} -> {repl!r}  [{engine}]")
    print()

    ours_s, ours = _best_of(args.repeat, lambda: rules.apply(keys))
    ref_s, ref = _best_of(1, lambda: _re_sub_loop(keys, DEMO_RULES))
    state_dict = OrderedDict((k, i) for i, k in enumerate(keys))
    revise_s, revised = _best_of(args.repeat, lambda: revise_keys(state_dict, rules))
    seeds_s, seeds = _best_of(1, lambda: _seeds_revise(state_dict, DEMO_RULES))

    rows = [
        ("KeyRules.apply(keys)", ours_s, ref_s, "re.sub loop"),
        ("revise_keys(state_dict)", revise_s, seeds_s, "seeds' dict comprehension"),
    ]
    for name, ours_t, ref_t, ref_name in rows:
        print(f"  {name:26s} {ours_t:8.3f} s   {ref_name}: {ref_t:.3f} s  ({ref_t / ours_t:.1f}x)")
    same = ours == ref and list(revised.state_dict.items()) == list(seeds.items())
    print()
    print(f"  results identical to re.sub: {'yes' if same else 'NO'}")
    print(f"  collisions: {len(revised.collisions)}")
    return 0 if same else 1


def parse_size_arg(text: str) -> DemoSize:
    """``--size``: a preset name, or a number of experts per layer (4 layers, 32 x 64)."""
    if text in SIZES:
        return SIZES[text]
    try:
        experts = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: use {', '.join(SIZES)} or a number of experts per layer"
        ) from None
    if experts < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: the number of experts must be positive")
    return DemoSize(layers=4, experts=experts, dim=32, hidden=64)


def run_demo(args: argparse.Namespace) -> int:
    """Runs ``ckptmap demo``; returns 0 when every loaded model equals the source weights."""
    if args.keys is not None:
        return run_keys_demo(args)
    size: DemoSize = args.size
    if args.layers is not None:
        size = DemoSize(args.layers, size.experts, size.dim, size.hidden)
    if args.experts is not None:
        size = DemoSize(size.layers, args.experts, size.dim, size.hidden)
    if args.keep is not None:
        os.makedirs(args.keep, exist_ok=True)
        return _run_demo_in(args.keep, size, args)
    with tempfile.TemporaryDirectory(prefix="ckptmap-demo-") as directory:
        return _run_demo_in(directory, size, args)


def _run_demo_in(directory: str, size: DemoSize, args: argparse.Namespace) -> int:
    import ckptmap

    started = time.perf_counter()
    state_dict = build_model(lambda: FakeDDP(Model(size)), seed=0).state_dict()
    nbytes = sum(t.numel() * t.element_size() for t in state_dict.values())
    print(
        f"ckptmap {__version__} demo: {size.layers} layers x {size.experts:,} experts "
        f"(dim {size.dim}, hidden {size.hidden}): {len(state_dict):,} tensors, "
        f"{format_size(nbytes)}"
    )
    path = os.path.join(directory, "epoch_12.pth")
    st_path = os.path.join(directory, "epoch_12.safetensors")
    checkpoint = {"meta": {"epoch": 12, "iter": 120_000, "seed": 0}, "state_dict": state_dict}
    save_s, _ = _best_of(1, lambda: ckptmap.save_checkpoint(checkpoint, path))
    ckptmap.save_checkpoint(checkpoint, st_path)
    print(f"  saved a DDP-style checkpoint ('module.' prefix, meta) in {save_s:.2f} s: {path}")
    print(f"  and the same as safetensors: {st_path}")
    rules = KeyRules(DEMO_RULES)
    for (pattern, repl), native in zip(DEMO_RULES, rules.native, strict=True):
        print(f"  rule {pattern!r} -> {repl!r}  [{'rust' if native else 'python re'}]")

    # What every loaded model must hold: the source weights under their revised names.
    expected = dict(zip(rules.apply(list(state_dict)), state_dict.values(), strict=True))
    backbone_expected = {
        k.removeprefix("module.backbone."): v
        for k, v in state_dict.items()
        if k.startswith("module.backbone.")
    }

    def inference() -> nn.Module:
        return build_model(lambda: Model(size, inference=True), seed=1)

    def bare_backbone() -> nn.Module:
        return build_model(lambda: Backbone(size), seed=1)

    rows: list[tuple[str, str, float]] = []
    checks: list[tuple[str, bool]] = []
    whole, prefixed = "load_checkpoint(model, path, revise_keys=rules)", "prefix load"

    # ckptmap: load_checkpoint with revise_keys (.pth, then safetensors), then a prefix load.
    report = ""
    for name, source in ((path, path), ("epoch_12.safetensors", st_path)):
        model = inference()
        with _captured_logger() as (logger, captured):
            seconds = _timed(
                ckptmap.load_checkpoint,
                model,
                source,
                map_location="cpu",
                revise_keys=DEMO_RULES,
                logger=logger,
            )
        if not report:
            report = "\n".join(captured.messages)
        label = whole if source == path else whole.replace("path", repr(name))
        rows.append(("ckptmap", label, seconds))
        checks.append((f"ckptmap load_checkpoint({name})", _equal(model, expected)))

    backbone = bare_backbone()
    start = time.perf_counter()
    sd = ckptmap._load_checkpoint_with_prefix("module.backbone", path, map_location="cpu")
    prefix_result = ckptmap.load_state_dict(backbone, sd, logger="silent")
    rows.append(("ckptmap", prefixed, time.perf_counter() - start))
    checks.append(("ckptmap prefix load", _equal(backbone, backbone_expected)))
    checks.append(("ckptmap prefix load report: all keys matched", prefix_result.ok))

    mm = _mmengine()
    if mm is not None:
        model = inference()
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            seconds = _timed(
                mm.load_checkpoint,
                model,
                path,
                map_location="cpu",
                logger="silent",
                revise_keys=DEMO_RULES,
            )
            rows.append(("mmengine", whole, seconds))
            checks.append(("mmengine load_checkpoint", _equal(model, expected)))
            backbone = bare_backbone()
            start = time.perf_counter()
            sd = mm._load_checkpoint_with_prefix("module.backbone", path, map_location="cpu")
            mm.load_state_dict(backbone, sd, logger="silent")
            rows.append(("mmengine", prefixed, time.perf_counter() - start))
            checks.append(("mmengine prefix load", _equal(backbone, backbone_expected)))

    model = inference()
    start = time.perf_counter()
    sd = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    incompatible = model.load_state_dict(_seeds_revise(sd, DEMO_RULES), strict=False)
    rows.append(("torch", whole, time.perf_counter() - start))
    checks.append(("torch load_state_dict", _equal(model, expected)))
    del sd, model, backbone

    keys = list(state_dict)
    ours_s, ours = _best_of(3, lambda: rules.apply(keys))
    ref_s, ref = _best_of(1, lambda: _re_sub_loop(keys, DEMO_RULES))
    checks.append(("key rules vs re.sub", ours == ref))

    print()
    print("report of ckptmap's load_checkpoint (folded):")
    print("\n".join("  " + line for line in (report or "All keys matched").splitlines()))
    print(
        f"  torch's load_state_dict agrees: {len(incompatible.unexpected_keys)} unexpected, "
        f"{len(incompatible.missing_keys)} missing"
    )
    print()
    print("time (one run each, warm page cache):")
    base = {what: s for who, what, s in reversed(rows) if who == "ckptmap"}
    shown = {
        ("torch", whole): "torch.load + re.sub loop + Module.load_state_dict",
        ("ckptmap", prefixed): "_load_checkpoint_with_prefix + load_state_dict",
        ("mmengine", prefixed): "_load_checkpoint_with_prefix + load_state_dict",
    }
    for who, what, seconds in rows:
        ratio = ""
        if who != "ckptmap" and base.get(what, 0) > 0:
            ratio = f"  ({seconds / base[what]:.1f}x ckptmap)"
        print(f"  {who:9s} {shown.get((who, what), what):66s} {seconds:7.3f} s{ratio}")
    if mm is None:
        print("  mmengine  not installed (pip install mmengine-lite to compare)")
    print(
        f"  key rules on {len(keys):,} keys: KeyRules.apply {ours_s:.4f} s, "
        f"re.sub loop {ref_s:.4f} s ({ref_s / max(ours_s, 1e-9):.1f}x)"
    )
    print()
    failed = [name for name, ok in checks if not ok]
    loaders = "ckptmap = " + ("mmengine = " if mm is not None else "") + "torch = source"
    if failed:
        print(f"results identical (parameters equal): NO ({'; '.join(failed)})")
    else:
        print(f"results identical (parameters equal): yes ({loaders})")
    print(f"total {time.perf_counter() - started:.1f} s")
    if args.keep is not None:
        print(f"kept in {directory}; try: ckptmap inspect {st_path}")
    return 1 if failed else 0


def add_demo_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Adds the ``demo`` subcommand to `ckptmap`'s argument parser."""
    parser = subparsers.add_parser(
        "demo",
        help="load a synthetic large checkpoint and time it beside mmengine and torch",
        description="Builds a synthetic mixture-of-experts model, saves it as a DDP-style "
        "checkpoint in a temp dir, loads it with load_checkpoint(revise_keys=...) and a "
        "prefix load, prints the report and the time beside mmengine's and torch's paths, "
        "and checks that every loaded model holds the same parameters (exit 1 if not). "
        "--keys N instead times the key rules alone on N keys beside re.sub.",
        epilog="sizes: "
        + ", ".join(f"{name} ({s.layers} x {s.experts} experts)" for name, s in SIZES.items()),
    )
    parser.add_argument(
        "--size",
        type=parse_size_arg,
        default=SIZES["medium"],
        metavar="SIZE",
        help="tiny, small, medium (default), large, or a number of experts per layer",
    )
    parser.add_argument("--layers", type=int, help="number of layers (overrides --size)")
    parser.add_argument("--experts", type=int, help="experts per layer (overrides --size)")
    parser.add_argument("--keep", metavar="DIR", help="write the checkpoint to DIR and keep it")
    parser.add_argument(
        "--keys", type=int, help="time only the key rules on N synthetic keys (e.g. 500000)"
    )
    parser.add_argument(
        "--repeat", type=int, default=3, help="with --keys: best of N runs for ckptmap (3)"
    )
    parser.set_defaults(run=run_demo)
    return parser
