"""`ckptmap suggest`: infer the ``revise_keys`` rules that load a checkpoint into a model."""

from __future__ import annotations

import json
from typing import Any

from ckptmap.cli.common import add_allow_argument, allowed_globals_for
from ckptmap.cli.diff import build_model
from ckptmap.suggest import suggest_rules

__all__ = ["add_suggest_parser", "run_suggest"]

SUGGEST_EPILOG = """\
The rules are inferred from the key structure (prefixes added or removed, renamed segments,
index patterns such as layer1.0 -> stages.0.blocks.0), shapes and dtypes; names only break ties.
Where two model tensors fit a checkpoint tensor equally well, neither is chosen: the key is
reported as ambiguous. The rules are checked by applying them and by planning the load, as
`ckptmap diff` does; pass them to load_checkpoint(revise_keys=...) or `diff --revise`.

exit status:
  0  the rules fill every model tensor
  1  some model tensors are left (see "unmatched in the model")
  2  usage error or bad input (unreadable checkpoint, model that won't build)

examples:
  ckptmap suggest timm_resnet50.pth --model torchvision.models:resnet50
  ckptmap suggest detector.pth --model mypkg.models:build_backbone --prefix backbone --json
"""


def add_suggest_parser(subparsers: Any) -> Any:
    """Adds the ``suggest`` subcommand to `ckptmap`'s argument parser."""
    import argparse

    parser = subparsers.add_parser(
        "suggest",
        help="infer the revise_keys rules that load CKPT into a model",
        description="Infers the ordered (pattern, replacement) rules, applied as re.sub, that "
        "rename a checkpoint's keys onto a model's: coverage, each rule's evidence, what is "
        "left on each side and why, from headers alone where the format allows.",
        epilog=SUGGEST_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("checkpoint", metavar="CKPT", help="checkpoint file, index or URI")
    parser.add_argument(
        "--model",
        metavar="MODULE:FACTORY",
        required=True,
        help="a callable returning the nn.Module to load into, e.g. torchvision.models:resnet50 "
        "(or path/to/file.py:build); built on the meta device when it allows",
    )
    parser.add_argument(
        "--prefix",
        metavar="P",
        help="consider only checkpoint keys under P (the rules still apply to the full keys)",
    )
    parser.add_argument("--json", action="store_true", help="print a JSON object")
    add_allow_argument(parser)
    parser.set_defaults(run=run_suggest, error_status=2)
    return parser


def run_suggest(args: Any) -> int:
    """Runs ``ckptmap suggest`` with parsed `args`; returns the exit status (0, 1)."""

    model, device = build_model(args.model)
    result = suggest_rules(
        args.checkpoint,
        model,
        prefix=args.prefix,
        allowed_globals=allowed_globals_for(args.allow),
    )
    if args.json:
        doc = {
            "checkpoint": args.checkpoint,
            "model": args.model,
            "model_device": device,
            "prefix": args.prefix,
            **result.to_json(),
        }
        print(json.dumps(doc, indent=2))
    else:
        print(f"checkpoint: {args.checkpoint}")
        print(f"model:      {args.model} (built on {device})")
        if args.prefix:
            print(f"prefix:     {args.prefix!r}")
        print(result.format())
    return 0 if result.coverage == result.model_tensors else 1
