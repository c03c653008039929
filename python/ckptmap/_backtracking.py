"""Refusing key rules on which Python's `re` can backtrack exponentially.

A rule that runs on Python's `re` (a callable replacement, a backreference, a lookaround, ...)
is at the mercy of `re`'s backtracking: `re.sub(r"^(\\w+)+$", "", "a" * 40 + "!")` does not
return in any reasonable time. Such a rule is refused when `KeyRules` is built
(`BacktrackingRuleError`), since a hang cannot be interrupted once `re` runs.

The shapes refused are the ones that make the backtracking exponential: a repeat whose body
can split one stretch of text between iterations in several ways. Judged on the parse of the
interpreter's own `re` parser, per repeat that can iterate more than once (not possessive):
- a repeat or an optional part at the end of the body that can match what starts the body
  (`(\\w+)+`, `(x\\w*)*`, `(a+b?)+`, `(a|aa)*`, which `re` reads as `(a(?:|a))*`), or one at
  its start that can match what ends the body (`(\\w*x)*`);
- alternatives inside the body (after `re`'s own factoring of common prefixes) that can
  start with the same character (`(\\d+|\\w+)+`).
The judgement is syntactic and conservative: a few safe patterns are refused too, and the
message says how to rewrite them. Polynomial backtracking (`\\w*\\w*\\w*x`) is not refused.
"""

from __future__ import annotations

import functools
import re
import sys
from typing import Any

from ckptmap.errors import BacktrackingRuleError

if sys.version_info >= (3, 11):
    from re import _constants as _c
    from re import _parser as _p
else:  # pragma: no cover - exercised by `make test-pythons` on 3.10
    import sre_constants as _c
    import sre_parse as _p

_LOOPS = {_c.MAX_REPEAT, _c.MIN_REPEAT}
_POSSESSIVE = getattr(_c, "POSSESSIVE_REPEAT", None)
_ATOMIC = getattr(_c, "ATOMIC_GROUP", None)
_CATEGORY = {
    _c.CATEGORY_DIGIT: r"\d",
    _c.CATEGORY_NOT_DIGIT: r"\D",
    _c.CATEGORY_SPACE: r"\s",
    _c.CATEGORY_NOT_SPACE: r"\S",
    _c.CATEGORY_WORD: r"\w",
    _c.CATEGORY_NOT_WORD: r"\W",
}
# Characters on which overlaps are judged, plus every character the pattern names.
_SAMPLE = [chr(c) for c in range(0x180)] + ["\u0663", "\u4e2d", "\u212a", "\u00e9", "\u2028"]

Item = tuple[Any, Any]


def check(index: int, compiled: re.Pattern[str]) -> None:
    """Raises `BacktrackingRuleError` when `compiled` has a shape `re` can backtrack
    exponentially on; `index` is the rule's position."""
    if not isinstance(compiled.pattern, str):
        return
    try:
        parsed = _p.parse(compiled.pattern, compiled.flags)
    except Exception:  # re.compile accepted it; a parser difference is not our concern
        return
    sample = sorted(set(_SAMPLE) | set(_named_chars(list(parsed))))
    fault = _find(list(parsed), sample)
    if fault is not None:
        part, why = fault
        raise BacktrackingRuleError(index, compiled.pattern, part, why)


def _named_chars(items: list[Item]) -> list[str]:
    out: list[str] = []
    for op, av in items:
        if op in (_c.LITERAL, _c.NOT_LITERAL):
            out.append(chr(av))
        elif op is _c.RANGE:
            out += [chr(av[0]), chr(av[1])]
        for sub in _children(op, av):
            out += _named_chars(sub)
        if op is _c.IN:
            out += _named_chars(list(av))
    return out


