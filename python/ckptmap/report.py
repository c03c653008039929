"""What a load did, and the message that tells people about it.

`LoadResult` is the structured outcome of `load_state_dict`. `format_report` renders it two
ways: the OpenMMLab flat message (``"The model and loaded state dict do not match exactly"``,
``"unexpected key in source state_dict: a, b"``, ``"missing keys in source state_dict: c"``),
which the mmengine drop-in uses, and a folded report that stays readable for models with
hundreds of thousands of keys: keys that differ only in their numeric components are shown
once, e.g. ``layers.{0..31}.experts.{0..255}.w1.weight  [8192 keys]``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

from ckptmap.dist import get_dist_info

__all__ = [
    "LoadResult",
    "LoggerLike",
    "Mismatch",
    "ReportStyle",
    "fold_keys",
    "format_report",
    "log_message",
    "nothing_loaded_line",
    "parse_size_mismatch",
    "printable",
]

ReportStyle = Literal["folded", "flat"]
LoggerLike = logging.Logger | logging.LoggerAdapter | str | None

HEADER = "The model and loaded state dict do not match exactly"
UNEXPECTED = "unexpected key in source state_dict"
MISSING = "missing keys in source state_dict"

#: Names longer than this are shortened in reports (the JSON outputs keep them whole).
MAX_SHOWN = 240
#: Error messages (which quote keys) are shortened past this.
_MAX_MESSAGE = 2000
# What a terminal would act on instead of showing: C0/C1 controls (ESC starts ANSI
# sequences), bidirectional overrides and isolates (they reorder what is shown), zero-width
# characters, line/paragraph separators, a BOM, and lone surrogates (they can not be printed).
_UNSAFE = re.compile(
    "[\x00-\x1f\x7f-\x9f\u061c\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff\ud800-\udfff]"
)

# torch's message for a shape mismatch in `Module._load_from_state_dict`.
_SIZE_MISMATCH = re.compile(
    r"size mismatch for (?P<key>.+): copying a param with shape "
    r"torch\.Size\(\[(?P<src>[0-9, ]*)\]\) from checkpoint, "
    r"the shape in current model is torch\.Size\(\[(?P<dst>[0-9, ]*)\]\)\.",
    re.DOTALL,
)


class Mismatch(NamedTuple):
    """A tensor whose shape differs between the checkpoint and the model (it was not loaded)."""

    name: str
    checkpoint_shape: tuple[int, ...]
    model_shape: tuple[int, ...]


@dataclass(frozen=True)
class LoadResult:
    """The outcome of loading a state dict into a module.

    Attributes:
        missing_keys: keys the model expects that the state dict lacks, exactly as torch
            reports them (`num_batches_tracked` included).
        unexpected_keys: keys of the state dict that no part of the model takes.
        mismatched: tensors left as they were because their shapes differ.
        collisions: source keys that `revise_keys` mapped onto one key (`.key`, `.sources`,
            `.kept`); empty when no rules ran.
        error_msgs: every message `_load_from_state_dict` recorded (torch's wording), the size
            mismatches included.
        num_source_keys: how many keys the state dict had.
    """

    missing_keys: tuple[str, ...] = ()
    unexpected_keys: tuple[str, ...] = ()
    mismatched: tuple[Mismatch, ...] = ()
    collisions: tuple[Any, ...] = ()
    error_msgs: tuple[str, ...] = ()
    num_source_keys: int = 0
    _other_errors: tuple[str, ...] = field(default=(), repr=False)

    @classmethod
    def build(
        cls,
        missing_keys: Iterable[str],
        unexpected_keys: Iterable[str],
        error_msgs: Iterable[str],
        collisions: Iterable[Any] = (),
        num_source_keys: int = 0,
    ) -> LoadResult:
        """Builds a result, sorting `error_msgs` into shape mismatches and other errors."""
        errors = tuple(error_msgs)
        mismatched: list[Mismatch] = []
        other: list[str] = []
        for msg in errors:
            parsed = parse_size_mismatch(msg)
            if parsed is None:
                other.append(msg)
            else:
                mismatched.append(parsed)
        return cls(
            missing_keys=tuple(missing_keys),
            unexpected_keys=tuple(unexpected_keys),
            mismatched=tuple(mismatched),
            collisions=tuple(collisions),
            error_msgs=errors,
            num_source_keys=num_source_keys,
            _other_errors=tuple(other),
        )

    @property
    def reported_missing_keys(self) -> list[str]:
        """The missing keys the report names: BatchNorm's `num_batches_tracked` left out."""
        return [k for k in self.missing_keys if "num_batches_tracked" not in k]

    @property
    def other_errors(self) -> tuple[str, ...]:
        """Error messages that are not shape mismatches (bad values, custom loaders' errors)."""
        return self._other_errors

    @property
    def num_loaded(self) -> int:
        """Source keys that reached the model: neither unexpected nor shape-mismatched."""
        skipped = len(set(self.unexpected_keys)) + len(self.mismatched)
        return max(self.num_source_keys - skipped, 0)

    @property
    def nothing_loaded(self) -> bool:
        """The state dict had keys, yet none of them reached the model."""
        return self.num_source_keys > 0 and self.num_loaded == 0

    @property
    def ok(self) -> bool:
        """Whether there is nothing to report: every key matched, no error, no collision."""
        return not (
            self.unexpected_keys or self.reported_missing_keys or self.error_msgs or self.collisions
        )

    def report(self, style: ReportStyle = "folded") -> str:
        """The message for this result (`""` when there is nothing to report)."""
        return format_report(self, style)

    def __str__(self) -> str:
        return self.report() or f"<All keys matched successfully ({self.num_source_keys} keys)>"


def _escape(char: str) -> str:
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: object, limit: int = MAX_SHOWN) -> str:
    """`text` made safe to show on a terminal: one line, no control sequences, bounded.

    Checkpoint keys (and messages quoting them) come from files that may come from anyone:
    control characters (ANSI escape sequences included), bidirectional overrides, zero-width
    characters and lone surrogates are shown as ``\\x1b`` / ``\\u202e`` escapes, and text longer
    than `limit` keeps its start and end around ``...`` and says how long it was. Ordinary
    names come back unchanged.
    """
    shown = str(text)
    length = len(shown)
    if _UNSAFE.search(shown):
        shown = _UNSAFE.sub(lambda m: _escape(m[0]), shown)
    if len(shown) > limit:
        tail = limit // 4
        shown = f"{shown[: limit - tail]}...{shown[-tail:]} [{length:,} chars]"
    return shown


