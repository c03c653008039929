r"""`ckptmap diff`: what loading a checkpoint into a model (or against another checkpoint) would
report, computed from names and shapes alone.

Against a model (``--model``), the report is the load's own plan (`ckptmap.plan_load`): the
checkpoint is opened without reading tensor data where the format allows
(`ckptmap.open_checkpoint`), its keys go through ``load_checkpoint``'s rules (its default
``^module\.`` rule unless ``--revise`` gives others) and the prefix, and the module walk of
a real load decides each module's keys, overrides of `_load_from_state_dict` included. The
model's factory runs under ``torch.device("meta")`` so no parameter memory is allocated
(falling back to the CPU when the factory can not run on the meta device).

Against another checkpoint (``--against``), the two key sets and shapes are compared after
the same rules and prefix. ``num_batches_tracked`` missing is not reported, as in the
OpenMMLab loaders.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ckptmap._core import KeyRules
from ckptmap.cli.common import add_allow_argument, allowed_globals_for, rule_arg
from ckptmap.errors import ModelSpecError
from ckptmap.opened import open_checkpoint
from ckptmap.plan import DEFAULT_REVISE_KEYS, plan_load
from ckptmap.report import fold_keys, printable
from ckptmap.shapes import (
    DiffResult,
    checkpoint_shapes,
    diff_checkpoint,
    format_name,
)

__all__ = [
    "add_diff_parser",
    "build_model",
    "format_diff",
    "load_factory",
    "run_diff",
]


def load_factory(spec: str) -> Callable[[], Any]:
    """Imports ``pkg.module:factory`` (or ``path/to/file.py:factory``); dots after the colon
    walk attributes (``pkg.models:Zoo.build``).

    The current directory is importable, as with ``python -m``.

    Raises:
        ModelSpecError: a malformed spec, a module that does not import, no such attribute,
            or an attribute that is not callable.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ModelSpecError(
            f"--model {spec!r}: write MODULE:FACTORY, e.g. 'mypkg.models:build_model' or "
            "'models.py:build_model' (a callable returning an nn.Module)"
        )
    try:
        if module_name.endswith(".py"):
            if not os.path.isfile(module_name):
                raise ModelSpecError(f"--model {spec!r}: no file {module_name!r}")
            name = "_ckptmap_model_" + os.path.basename(module_name)[:-3]
            loaded = importlib.util.spec_from_file_location(name, module_name)
            if loaded is None or loaded.loader is None:  # pragma: no cover - a .py always loads
                raise ModelSpecError(f"--model {spec!r}: can not import {module_name!r}")
            module = importlib.util.module_from_spec(loaded)
            sys.modules[name] = module
            loaded.loader.exec_module(module)
        else:
            if os.getcwd() not in sys.path and "" not in sys.path:
                sys.path.insert(0, os.getcwd())
            module = importlib.import_module(module_name)
    except ModelSpecError:
        raise
    except Exception as err:
        raise ModelSpecError(
            f"--model {spec!r}: importing {module_name!r} failed: {type(err).__name__}: {err}"
        ) from err
    target: Any = module
    for part in attr.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise ModelSpecError(
                f"--model {spec!r}: module {module_name!r} has no attribute {attr!r}"
            ) from None
    if not callable(target):
        raise ModelSpecError(
            f"--model {spec!r}: {attr!r} is a {type(target).__name__}, not a callable "
            "returning an nn.Module"
        )
    return target  # type: ignore[no-any-return]


def build_model(spec: str) -> tuple[nn.Module, str]:
    """Builds the model of `spec` on the meta device (no memory) if it can, else on the CPU.

    Returns:
        `(model, device)` where `device` is ``"meta"`` or ``"cpu"``.
    """
    factory = load_factory(spec)
    try:
        with torch.device("meta"):
            model = factory()
        device = "meta"
    except Exception:
        # Some factories compute with real tensors (or load weights): build them normally.
        try:
            model = factory()
        except Exception as err:
            raise ModelSpecError(
                f"--model {spec!r}: calling the factory failed: {type(err).__name__}: {err}"
            ) from err
        device = "cpu"
    if not isinstance(model, nn.Module):
        raise ModelSpecError(
            f"--model {spec!r}: the factory returned a {type(model).__name__}, not a "
            "torch.nn.Module"
        )
    return model, device


def format_diff(result: DiffResult, *, source: str, expected: str, notes: Sequence[str]) -> str:
    """The diff for people: index runs folded (``layers.{0..31}.w  [32 keys]``)."""
    lines = [f"checkpoint: {source}", f"expected:   {expected}", *notes]
    lines.append(
        f"keys: checkpoint {result.source_keys:,}, expected {result.expected_keys:,}, "
        f"matched {result.matched:,}"
    )

    def section(title: str, keys: Sequence[str]) -> None:
        if keys:
            lines.append(f"{title} ({len(keys):,}):")
            lines.extend(f"    {printable(p)}{_count(n)}" for p, n in fold_keys(keys))

    section("missing from the checkpoint", result.missing)
    section("unexpected in the checkpoint", result.unexpected)
    if result.mismatched:
        lines.append(f"shape mismatched ({len(result.mismatched):,}):")
        groups: dict[tuple[tuple[int, ...], tuple[int, ...]], list[str]] = {}
        for key, a, b in result.mismatched:
            groups.setdefault((a, b), []).append(key)
        for (a, b), names in groups.items():
            for pattern, n in fold_keys(names):
                lines.append(f"    {printable(pattern)}: checkpoint {a}, expected {b}{_count(n)}")
    if result.collisions:
        lines.append(f"collisions after the rules ({len(result.collisions):,}), last one kept:")
        for key, sources, kept in result.collisions:
            shown = ", ".join(map(printable, sources))
            lines.append(f"    {printable(key)} <- {shown} (kept {printable(kept)})")
    if result.match:
        lines.append("result: keys and shapes match exactly")
    else:
        lines.append("result: the checkpoint and the expected keys differ")
        if result.matched == 0 and result.source_keys:
            lines.append(
                "hint: no key matches; compare the names above and add --revise "
                "(e.g. '^module\\.=>') or --prefix"
            )
    return "\n".join(lines)