def _children(op: Any, av: Any) -> list[list[Item]]:
    """The sub-sequences of one parsed item."""
    if op in _LOOPS or op is _POSSESSIVE:
        return [list(av[2])]
    if op is _c.SUBPATTERN:
        return [list(av[3])]
    if op is _c.BRANCH:
        return [list(b) for b in av[1]]
    if op is _ATOMIC:
        return [list(av)]
    if op in (_c.ASSERT, _c.ASSERT_NOT):
        return [list(av[1])]
    if op is _c.GROUPREF_EXISTS:
        return [list(b) for b in av[1:] if b is not None]
    return []


def _find(items: list[Item], sample: list[str]) -> tuple[str, str] | None:
    for op, av in items:
        if op in _LOOPS and (av[1] is _c.MAXREPEAT or av[1] > 1):
            body = list(av[2])
            fault = _ambiguous(body, sample)
            if fault is not None:
                return fault
        for sub in _children(op, av):
            fault = _find(sub, sample)
            if fault is not None:
                return fault
    return None


def _ambiguous(body: list[Item], sample: list[str]) -> tuple[str, str] | None:
    first, last = _first(body), _last(body)
    for item in _flexible_edge(body, reverse=True):
        if _overlap(_first([item]), first, sample):
            return _show(body), "its end can stretch into what starts the next iteration"
    for item in _flexible_edge(body, reverse=False):
        if _overlap(_last([item]), last, sample):
            return _show(body), "its start can stretch back into what ends the iteration before"
    for branch in _edge_branches(body):
        starts = [_first(list(b)) for b in branch]
        for i, a in enumerate(starts):
            if any(_overlap(a, b, sample) for b in starts[i + 1 :]):
                return _show(body), "alternatives in a repeat can start with the same character"
    return None


def _nullable(item: Item) -> bool:
    op, av = item
    if op in _LOOPS or op is _POSSESSIVE:
        return av[0] == 0 or all(map(_nullable, av[2]))
    if op is _c.BRANCH:
        return any(all(map(_nullable, b)) for b in av[1])
    children = _children(op, av)
    if op in (_c.SUBPATTERN, _ATOMIC):
        return all(map(_nullable, children[0]))
    return op in (_c.AT, _c.ASSERT, _c.ASSERT_NOT, _c.GROUPREF, _c.GROUPREF_EXISTS)


def _flexible_edge(seq: list[Item], reverse: bool, outer_consumes: bool = False) -> list[Item]:
    """Items at the end (`reverse`) or start of `seq` that let a non-empty iteration end (or
    start) at more than one place: repeats that can iterate, and optional parts beside
    something that consumes text (an iteration that matches nothing ends the repeat in `re`,
    so `(|a)+` is safe and `(a(?:|a))*` is not)."""
    out: list[Item] = []
    order = range(len(seq) - 1, -1, -1) if reverse else range(len(seq))
    for i in order:
        item = seq[i]
        op, av = item
        others = seq[:i] if reverse else seq[i + 1 :]
        consumes = outer_consumes or _can_consume(others)
        looping = op in _LOOPS and (av[1] is _c.MAXREPEAT or av[1] > 1)
        optional = _nullable(item) and op not in (_c.AT, _c.ASSERT, _c.ASSERT_NOT)
        if looping or (optional and consumes):
            out.append(item)
        if op is not _POSSESSIVE and op not in (_c.ASSERT, _c.ASSERT_NOT):
            for sub in _children(op, av):
                out += _flexible_edge(sub, reverse, consumes)
        if not _nullable(item):
            break
    return out


def _can_consume(seq: list[Item]) -> bool:
    """Whether `seq` can match a non-empty string."""
    for op, av in seq:
        if op in (_c.LITERAL, _c.NOT_LITERAL, _c.ANY, _c.IN, _c.GROUPREF):
            return True
        if op in _LOOPS or op is _POSSESSIVE:
            if av[1] != 0 and _can_consume(list(av[2])):
                return True
        elif op not in (_c.ASSERT, _c.ASSERT_NOT) and any(
            _can_consume(sub) for sub in _children(op, av)
        ):
            return True
    return False