def parse_size_mismatch(message: str) -> Mismatch | None:
    """Reads torch's ``size mismatch for KEY: copying a param with shape ...`` message."""
    m = _SIZE_MISMATCH.fullmatch(message)
    if m is None:
        return None
    return Mismatch(m["key"], _shape(m["src"]), _shape(m["dst"]))


def _shape(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(",") if part.strip())


# --- folding -------------------------------------------------------------------------------


def fold_keys(keys: Iterable[str]) -> list[tuple[str, int]]:
    """Groups keys that differ only in numeric components, folding the indices.

    ``layers.0.w``, ``layers.1.w``, ``layers.2.w`` become ``("layers.{0..2}.w", 3)``. Where the
    indices do not form a full grid (layer 5 lacks expert 7), the keys are split into as few
    grids as the greedy grouping finds, so no key is claimed that is not in `keys`.

    Returns:
        `(pattern, count)` pairs in order of first appearance; duplicates count once.
    """
    templates: dict[tuple[str | None, ...], dict[tuple[int, ...], None]] = {}
    for key in keys:
        parts = key.split(".")
        template: list[str | None] = []
        indices: list[int] = []
        for part in parts:
            # An index: ASCII digits without a leading zero ("01" is a name: folding it would
            # change the key).
            if part.isdigit() and part.isascii() and (part[0] != "0" or part == "0"):
                template.append(None)
                indices.append(int(part))
            else:
                template.append(part)
        templates.setdefault(tuple(template), {})[tuple(indices)] = None
    out: list[tuple[str, int]] = []
    for shape, rows in templates.items():
        for box in _boxes(list(rows)):
            count = 1
            for values in box:
                count *= len(values)
            out.append((_render(shape, box), count))
    return out


def _boxes(rows: list[tuple[int, ...]]) -> list[list[list[int]]]:
    """Covers distinct equal-length index rows with grids (one sorted value list per position)."""
    if not rows[0]:
        return [[]]
    tails_of: dict[int, list[tuple[int, ...]]] = {}
    for row in rows:
        tails_of.setdefault(row[0], []).append(row[1:])
    firsts_of: dict[frozenset[tuple[int, ...]], list[int]] = {}
    for first, tails in tails_of.items():
        firsts_of.setdefault(frozenset(tails), []).append(first)
    out: list[list[list[int]]] = []
    for tail_set, firsts in firsts_of.items():
        head = sorted(firsts)
        for box in _boxes(sorted(tail_set)):
            out.append([head, *box])
    return out


def _render(template: tuple[str | None, ...], box: list[list[int]]) -> str:
    values = iter(box)
    parts = [part if part is not None else _render_set(next(values)) for part in template]
    return ".".join(parts)


def _render_set(values: list[int]) -> str:
    if len(values) == 1:
        return str(values[0])
    runs: list[str] = []
    start = prev = values[0]
    for v in [*values[1:], None]:
        if v is not None and v == prev + 1:
            prev = v
            continue
        if prev - start >= 2:
            runs.append(f"{start}..{prev}")
        else:
            runs.extend(str(x) for x in range(start, prev + 1))
        if v is not None:
            start = prev = v
    return "{" + ",".join(runs) + "}"


