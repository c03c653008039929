"""`ckptmap demo`: a wide checkpoint loaded from a file, timed beside mmengine and torch.

A mixture-of-experts model (``layers`` x ``experts`` x three projections, BatchNorm layers,
auxiliary heads that the inference model does not have; `ckptmap.cli.demo_model`) gets random
weights and is saved as a DistributedDataParallel checkpoint (every key under ``module.``, a
``meta`` entry) by ``torch.save``, and as its safetensors twin. Each file is then loaded
into the inference model, whose names differ (``backbone`` is ``encoder``, ``w1``..``w3`` are
``proj1``..``proj3``), with the rules of `DEMO_RULES`:

- by ckptmap: ``load_checkpoint(model, f, revise_keys=rules)``;
- by mmengine (when installed): the same call (``.pth`` only: it does not read safetensors);
- by torch's best practice: ``torch.load(f, mmap=True, weights_only=True)`` (or
  ``safetensors.torch.load_file``), the keys renamed with ``re.sub`` as mmengine does, then
  ``model.load_state_dict(sd, strict=False)``.

Every line says what it times: end to end (from the path to the loaded model; the model is
built beforehand and the file is in the page cache), or key work alone (an in-memory step
inside those loads). Ratios are the other side's time over ckptmap's: "12x faster". Each
load runs once. Every loaded model is checked equal, tensor by tensor, to the source weights
under their new names; the command fails (exit 1) if one is not.

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
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import nn

from ckptmap import __version__
from ckptmap._core import KeyRules
from ckptmap.cli.common import format_size
from ckptmap.cli.demo_model import (
    DEMO_RULES,
    SIZES,
    DemoSize,
    FakeDDP,
    Model,
    build_model,
    synthetic_keys,
)
from ckptmap.revise import revise_keys

__all__ = [
    "DEMO_RULES",
    "SIZES",
    "DemoSize",
    "add_demo_parser",
    "build_model",
    "run_demo",
    "synthetic_keys",
    "typed",
    "verdict",
]

T = TypeVar("T")


# --- wording ------------------------------------------------------------------------------------


def typed(text: str) -> str:
    """`text` quoted as a user types it in Python source or a shell: ``'^module\\.'``, one
    backslash, where ``repr`` would double it."""
    if "'" not in text:
        return f"'{text}'"
    if '"' not in text:
        return f'"{text}"'
    return repr(text)


def verdict(theirs: float, ours: float) -> str:
    """``"ckptmap 12x faster"`` / ``"ckptmap 1.3x slower"``: ratio = `theirs` / `ours`."""
    ratio = theirs / max(ours, 1e-9)
    factor = ratio if ratio >= 1 else 1 / ratio
    if factor >= 10:
        text = f"{factor:.0f}x"
    else:
        text = f"{factor:.1f}x" if factor >= 2 else f"{factor:.2f}x"
    return f"ckptmap {text} {'faster' if ratio >= 1 else 'slower'}"


# --- timing and checking -----------------------------------------------------------------------


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


def _seeds_revise(state_dict: Mapping[str, Any], rules: Sequence[tuple[str, str]]) -> OrderedDict:
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


# --- the loads ---------------------------------------------------------------------------------


@dataclass
class Load:
    """One timed load of a file into the model."""

    who: str
    fmt: str
    what: str
    seconds: float = 0.0
    ok: bool = False
    #: The time of each call, where a load is several (torch's path is three).
    parts: dict[str, float] = field(default_factory=dict)


def _ckptmap_load(model: nn.Module, path: str, report: list[str]) -> dict[str, float]:
    import ckptmap

    with _captured_logger() as (logger, captured):
        start = time.perf_counter()
        ckptmap.load_checkpoint(
            model, path, map_location="cpu", revise_keys=DEMO_RULES, logger=logger
        )
        seconds = time.perf_counter() - start
    report[:] = captured.messages
    return {"load_checkpoint": seconds}


def _mmengine_load(model: nn.Module, path: str, mm: Any) -> dict[str, float]:
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        start = time.perf_counter()
        mm.load_checkpoint(model, path, map_location="cpu", logger="silent", revise_keys=DEMO_RULES)
        return {"load_checkpoint": time.perf_counter() - start}


def _torch_load(model: nn.Module, path: str, out: dict[str, Any]) -> dict[str, float]:
    """torch's best practice; leaves the revised state dict and torch's answer in `out`."""
    start = time.perf_counter()
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state_dict: Mapping[str, Any] = load_file(path)
    else:
        state_dict = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        state_dict = state_dict["state_dict"]
    read = time.perf_counter()
    revised = _seeds_revise(state_dict, DEMO_RULES)
    renamed = time.perf_counter()
    out["incompatible"] = model.load_state_dict(revised, strict=False)
    done = time.perf_counter()
    out["revised"] = revised
    return {"read": read - start, "re.sub": renamed - read, "load_state_dict": done - renamed}


# --- the demo ------------------------------------------------------------------------------------


def run_keys_demo(args: argparse.Namespace) -> int:
    """The key rules alone on `args.keys` synthetic keys, beside ``re.sub``."""
    keys = synthetic_keys(args.keys)
    rules = KeyRules(DEMO_RULES)
    print(f"ckptmap {__version__} demo: {len(keys):,} keys like {keys[-1]!r}")
    for (pattern, repl), native in zip(DEMO_RULES, rules.native, strict=True):
        engine = "rust" if native else "python re"
        print(f"  rule {typed(pattern)} -> {typed(repl)}  [{engine}]")
    print()

    ours_s, ours = _best_of(args.repeat, lambda: rules.apply(keys))
    ref_s, ref = _best_of(args.repeat, lambda: _re_sub_loop(keys, DEMO_RULES))
    state_dict = OrderedDict((k, i) for i, k in enumerate(keys))
    revise_s, revised = _best_of(args.repeat, lambda: revise_keys(state_dict, rules))
    seeds_s, seeds = _best_of(args.repeat, lambda: _seeds_revise(state_dict, DEMO_RULES))

    print(f"key work alone (in memory, best of {args.repeat} each):")
    rows = [
        ("KeyRules.apply(keys)", ours_s, ref_s, "re.sub loop"),
        ("revise_keys(state_dict)", revise_s, seeds_s, "mmengine's dict comprehension"),
    ]
    for name, ours_t, ref_t, ref_name in rows:
        print(
            f"  {name:26s} {ours_t:8.3f} s   {ref_name}: {ref_t:.3f} s   {verdict(ref_t, ours_t)}"
        )
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


@dataclass
class _Outcome:
    """What the demo measured, for printing."""

    loads: list[Load]
    report: list[str]  # ckptmap's report of the .pth load
    incompatible: Any  # torch's answer for the .pth load
    key_load: Load  # ckptmap's load_state_dict of torch's in-memory dict
    tensors: int
    rules_s: tuple[float, float]  # KeyRules.apply, re.sub loop
    rules_same: bool
    keys: int


def _write(directory: str, state_dict: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """The checkpoint as torch.save writes it, and its safetensors twin (meta included)."""
    import ckptmap

    files = {
        ".pth": os.path.join(directory, "epoch_12.pth"),
        ".safetensors": os.path.join(directory, "epoch_12.safetensors"),
    }
    checkpoint = {"meta": {"epoch": 12, "iter": 120_000, "seed": 0}, "state_dict": state_dict}
    torch.save(checkpoint, files[".pth"])
    ckptmap.save_checkpoint(checkpoint, files[".safetensors"])
    return files


def _measure(size: DemoSize, files: dict[str, str], source: Mapping[str, Any]) -> _Outcome:
    """Every load of `files` into one inference model (zeroed before each), checked."""
    import ckptmap

    rules = KeyRules(DEMO_RULES)
    # What every loaded model must hold: the source weights under their revised names.
    expected = dict(zip(rules.apply(list(source)), source.values(), strict=True))
    model = build_model(lambda: Model(size, inference=True), seed=1)
    tensors = [*model.parameters(), *model.buffers()]

    def measure(load: Load, run: Callable[..., dict[str, float]], *args: Any) -> Load:
        with torch.no_grad():  # zeroed first (not timed), so each load is checked on its own
            torch._foreach_zero_(tensors)
        load.parts = run(model, *args)
        load.seconds = sum(load.parts.values())
        load.ok = _equal(model, expected)
        return load

    mm = _mmengine()
    loads: list[Load] = []
    reports: dict[str, list[str]] = {}
    torch_out: dict[str, dict[str, Any]] = {}
    for fmt, path in files.items():
        what = f"load_checkpoint(model, {typed(os.path.basename(path))}, revise_keys=rules)"
        reports[fmt] = []
        loads.append(measure(Load("ckptmap", fmt, what), _ckptmap_load, path, reports[fmt]))
        if fmt == ".pth" and mm is not None:
            loads.append(measure(Load("mmengine", fmt, what), _mmengine_load, path, mm))
        reader = "torch.load(mmap=True, weights_only=True)" if fmt == ".pth" else "load_file"
        torch_out[fmt] = {}
        loads.append(
            measure(
                Load("torch", fmt, f"{reader}, re.sub, load_state_dict"),
                _torch_load,
                path,
                torch_out[fmt],
            )
        )

    # Key work alone: ckptmap's load_state_dict of the very dict torch's path loaded and
    # renamed (beside the load_state_dict part of torch's run), and the rules on the keys.
    revised = torch_out[".pth"]["revised"]

    def key_load(model: nn.Module) -> dict[str, float]:
        start = time.perf_counter()
        ckptmap.load_state_dict(model, revised, logger="silent")
        return {"load_state_dict": time.perf_counter() - start}

    key = measure(Load("ckptmap", "", "load_state_dict(model, sd)"), key_load)
    keys = list(source)
    ours_s, ours = _best_of(1, lambda: rules.apply(keys))
    ref_s, ref = _best_of(1, lambda: _re_sub_loop(keys, DEMO_RULES))
    return _Outcome(
        loads=loads,
        report=reports[".pth"],
        incompatible=torch_out[".pth"]["incompatible"],
        key_load=key,
        tensors=len(revised),
        rules_s=(ours_s, ref_s),
        rules_same=ours == ref,
        keys=len(keys),
    )


def _print_outcome(outcome: _Outcome, formats: Sequence[str], mmengine_installed: bool) -> None:
    print()
    print("report of ckptmap's load_checkpoint (folded):")
    report = "\n".join(outcome.report) or "All keys matched"
    print("\n".join("  " + line for line in report.splitlines()))
    incompatible = outcome.incompatible
    print(
        f"  torch's load_state_dict agrees: {len(incompatible.unexpected_keys)} unexpected, "
        f"{len(incompatible.missing_keys)} missing"
    )
    print()
    print("end to end: from the file to the loaded model (the model built beforehand, the file")
    print("in the page cache, one run each)")
    width = max(len(x.what) for x in outcome.loads)
    for fmt in formats:
        ours = next(x for x in outcome.loads if x.who == "ckptmap" and x.fmt == fmt)
        print(f"  {fmt}")
        for load in (x for x in outcome.loads if x.fmt == fmt):
            ratio = "" if load is ours else "  " + verdict(load.seconds, ours.seconds)
            print(f"    {load.who:9s} {load.what:{width}s} {load.seconds:7.3f} s{ratio}")
        if fmt == ".pth" and not mmengine_installed:
            print("    mmengine  not installed (pip install mmengine-lite to compare)")
        if fmt == ".safetensors":
            print("    mmengine  does not read safetensors files")
    torch_pth = next(x for x in outcome.loads if x.who == "torch" and x.fmt == ".pth")
    theirs = torch_pth.parts["load_state_dict"]
    ours_s = outcome.key_load.seconds
    rules_ours, rules_ref = outcome.rules_s
    print()
    print("key work alone: in-memory steps of the loads above, not end to end")
    print(
        f"  load_state_dict of {outcome.tensors:,} tensors: ckptmap {ours_s:.3f} s, torch "
        f"{theirs:.3f} s: {verdict(theirs, ours_s)}"
    )
    print(
        f"  {len(DEMO_RULES)} rules over {outcome.keys:,} keys: KeyRules.apply {rules_ours:.4f} "
        f"s, re.sub loop {rules_ref:.4f} s: {verdict(rules_ref, rules_ours)}"
    )
    print()


def _run_demo_in(directory: str, size: DemoSize, args: argparse.Namespace) -> int:
    started = time.perf_counter()
    source = build_model(lambda: FakeDDP(Model(size)), seed=0).state_dict()
    nbytes = sum(t.numel() * t.element_size() for t in source.values())
    files = _write(directory, source)
    print(
        f"ckptmap {__version__} demo: a DistributedDataParallel checkpoint of a mixture of "
        f"experts,\n{size.layers} layers x {size.experts:,} experts (dim {size.dim}, hidden "
        f"{size.hidden}): {len(source):,} tensors, {format_size(nbytes)}, keys under 'module.'"
    )
    print(f"  {files['.pth']}  (written by torch.save)")
    print(f"  {files['.safetensors']}  (its safetensors twin)")
    print("loaded into the inference model (other names, no auxiliary heads) with the rules")
    for (pattern, repl), native in zip(DEMO_RULES, KeyRules(DEMO_RULES).native, strict=True):
        print(f"  {typed(pattern)} -> {typed(repl)}  [{'rust' if native else 'python re'}]")

    outcome = _measure(size, files, source)
    _print_outcome(outcome, list(files), _mmengine() is not None)
    checks = [(f"{x.who} {x.fmt}", x.ok) for x in outcome.loads]
    checks += [
        ("ckptmap load_state_dict", outcome.key_load.ok),
        ("KeyRules.apply vs re.sub", outcome.rules_same),
    ]
    failed = [name for name, ok in checks if not ok]
    if failed:
        print(f"results identical (parameters equal): NO ({'; '.join(failed)})")
    else:
        print(
            f"results identical (parameters equal): yes, after each of the {len(checks) - 1} "
            "loads every tensor is the source's"
        )
    print(f"total {time.perf_counter() - started:.1f} s")
    if args.keep is not None:
        print(f"kept in {directory}; try: ckptmap inspect {files['.safetensors']}")
    return 1 if failed else 0


def add_demo_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Adds the ``demo`` subcommand to `ckptmap`'s argument parser."""
    parser = subparsers.add_parser(
        "demo",
        help="load a synthetic wide checkpoint from a file, beside mmengine and torch",
        description="Builds a synthetic mixture-of-experts model, saves it as a DDP-style "
        "checkpoint (.pth and safetensors) in a temp dir, loads each file into a renamed "
        "inference model with load_checkpoint(revise_keys=...), beside mmengine's "
        "load_checkpoint and torch's best practice, prints the report, the end-to-end times "
        "and the key-work times with their ratios, and checks that every loaded model holds "
        "the source's tensors (exit 1 if not). --keys N instead times the key rules alone on "
        "N keys beside re.sub.",
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
        "--repeat", type=int, default=3, help="with --keys: best of N runs for each side (3)"
    )
    parser.set_defaults(run=run_demo)
    return parser