def _edge_branches(seq: list[Item]) -> list[list[Any]]:
    """Alternations reachable at the start of `seq` through groups."""
    out: list[list[Any]] = []
    for op, av in seq:
        if op is _c.BRANCH:
            out.append(av[1])
        elif op is _c.SUBPATTERN:
            out += _edge_branches(list(av[3]))
        if not _nullable((op, av)):
            break
    return out


def _first(seq: list[Item]) -> list[Item]:
    """The one-character items that can match the first character of `seq`."""
    return _edge(seq, from_end=False)


def _last(seq: list[Item]) -> list[Item]:
    """The one-character items that can match the last character of `seq`."""
    return _edge(seq, from_end=True)


def _edge(seq: list[Item], *, from_end: bool) -> list[Item]:
    out: list[Item] = []
    for item in reversed(seq) if from_end else seq:
        op, av = item
        if op in (_c.LITERAL, _c.NOT_LITERAL, _c.ANY, _c.IN):
            out.append(item)
        elif op is _c.GROUPREF:
            out.append((_c.ANY, None))
        else:
            for sub in _children(op, av):
                if op not in (_c.ASSERT, _c.ASSERT_NOT):
                    out += _edge(sub, from_end=from_end)
        if not _nullable(item):
            break
    return out


@functools.cache
def _category(cat: Any, ch: str) -> bool:
    return re.fullmatch(_CATEGORY.get(cat, "[^\\s\\S]"), ch) is not None


def _matches(item: Item, ch: str) -> bool:
    op, av = item
    if op is _c.LITERAL:
        return chr(av).lower() == ch.lower()
    if op is _c.NOT_LITERAL:
        return chr(av) != ch
    if op is _c.ANY:
        return True
    if op is _c.IN:
        negate = any(o is _c.NEGATE for o, _ in av)
        hit = False
        for o, a in av:
            if o is _c.LITERAL:
                hit = chr(a).lower() == ch.lower()
            elif o is _c.RANGE:
                hit = a[0] <= ord(ch) <= a[1] or a[0] <= ord(ch.lower()[:1] or ch) <= a[1]
            elif o is _c.CATEGORY:
                hit = _category(a, ch)
            if hit:
                break
        return hit != negate
    return True


def _overlap(a: list[Item], b: list[Item], sample: list[str]) -> bool:
    if not a or not b:
        return False
    return any(any(_matches(x, ch) for x in a) and any(_matches(y, ch) for y in b) for ch in sample)


def _show(body: list[Item]) -> str:
    """A readable rendering of a repeat's body for the message."""
    try:
        return "".join(_render(item) for item in body)
    except Exception:  # rendering is best effort; the rule index and pattern are in the message
        return "..."


def _render(item: Item) -> str:
    op, av = item
    if op is _c.LITERAL:
        return re.escape(chr(av))
    if op is _c.ANY:
        return "."
    if op is _c.IN:
        if len(av) == 1 and av[0][0] is _c.CATEGORY:
            return _CATEGORY.get(av[0][1], "[...]")
        return "[...]"
    if op in _LOOPS or op is _POSSESSIVE:
        lo, hi = av[0], av[1]
        inner = "".join(_render(i) for i in av[2])
        if len(av[2]) > 1 or (av[2] and av[2][0][0] not in (_c.LITERAL, _c.IN, _c.ANY)):
            inner = f"(?:{inner})"
        count = {(0, _c.MAXREPEAT): "*", (1, _c.MAXREPEAT): "+", (0, 1): "?"}.get(
            (lo, hi), "{{{},{}}}".format(lo, "" if hi is _c.MAXREPEAT else hi)
        )
        return inner + count + ("?" if op is _c.MIN_REPEAT else "")
    if op is _c.SUBPATTERN:
        return "(" + "".join(_render(i) for i in av[3]) + ")"
    if op is _c.BRANCH:
        return "(?:" + "|".join("".join(_render(i) for i in b) for b in av[1]) + ")"
    return "..."
