"""The `ckptmap` command line."""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from ckptmap import __version__
from ckptmap._core import KeyRules
from ckptmap.revise import revise_keys

T = TypeVar("T")

DEMO_RULES: list[tuple[str, str]] = [
    (r"^module\.", ""),
    (r"^backbone\.", "encoder."),
    (r"\.w(\d)\.", r".proj\1."),
]


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


def run_demo(args: argparse.Namespace) -> int:
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ckptmap",
        description="Load, inspect and remap PyTorch checkpoints fast and safely.",
    )
    parser.add_argument("--version", action="version", version=f"ckptmap {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser(
        "demo",
        help="revise a large synthetic key set and time it beside re.sub",
        description="Builds a synthetic mixture-of-experts key set, revises it with three "
        "typical rules and prints the time beside Python's re.sub and the seeds' loop.",
    )
    demo.add_argument("--keys", type=int, default=500_000, help="number of keys (500,000)")
    demo.add_argument("--repeat", type=int, default=3, help="best of N runs for ckptmap (3)")
    demo.set_defaults(run=run_demo)

    from ckptmap.inspect import add_inspect_parser

    add_inspect_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args))
    except Exception as exc:
        if args.debug:
            raise
        print(f"ckptmap: error: {exc} (run with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
