"""The `ckptmap` command line: ``demo``, ``inspect``, ``diff``, ``convert`` and ``bench``.

Every error is one line on stderr (``ckptmap: error: ...``); ``--debug`` shows the traceback
instead. Progress bars appear on a terminal only.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence

from ckptmap import __version__
from ckptmap.cli import bench
from ckptmap.cli.convert import add_convert_parser
from ckptmap.cli.demo import DEMO_RULES, add_demo_parser, synthetic_keys
from ckptmap.cli.diff import add_diff_parser
from ckptmap.cli.suggest import add_suggest_parser
from ckptmap.cli.summary import add_inspect_parser
from ckptmap.errors import UnsafeCheckpointError

__all__ = ["DEMO_RULES", "build_parser", "main", "synthetic_keys"]

EPILOG = """\
commands:
  demo      build a synthetic large checkpoint, load it, compare with mmengine and torch
  inspect   summarise a checkpoint from its header
  diff      what loading a checkpoint into a model would report (exit 0 match, 1 differ)
  convert   .pth <-> (sharded) safetensors, with key rules, a prefix and a dtype
{bench}
Run `ckptmap COMMAND --help` for a command's options. Errors are one line; --debug (before or
after the command) shows the traceback.
"""


def _add_debug(parser: argparse.ArgumentParser) -> None:
    # SUPPRESS: a subcommand's default must not override `ckptmap --debug COMMAND`.
    parser.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks"
    )


BENCH_LINE = "  bench     the side-by-side benchmarks of this source checkout (as `make bench`)\n"


def build_parser() -> argparse.ArgumentParser:
    # `bench` runs the checkout's benches/: offered only where there is one (not from a wheel).
    has_checkout = bench.find_checkout() is not None
    parser = argparse.ArgumentParser(
        prog="ckptmap",
        description="Load, inspect, compare and convert PyTorch checkpoints fast and safely.",
        epilog=EPILOG.format(bench=BENCH_LINE if has_checkout else ""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"ckptmap {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    adders = [
        add_demo_parser,
        add_inspect_parser,
        add_diff_parser,
        add_suggest_parser,
        add_convert_parser,
    ]
    if has_checkout:
        adders.append(bench.add_bench_parser)
    for add in adders:
        _add_debug(add(commands))
    return parser


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, UnsafeCheckpointError):
        exc = exc.with_advice_for("cli")  # name --allow, not allowed_globals=
    if isinstance(exc, re.error):
        where = f" in pattern {exc.pattern!r}" if exc.pattern is not None else ""
        text = f"bad regular expression{where}: {exc}"
    else:
        text = str(exc).strip() or type(exc).__name__
        if isinstance(exc, KeyError) and len(exc.args) == 1 and text == repr(exc.args[0]):
            text = f"KeyError: {text}"
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line with `argv` (default: ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args))
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("ckptmap: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.debug:
            raise
        print(
            f"ckptmap: error: {_one_line(exc)} (run with --debug for the traceback)",
            file=sys.stderr,
        )
        return int(getattr(args, "error_status", 1))
