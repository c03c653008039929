"""Names, shapes and dtypes: of a checkpoint, of a model, and how two such tables compare.

`checkpoint_shapes` reads a checkpoint's table through `ckptmap.open_checkpoint` (headers only
where the format allows); `model_shapes` reads a model's state dict; `diff_checkpoint` compares
two tables after rules and a prefix, as ``ckptmap diff --against`` and `ckptmap.suggest_rules`
do. Against a model, the load's own plan (`ckptmap.plan_load`) is the exact answer;
`DiffResult.from_plan` puts it in the same terms.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ckptmap._core import KeyRules, diff_keys
from ckptmap.errors import PrefixNotFoundError
from ckptmap.opened import Checkpoint, open_checkpoint
from ckptmap.plan import LoadPlan
from ckptmap.prefix import filter_prefix
from ckptmap.revise import revise_keys
from ckptmap.save import get_state_dict

__all__ = [
    "DiffResult",
    "Shapes",
    "checkpoint_shapes",
    "diff_checkpoint",
    "format_name",
    "model_shapes",
]

#: name -> (shape, dtype); shape and dtype are None for entries that are not tensors
#: (``_extra_state``).
Shapes = OrderedDict[str, tuple[tuple[int, ...] | None, str | None]]


# --- the two sides ----------------------------------------------------------------------------


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _shapes_of(state_dict: Mapping[str, Any]) -> Shapes:
    out: Shapes = OrderedDict()
    for key, value in state_dict.items():
        if isinstance(value, torch.Tensor):
            out[key] = (tuple(value.shape), _dtype_name(value.dtype))
        else:
            out[key] = (None, None)
    return out


def checkpoint_shapes(
    path: str | os.PathLike[str], *, allowed_globals: Iterable[Any] = ()
) -> tuple[Shapes, str, bool]:
    """The state dict's names, shapes and dtypes of the checkpoint at `path` (or URI).

    Returns:
        `(shapes, format, header_only)`: `format` is the sniffed format's name; `header_only`
        is False only where the format must be read whole (legacy torch files, pickles).

    Raises:
        The errors of `ckptmap.open_checkpoint` and `ckptmap.find_state_dict`.
    """
    with open_checkpoint(path, allowed_globals=allowed_globals) as opened:
        shapes = _shapes_of(opened.meta_state_dict())
        return shapes, format_name(opened), opened.header_only


def format_name(opened: Checkpoint) -> str:
    return opened.format.value if opened.format is not None else "object"


def model_shapes(model: nn.Module) -> Shapes:
    """The names, shapes and dtypes of `model`'s state dict (persistent buffers and
    ``_extra_state`` included; model wrappers unwrapped, as the loaders do)."""
    return _shapes_of(get_state_dict(model, keep_vars=True))


# --- the comparison ---------------------------------------------------------------------------


@dataclass
class DiffResult:
    """What loading the checkpoint into the expected keys would report.

    Attributes:
        source_keys: keys of the checkpoint after rules and prefix.
        expected_keys: keys of the model (or the other checkpoint).
        missing: expected keys the checkpoint lacks (``num_batches_tracked`` left out).
        unexpected: checkpoint keys nothing expects.
        mismatched: `(key, checkpoint shape, expected shape)` of keys on both sides.
        collisions: `(key, sources, kept)` of checkpoint keys that the rules merged.
    """

    source_keys: int
    expected_keys: int
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    collisions: list[tuple[str, tuple[str, ...], str]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def matched(self) -> int:
        """Checkpoint keys that a load would take (expected, same shape)."""
        return self.source_keys - len(self.unexpected) - len(self.mismatched)

    @property
    def match(self) -> bool:
        """The keys and shapes match exactly, and no two checkpoint keys collide."""
        return not (
            self.missing or self.unexpected or self.mismatched or self.collisions or self.errors
        )

    @classmethod
    def from_plan(cls, plan: LoadPlan) -> DiffResult:
        """What `plan` says the load will report, in the diff's terms."""
        result = plan.result
        return cls(
            source_keys=result.num_source_keys,
            expected_keys=plan.expected_keys,
            missing=result.reported_missing_keys,
            unexpected=list(result.unexpected_keys),
            mismatched=[(m.name, m.checkpoint_shape, m.model_shape) for m in result.mismatched],
            collisions=[(c.key, tuple(c.sources), c.kept) for c in result.collisions],
            errors=list(result.other_errors),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "match": self.match,
            "source_keys": self.source_keys,
            "expected_keys": self.expected_keys,
            "matched": self.matched,
            "missing": self.missing,
            "unexpected": self.unexpected,
            "shape_mismatched": [
                {"key": k, "checkpoint": list(a), "expected": list(b)}
                for k, a, b in self.mismatched
            ],
            "collisions": [
                {"key": k, "sources": list(s), "kept": kept} for k, s, kept in self.collisions
            ],
            "errors": self.errors,
        }


def diff_checkpoint(
    source: Shapes,
    expected: Shapes,
    *,
    rules: KeyRules | None = None,
    prefix: str | None = None,
    source_name: str = "<checkpoint>",
) -> DiffResult:
    """Compares the checkpoint's `source` shapes with `expected` after `rules` and `prefix`.

    Raises:
        PrefixNotFoundError: `prefix` given and no key (after the rules) lies under it.
    """
    collisions: list[tuple[str, tuple[str, ...], str]] = []
    if rules is not None and len(rules):
        revised, found = revise_keys(source, rules)
        source = revised
        collisions = [(c.key, tuple(c.sources), c.kept) for c in found]
    if prefix:
        kept = filter_prefix(source, prefix, strip=True)
        if not kept:
            full = prefix if prefix.endswith(".") else prefix + "."
            tops = list(dict.fromkeys(k.split(".", 1)[0] for k in list(source)[:10_000]))[:10]
            raise PrefixNotFoundError(full, source_name, tops)
        source = kept
    missing, unexpected = diff_keys(list(source), list(expected))
    mismatched = []
    for key, (shape, _dtype) in source.items():
        other = expected.get(key)
        if other is None or shape is None or other[0] is None:
            continue
        if tuple(shape) != tuple(other[0]):
            mismatched.append((key, tuple(shape), tuple(other[0])))
    return DiffResult(
        source_keys=len(source),
        expected_keys=len(expected),
        missing=[k for k in missing if "num_batches_tracked" not in k],
        unexpected=list(unexpected),
        mismatched=mismatched,
        collisions=collisions,
    )
