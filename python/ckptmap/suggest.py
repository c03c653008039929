"""`suggest_rules`: the ``revise_keys`` that rename a checkpoint's keys onto a model's, inferred.

The inference runs in the Rust core (`ckptmap._core.suggest_rules`) on names, shapes and dtypes
alone: keys become skeletons with index slots, families of keys are matched by structure and
shape (names only break ties), and each structural change becomes one compact rule. A mapping
is made only where nothing else fits as well: where two candidates fit equally, both stay
unmapped and the result says so. The rules are then checked twice here: applied by `KeyRules`
(each mapped key must land on its model key), and by planning the load with them
(`_plan_check`: the load's own plan, `ckptmap.plan_load`, when the model is a module).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import torch
from torch import nn

from ckptmap import _core
from ckptmap._core import KeyRules
from ckptmap.errors import SuggestionCheckError
from ckptmap.opened import Checkpoint
from ckptmap.plan import plan_load
from ckptmap.prefix import filter_prefix
from ckptmap.report import fold_keys
from ckptmap.shapes import (
    DiffResult,
    Shapes,
    checkpoint_shapes,
    diff_checkpoint,
    model_shapes,
)

__all__ = [
    "Ambiguity",
    "RuleEvidence",
    "SuggestResult",
    "SuggestionCheckError",
    "Unmatched",
    "suggest_rules",
    "tensor_table",
]

Reason = Literal["no candidate", "shape differs", "ambiguous", "rule conflict"]

_REASONS: dict[str, Reason] = {
    "s": "shape differs",
    "a": "ambiguous",
    "n": "no candidate",
    "c": "rule conflict",
}


class RuleEvidence(NamedTuple):
    """One suggested rule and the keys it maps.

    Attributes:
        pattern: the regular expression (`re.sub` syntax).
        replacement: the replacement template.
        keys: how many checkpoint keys the rule changes on their way to their model key.
        examples: the first few as `(checkpoint key, model key)`.
    """

    pattern: str
    replacement: str
    keys: int
    examples: tuple[tuple[str, str], ...]


class Unmatched(NamedTuple):
    """A key that the rules leave without a counterpart, and why.

    Attributes:
        key: the key (checkpoint or model side).
        reason: ``"no candidate"`` (nothing on the other side fits), ``"shape differs"``
            (its structural counterpart has another shape or dtype), ``"ambiguous"`` (several
            keys fit as well; none was chosen) or ``"rule conflict"`` (no rule could map it
            without misrouting other keys).
        others: the counterpart (shape differs, rule conflict) or the candidates (ambiguous).
    """

    key: str
    reason: Reason
    others: tuple[str, ...] = ()


class Ambiguity(NamedTuple):
    """A key that several keys of the other side fit equally well.

    Attributes:
        side: ``"checkpoint"`` or ``"model"``: where `key` is.
        key: the contested key.
        candidates: the keys of the other side that fit it as well as each other.
    """

    side: Literal["checkpoint", "model"]
    key: str
    candidates: tuple[str, ...]


@dataclass(frozen=True)
class SuggestResult:
    """The suggested rules and what they do.

    Attributes:
        rules: `(pattern, replacement)` pairs for ``revise_keys=`` (applied in order, each as
            `re.sub`).
        evidence: per rule, how many keys it maps and examples.
        mapping: checkpoint key -> model key, for every tensor the rules load (same shape
            and dtype).
        checkpoint_keys: how many keys the checkpoint has (under the prefix, if given).
        model_keys: how many keys the model's state dict has.
        model_tensors: how many of those are tensors.
        unmatched_checkpoint: checkpoint keys left without a model key, with the reason.
        unmatched_model: model keys left without a checkpoint key, with the reason.
        ambiguities: contested keys of both sides with their candidates.
        check: the planned load with the rules (missing, unexpected, shape-mismatched keys,
            collisions), as ``ckptmap diff`` reports it.
    """

    rules: list[tuple[str, str]]
    evidence: list[RuleEvidence]
    mapping: dict[str, str]
    checkpoint_keys: int
    model_keys: int
    model_tensors: int
    unmatched_checkpoint: list[Unmatched] = field(default_factory=list)
    unmatched_model: list[Unmatched] = field(default_factory=list)
    ambiguities: list[Ambiguity] = field(default_factory=list)
    check: DiffResult | None = None

    @property
    def coverage(self) -> int:
        """How many model tensors the rules fill with a tensor of the same shape and dtype."""
        return len(self.mapping)

    @property
    def coverage_ratio(self) -> float:
        """`coverage` over the model's tensors (1.0 for a model without tensors)."""
        return self.coverage / self.model_tensors if self.model_tensors else 1.0

    def to_json(self) -> dict[str, Any]:
        """The result as JSON-able data."""

        def unmatched(items: Sequence[Unmatched]) -> list[dict[str, Any]]:
            return [{"key": u.key, "reason": u.reason, "others": list(u.others)} for u in items]

        return {
            "rules": [list(r) for r in self.rules],
            "evidence": [
                {
                    "pattern": e.pattern,
                    "replacement": e.replacement,
                    "keys": e.keys,
                    "examples": [list(x) for x in e.examples],
                }
                for e in self.evidence
            ],
            "checkpoint_keys": self.checkpoint_keys,
            "model_keys": self.model_keys,
            "model_tensors": self.model_tensors,
            "coverage": self.coverage,
            "coverage_ratio": self.coverage_ratio,
            "mapping": self.mapping,
            "unmatched_checkpoint": unmatched(self.unmatched_checkpoint),
            "unmatched_model": unmatched(self.unmatched_model),
            "ambiguities": [
                {"side": a.side, "key": a.key, "candidates": list(a.candidates)}
                for a in self.ambiguities
            ],
            "check": self.check.to_json() if self.check is not None else None,
        }

    def format(self, *, limit: int = 20) -> str:
        """The result for people: rules with evidence, coverage, what is left and why, and the
        rules as Python to paste. Long lists are folded (``layers.{0..31}.w``) and cut at
        `limit` lines."""
        lines = [f"rules ({len(self.rules)}):" if self.rules else "rules: none needed"]
        for i, e in enumerate(self.evidence, 1):
            count = f"{e.keys:,} key{'s' if e.keys != 1 else ''}"
            lines.append(f"  {i:>2}. {_raw(e.pattern)} => {_raw(e.replacement)}  [{count}]")
            lines.extend(f"        {a} -> {b}" for a, b in e.examples[:1])
        pct = 100.0 * self.coverage_ratio
        lines.append(
            f"coverage: {self.coverage:,} of {self.model_tensors:,} model tensors "
            f"({pct:.1f}%) from {self.checkpoint_keys:,} checkpoint keys"
        )
        for title, items in (
            ("unmatched in the checkpoint", self.unmatched_checkpoint),
            ("unmatched in the model", self.unmatched_model),
        ):
            if items:
                lines.append(f"{title} ({len(items):,}):")
                lines.extend(_folded(items, limit))
        if self.check is not None:
            c = self.check
            lines.append(
                f"load check: matched {c.matched:,}, missing {len(c.missing):,}, unexpected "
                f"{len(c.unexpected):,}, shape mismatched {len(c.mismatched):,}, collisions "
                f"{len(c.collisions):,}"
            )
        lines.append("revise_keys = [")
        lines.extend(f"    ({_raw(p)}, {_raw(r)})," for p, r in self.rules)
        lines.append("]")
        return "\n".join(lines)