# --- messages ------------------------------------------------------------------------------


def format_report(result: LoadResult, style: ReportStyle = "folded") -> str:
    """Renders `result` as the flat OpenMMLab message or the folded report.

    The flat style is the seeds' message byte for byte (torch's error messages, then the
    unexpected and missing lines), plus a collisions line and a "loaded 0 of N" line when
    those happen. Returns `""` when there is nothing to report.
    """
    if style == "flat":
        return _format_flat(result)
    if style == "folded":
        return _format_folded(result)
    raise ValueError(f"unknown report style {style!r}: use 'folded' or 'flat'")


def nothing_loaded_line(result: LoadResult) -> str:
    """The warning for a load that took none of the source's keys, with the likely cause."""
    n = result.num_source_keys
    if not result.mismatched:
        return (
            f"loaded 0 of {n} keys: no key of the source state_dict matches the model; check "
            "revise_keys / the prefix against the model's state_dict() keys"
        )
    return (
        f"loaded 0 of {n} keys: {len(set(result.unexpected_keys))} match no key of the model "
        f"and {len(result.mismatched)} have a different shape; check that the checkpoint "
        "belongs to this model and its configuration"
    )


def _format_flat(result: LoadResult) -> str:
    msgs = [printable(m, _MAX_MESSAGE) for m in result.error_msgs]
    if result.unexpected_keys:
        msgs.append(f"{UNEXPECTED}: {', '.join(map(printable, result.unexpected_keys))}\n")
    missing = result.reported_missing_keys
    if missing:
        msgs.append(f"{MISSING}: {', '.join(map(printable, missing))}\n")
    if result.collisions:
        described = "; ".join(_describe_collision(c) for c in result.collisions)
        msgs.append(f"key collisions after revise_keys: {described}\n")
    if result.nothing_loaded:
        msgs.append(nothing_loaded_line(result) + "\n")
    if not msgs:
        return ""
    msgs.insert(0, HEADER + "\n")
    return "\n".join(msgs)


def _format_folded(result: LoadResult) -> str:
    if result.ok:
        return ""
    lines: list[str] = []
    if result.nothing_loaded:
        lines.append(nothing_loaded_line(result))
    lines.append(f"{HEADER} (loaded {result.num_loaded} of {result.num_source_keys} keys)")
    _section(lines, UNEXPECTED, result.unexpected_keys)
    _section(lines, MISSING, result.reported_missing_keys)
    if result.mismatched:
        lines.append(f"size mismatch, not loaded ({len(result.mismatched)}):")
        groups: dict[tuple[tuple[int, ...], tuple[int, ...]], list[str]] = {}
        for m in result.mismatched:
            groups.setdefault((m.checkpoint_shape, m.model_shape), []).append(m.name)
        for (src, dst), names in groups.items():
            for pattern, count in fold_keys(names):
                lines.append(
                    f"    {printable(pattern)}: checkpoint {_fmt_shape(src)}, model "
                    f"{_fmt_shape(dst)}" + _count(count)
                )
    if result.collisions:
        lines.append(
            f"key collisions after revise_keys ({len(result.collisions)}), one value kept each:"
        )
        lines.extend(f"    {_describe_collision(c)}" for c in result.collisions)
    if result.other_errors:
        lines.append(f"other load errors ({len(result.other_errors)}):")
        lines.extend(f"    {printable(msg.strip(), _MAX_MESSAGE)}" for msg in result.other_errors)
    return "\n".join(lines)


def _section(lines: list[str], title: str, keys: Sequence[str]) -> None:
    if not keys:
        return
    lines.append(f"{title} ({len(keys)}):")
    lines.extend(f"    {printable(pattern)}{_count(count)}" for pattern, count in fold_keys(keys))


def _count(n: int) -> str:
    return f"  [{n} keys]" if n > 1 else ""


def _fmt_shape(shape: tuple[int, ...]) -> str:
    return str(tuple(shape))


def _describe_collision(collision: Any) -> str:
    sources = ", ".join(map(printable, collision.sources))
    return f"{printable(collision.key)} <- {sources} (kept {printable(collision.kept)})"


def log_message(message: str, logger: LoggerLike = None, level: int = logging.WARNING) -> None:
    """Logs `message` on rank 0 only.

    Args:
        message: the text; nothing is logged when it is empty.
        logger: a `logging.Logger` (or adapter); a logger name; ``"silent"`` to log nothing;
            None or ``"current"`` for the ``"ckptmap"`` logger.
        level: the logging level.
    """
    if not message or logger == "silent" or get_dist_info()[0] != 0:
        return
    if logger is None or logger == "current":
        target: logging.Logger | logging.LoggerAdapter = logging.getLogger("ckptmap")
    elif isinstance(logger, str):
        target = logging.getLogger(logger)
    else:
        target = logger
    target.log(level, message)
