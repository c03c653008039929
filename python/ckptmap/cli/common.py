"""What the commands share: ``--revise`` and ``--allow`` arguments, and human-readable sizes."""

from __future__ import annotations

import argparse
from typing import Any

from ckptmap.errors import UnsafeAllowlistError
from ckptmap.formats import allowlist

__all__ = [
    "add_allow_argument",
    "allow_arg",
    "allowed_globals_for",
    "format_size",
    "parse_rule",
    "rule_arg",
]


def parse_rule(text: str) -> tuple[str, str]:
    """``PATTERN=>REPL`` as a `(pattern, repl)` pair (split at the first ``=>``).

    A literal ``=>`` in a pattern is written ``=\\>``. ``PATTERN=>`` replaces by nothing.

    Raises:
        ValueError: no ``=>`` in `text`.
    """
    pattern, sep, repl = text.partition("=>")
    if not sep:
        raise ValueError(
            f"{text!r} is not a rule: write PATTERN=>REPLACEMENT, e.g. '^module\\.=>' "
            "(re.sub syntax; the replacement may be empty)"
        )
    return pattern, repl


def rule_arg(text: str) -> tuple[str, str]:
    """argparse type for ``--revise PATTERN=>REPL``."""
    try:
        return parse_rule(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def allow_arg(text: str) -> str:
    """argparse type for ``--allow module.name``: importable, and not something that runs code."""

    try:
        allowlist.globals_for([text])
    except KeyError as err:
        raise argparse.ArgumentTypeError(str(err.args[0])) from None
    except UnsafeAllowlistError as err:
        raise argparse.ArgumentTypeError(str(err).replace("allowed_globals", "--allow")) from None
    return text


def add_allow_argument(parser: argparse.ArgumentParser) -> None:
    """``--allow module.name`` (repeatable): a class or function pickles may use."""
    parser.add_argument(
        "--allow",
        action="append",
        default=[],
        type=allow_arg,
        metavar="MODULE.NAME",
        help="let pickle checkpoints use this class or function, e.g. argparse.Namespace "
        "(repeatable). numpy values and everything mmengine's Runner writes are allowed "
        "already; nothing that can run code can be allowed",
    )


def allowed_globals_for(names: list[str]) -> list[Any]:
    """The pickle globals of the named allowlists (``--allow``'s names)."""
    return allowlist.globals_for(names)


def format_size(nbytes: int) -> str:
    """``1536`` -> ``"1.50 KiB"``."""
    value = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")  # pragma: no cover