def _raw(text: str) -> str:
    """`text` as a Python literal, raw when that spells it exactly."""
    if "\\" in text and "'" not in text and not text.endswith("\\") and text.isprintable():
        return f"r'{text}'"
    return repr(text)


def _folded(items: Sequence[Unmatched], limit: int) -> list[str]:
    groups: OrderedDict[tuple[Reason, tuple[str, ...]], list[str]] = OrderedDict()
    for u in items:
        # Candidates differ per key; group the reasons without them beyond the first.
        detail = u.others if u.reason != "ambiguous" or len(items) <= limit else ()
        groups.setdefault((u.reason, detail if len(items) <= limit else ()), []).append(u.key)
    out: list[str] = []
    for (reason, others), keys in groups.items():
        for pattern, n in fold_keys(keys):
            suffix = f"  [{n:,} keys]" if n > 1 else ""
            what = reason
            if others:
                joiner = " or " if reason == "ambiguous" else ", "
                what += (": " if reason != "ambiguous" else " between ") + joiner.join(others)
            out.append(f"    {pattern}  ({what}){suffix}")
    if len(out) > limit:
        out = [*out[:limit], f"    ... {len(out) - limit:,} more lines (see --json)"]
    return out


# --- the two tables ---------------------------------------------------------------------------


def _dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def _from_mapping(items: Iterable[tuple[Any, Any]]) -> Shapes:
    out: Shapes = OrderedDict()
    for key, value in items:
        if not isinstance(key, str):
            raise TypeError(f"state dict keys must be str, got {type(key).__name__} {key!r}")
        if isinstance(value, torch.Tensor):
            out[key] = (tuple(value.shape), _dtype_name(value.dtype))
        elif (
            isinstance(value, tuple)
            and len(value) == 2
            and (value[0] is None or isinstance(value[0], (tuple, list, torch.Size)))
        ):
            shape, dtype = value
            out[key] = (
                None if shape is None else tuple(int(d) for d in shape),
                None if dtype is None else _dtype_name(dtype),
            )
        else:
            out[key] = (None, None)
    return out