def _count(n: int) -> str:
    return f"  [{n:,} keys]" if n > 1 else ""


# --- the command line -------------------------------------------------------------------------

DIFF_EPILOG = """\
The checkpoint's keys are revised by the --revise rules (in order, each as re.sub), then kept
under --prefix with the prefix stripped; the other side (--model or --against) is taken as is.
Shapes come from headers: safetensors and sharded checkpoints are never read past their
headers, torch zip files are memory-mapped and not read, and --model builds the model on the
meta device (no memory) when its factory allows it.

exit status:
  0  the keys and shapes match exactly
  1  they differ (missing, unexpected, shape-mismatched keys or collisions)
  2  usage error or bad input (unreadable checkpoint, bad pattern, model that won't build)

examples:
  ckptmap diff work_dirs/epoch_12.pth --model mypkg.models:build_detector --revise '^module\\.=>'
  ckptmap diff model.safetensors --against model.pth --json
  ckptmap diff ddp.pth --against backbone.pth --prefix module.backbone
"""


def add_diff_parser(subparsers: Any) -> Any:
    """Adds the ``diff`` subcommand to `ckptmap`'s argument parser."""
    import argparse

    parser = subparsers.add_parser(
        "diff",
        help="what loading CKPT into a model (or against another checkpoint) would report",
        description="Compares a checkpoint's keys and shapes with a model's state_dict() or "
        "another checkpoint: missing, unexpected and shape-mismatched keys, and keys that the "
        "rules merge (collisions), from headers alone where the format allows.",
        epilog=DIFF_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("checkpoint", metavar="CKPT", help="checkpoint file, index or directory")
    side = parser.add_mutually_exclusive_group(required=True)
    side.add_argument(
        "--model",
        metavar="MODULE:FACTORY",
        help="a callable returning the nn.Module to load into, e.g. mypkg.models:build "
        "(or path/to/file.py:build)",
    )
    side.add_argument("--against", metavar="OTHER", help="a checkpoint to compare with")
    parser.add_argument(
        "--revise",
        metavar="PATTERN=>REPL",
        type=rule_arg,
        action="append",
        default=[],
        help="rename the checkpoint's keys as re.sub(PATTERN, REPL, key); repeatable, applied "
        "in order (a literal '=>' in a pattern is written '=\\>')",
    )
    parser.add_argument(
        "--prefix", metavar="P", help="keep only keys under P (after the rules), stripping P"
    )
    parser.add_argument("--json", action="store_true", help="print a JSON object")
    add_allow_argument(parser)
    parser.set_defaults(run=run_diff, error_status=2)
    return parser


def run_diff(args: Any) -> int:
    """Runs ``ckptmap diff`` with parsed `args`; returns the exit status (0, 1)."""
    # Compiled first: a bad pattern fails before any file is read or model built. Against a
    # model, as in load_checkpoint, rules given replace the default `^module\.` rule; two
    # checkpoints are compared as they are unless rules are given.
    rule_pairs = args.revise or (list(DEFAULT_REVISE_KEYS) if args.model else [])
    rules = KeyRules(rule_pairs)
    allowed = allowed_globals_for(args.allow)
    notes: list[str] = []
    if args.model:
        model, device = build_model(args.model)
        with open_checkpoint(args.checkpoint, allowed_globals=allowed) as opened:
            fmt, header_only = format_name(opened), opened.header_only
            plan = plan_load(opened, model, revise_keys=rules, prefix=args.prefix)
        result = DiffResult.from_plan(plan)
        expected_name = f"model {args.model} (built on {device})"
        other: dict[str, Any] = {"model": args.model, "model_device": device}
    else:
        source, fmt, header_only = checkpoint_shapes(args.checkpoint, allowed_globals=allowed)
        expected, other_fmt, other_header_only = checkpoint_shapes(
            args.against, allowed_globals=allowed
        )
        expected_name = (
            f"{args.against} ({other_fmt}{', header only' if other_header_only else ''})"
        )
        other = {"against": args.against, "against_header_only": other_header_only}
        result = diff_checkpoint(
            source, expected, rules=rules, prefix=args.prefix, source_name=args.checkpoint
        )
    if args.json:
        doc = {
            "checkpoint": args.checkpoint,
            "format": fmt,
            "header_only": header_only,
            **other,
            "rules": [list(r) for r in rule_pairs],
            "prefix": args.prefix,
            **result.to_json(),
        }
        print(json.dumps(doc, indent=2))
    else:
        if rule_pairs:
            default = "" if args.revise else " (load_checkpoint's default)"
            shown = "; ".join(f"{p} => {r!r}" for p, r in rule_pairs)
            notes.append(f"rules:      {shown}{default}")
        if args.prefix:
            notes.append(f"prefix:     {args.prefix!r} (stripped)")
        name = f"{args.checkpoint} ({fmt}{', header only' if header_only else ''})"
        print(format_diff(result, source=name, expected=expected_name, notes=notes))
    return 0 if result.match else 1