def tensor_table(
    checkpoint: Any, *, allowed_globals: Iterable[Any] = ()
) -> tuple[Shapes, str | None]:
    """The names, shapes and dtypes of a checkpoint, without reading tensor data where the
    format allows.

    Args:
        checkpoint: a state dict (name -> tensor), a mapping name -> `(shape, dtype)` (as
            `ckptmap.cli.diff.checkpoint_shapes` returns), an object with ``names``, ``shapes``
            and ``dtypes`` (such as `ckptmap.formats.safetensors.SafetensorsFile`), an
            `nn.Module` (its state dict), or a local path or URI.
        allowed_globals: extra pickle globals for pickled checkpoints.

    Returns:
        `(shapes, source)`: `source` names the file or URI (None for objects).
    """
    if isinstance(checkpoint, nn.Module):
        return model_shapes(checkpoint), None
    if isinstance(checkpoint, (str, os.PathLike)):
        path = os.fspath(checkpoint)
        # Local files and URIs alike, opened by `ckptmap.open_checkpoint` (headers only
        # where the format allows).
        shapes, _fmt, _header_only = checkpoint_shapes(path, allowed_globals=allowed_globals)
        return shapes, path
    if isinstance(checkpoint, Mapping):
        return _from_mapping(checkpoint.items()), None
    if all(hasattr(checkpoint, a) for a in ("names", "shapes", "dtypes")):
        return _from_mapping(
            (n, (s, d))
            for n, s, d in zip(checkpoint.names, checkpoint.shapes, checkpoint.dtypes, strict=True)
        ), None
    raise TypeError(
        "checkpoint must be a state dict, a path or URI, an nn.Module or an object with "
        f"names/shapes/dtypes, not {type(checkpoint).__name__}"
    )


def _model_table(model: Any) -> Shapes:
    if isinstance(model, nn.Module):
        return model_shapes(model)
    shapes, _ = tensor_table(model)
    return shapes


# --- the checks -------------------------------------------------------------------------------


def _plan_check(
    source: Shapes, model: Any, expected: Shapes, rules: Sequence[tuple[str, str]]
) -> DiffResult:
    """What loading `source` into `model` with `rules` would report.

    Into a module: the load's own plan (`ckptmap.plan_load`, which runs the module walk, so
    overrides of `_load_from_state_dict` count); against another checkpoint's table: the
    key-level comparison ``ckptmap diff --against`` makes.
    """
    if isinstance(model, nn.Module):
        shapes: OrderedDict[str, Any] = OrderedDict(
            (name, torch.empty(shape, dtype=getattr(torch, dtype), device="meta"))
            for name, (shape, dtype) in source.items()
            if shape is not None and dtype is not None
        )
        return DiffResult.from_plan(plan_load(Checkpoint.of(shapes), model, revise_keys=rules))
    return diff_checkpoint(source, expected, rules=KeyRules(rules) if rules else None)


def _verify(
    source: Shapes,
    intended: Mapping[int, str],
    rules: Sequence[tuple[str, str]],
    model: Shapes,
) -> list[str]:
    """Applies `rules` by `KeyRules`; checks that every key in `intended` (checkpoint position
    -> model key) lands on its model key, and that no other key lands on a model key that is
    intended for another or has its shape and dtype (that would load it unchecked).

    Returns:
        The revised checkpoint keys.
    """
    names = list(source)
    revised = KeyRules(rules).apply(names) if rules else names
    taken = set(intended.values())
    wrong = [
        (names[i], revised[i], intended.get(i))
        for i in range(len(names))
        if (i in intended and revised[i] != intended[i])
        or (
            i not in intended
            and revised[i] != names[i]
            and revised[i] in model
            and (revised[i] in taken or model[revised[i]] == source[names[i]])
        )
    ]
    if wrong:
        shown = "; ".join(f"{a} -> {b} (meant {c})" for a, b, c in wrong[:5])
        raise SuggestionCheckError(
            f"the suggested rules misroute {len(wrong)} key(s): {shown}. This is a bug in "
            "ckptmap's rule inference; please report it with the key lists."
        )
    return revised


# --- the entry point --------------------------------------------------------------------------


def suggest_rules(
    checkpoint: Any,
    model: Any,
    *,
    prefix: str | None = None,
    check: bool = True,
    allowed_globals: Iterable[Any] = (),
) -> SuggestResult:
    """Infers the ``revise_keys`` rules that rename a checkpoint's keys onto a model's.

    Args:
        checkpoint: a state dict (name -> tensor), a mapping name -> `(shape, dtype)`, an
            object with ``names``/``shapes``/``dtypes``, or a local path or URI (safetensors
            and sharded checkpoints are read from their headers only; torch zip files are
            mapped, not read).
        model: the `nn.Module` to load into (a model built on the meta device is enough: only
            names, shapes and dtypes are used), or a second checkpoint in any form above.
        prefix: consider only checkpoint keys under this prefix (``"backbone"`` keeps
            ``"backbone.x"``); the rules still apply to the full keys, so they work as
            ``revise_keys`` of `ckptmap.load_checkpoint` (other keys stay unexpected).
        check: plan the load with the rules and keep the report in `SuggestResult.check`.
        allowed_globals: extra pickle globals for pickled checkpoints.

    Returns:
        A `SuggestResult`: `rules` (for ``revise_keys=``), coverage, per-rule evidence, what
        is left unmatched on each side and why, and the ambiguities.

    Raises:
        TypeError: `checkpoint` or `model` is of no supported kind, or a key is not a str.
        SuggestionCheckError: the rules would not do what the inference meant (a bug).
        The errors of reading the checkpoint (see `ckptmap.cli.diff.checkpoint_shapes`).
    """
    source, _where = tensor_table(checkpoint, allowed_globals=allowed_globals)
    if prefix:
        source = OrderedDict(filter_prefix(source, prefix, strip=False))
    expected = _model_table(model)
    names = list(source)
    model_names = list(expected)
    raw_rules, (s_codes, s_other, s_cands), (t_codes, t_other, t_cands) = _core.suggest_rules(
        [(k, s, d) for k, (s, d) in source.items()],
        [(k, s, d) for k, (s, d) in expected.items()],
    )
    rules = [(p, r) for p, r, _n, _ex in raw_rules]
    intended = {i: model_names[s_other[i]] for i, c in enumerate(s_codes) if c in b"ms"}
    revised = _verify(source, intended, rules, expected)
    mapping = {names[i]: model_names[s_other[i]] for i, c in enumerate(s_codes) if c == ord("m")}
    unmatched_ckpt: list[Unmatched] = []
    unmatched_model: list[Unmatched] = []
    ambiguities: list[Ambiguity] = []
    for i, code in enumerate(s_codes):
        if code == ord("m"):
            continue
        key, reason = names[i], _REASONS[chr(code)]
        if reason == "ambiguous":
            cands = tuple(model_names[j] for j in s_cands[i])
            unmatched_ckpt.append(Unmatched(key, reason, cands))
            ambiguities.append(Ambiguity("checkpoint", key, cands))
            continue
        others = (model_names[s_other[i]],) if s_other[i] >= 0 else ()
        # A key that the rules send onto a model key of another shape: say so.
        landed = expected.get(revised[i])
        if reason == "no candidate" and landed is not None and landed != source[key]:
            reason, others = "shape differs", (revised[i],)
        unmatched_ckpt.append(Unmatched(key, reason, others))
    for j, code in enumerate(t_codes):
        if code == ord("m"):
            continue
        key, reason = model_names[j], _REASONS[chr(code)]
        if reason == "ambiguous":
            cands = tuple(names[i] for i in t_cands[j])
            unmatched_model.append(Unmatched(key, reason, cands))
            ambiguities.append(Ambiguity("model", key, cands))
        else:
            others = (names[t_other[j]],) if t_other[j] >= 0 else ()
            unmatched_model.append(Unmatched(key, reason, others))
    evidence = [
        RuleEvidence(p, r, n, tuple((names[i], intended[i]) for i in ex))
        for p, r, n, ex in raw_rules
    ]
    return SuggestResult(
        rules=rules,
        evidence=evidence,
        mapping=mapping,
        checkpoint_keys=len(names),
        model_keys=len(model_names),
        model_tensors=sum(1 for s, _d in expected.values() if s is not None),
        unmatched_checkpoint=unmatched_ckpt,
        unmatched_model=unmatched_model,
        ambiguities=ambiguities,
        check=_plan_check(source, model, expected, rules) if check else None,
    )
