"""Planning a load: what loading a checkpoint into a model will do, known before doing it.

`plan_load(checkpoint, model)` runs the load's own steps on names and shapes only:

1. the state dict's keys are revised by the rules and filtered by the prefix with the very
   functions `load_checkpoint` uses (`ckptmap.revise.revise_keys`, `ckptmap.prefix`);
2. the module walk of `ckptmap.module_load` runs over ``meta`` tensors of the checkpoint's
   shapes and dtypes with every copy suppressed, so each module's own
   `_load_from_state_dict` (overrides that rename old keys, BatchNorm's version handling,
   hooks) decides what it takes exactly as in the real load, and the model is left untouched.

The `LoadPlan` holds the `LoadResult` the load will report (missing, unexpected,
shape-mismatched, collisions), the checkpoint keys the load will read and their bytes.
``ckptmap diff`` and ``load_checkpoint(..., dry_run=True)`` are this plan. Code in the model
that looks at tensor *values* while loading (a hook that sums a weight) sees meta tensors.
"""

from __future__ import annotations

import contextlib
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ckptmap.errors import PrefixNotFoundError
from ckptmap.module_load import load_into, with_collisions
from ckptmap.opened import Checkpoint
from ckptmap.prefix import filter_prefix
from ckptmap.report import LoadResult, ReportStyle
from ckptmap.revise import RuleSpec, as_key_rules
from ckptmap.revise import revise_keys as _revise_keys

__all__ = ["DEFAULT_REVISE_KEYS", "LoadPlan", "plan_load", "select_prefix"]

#: Strips the `module.` prefix that DataParallel / DistributedDataParallel add.
DEFAULT_REVISE_KEYS: tuple[tuple[str, str], ...] = ((r"^module\.", ""),)


@dataclass
class LoadPlan:
    """What loading a checkpoint into a model will do.

    Attributes:
        source: the checkpoint's path or URI.
        result: the `LoadResult` the load will report (its `collisions` included).
        reads: the checkpoint keys (as stored) whose tensors the load copies into the model.
        bytes_to_read: their total size in bytes.
        header_only: the plan was made without reading any tensor data.
        expected_keys: how many entries the model's state dict has.
    """

    source: str
    result: LoadResult
    reads: list[str] = field(default_factory=list)
    bytes_to_read: int = 0
    header_only: bool = True
    expected_keys: int = 0

    @property
    def ok(self) -> bool:
        """Nothing to report: every key matches, no shape differs, nothing collides."""
        return self.result.ok

    def report(self, style: ReportStyle = "folded") -> str:
        """The message the load will log (see `LoadResult.report`)."""
        return self.result.report(style)


def select_prefix(
    state_dict: Mapping[str, Any], prefix: str, source: str = "<checkpoint>"
) -> Mapping[str, Any]:
    """The entries under `prefix` with the prefix stripped (``"backbone"`` and ``"backbone."``
    mean the same), as `_load_checkpoint_with_prefix` returns them.

    Raises:
        PrefixNotFoundError: no key starts with the prefix; the message lists the top-level
            names the state dict has.
    """
    kept = filter_prefix(state_dict, prefix, strip=True)
    if not kept:
        full = prefix if prefix.endswith(".") or not prefix else prefix + "."
        raise PrefixNotFoundError(full, source, _top_level_names(state_dict))
    return kept


def _top_level_names(state_dict: Mapping[str, Any], limit: int = 10) -> list[str]:
    names: dict[str, None] = {}
    for key in state_dict:
        names.setdefault(str(key).split(".", 1)[0], None)
        if len(names) >= limit:
            break
    return list(names)


class _NoCopies(TorchFunctionMode):
    """Copies from ``meta`` tensors do nothing: the walk decides, the model does not change."""

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        kwargs = kwargs or {}
        if func is torch.Tensor.copy_:
            src = args[1] if len(args) > 1 else kwargs.get("src")
            if isinstance(src, torch.Tensor) and src.is_meta and not args[0].is_meta:
                return args[0]
        elif func is torch._foreach_copy_:
            srcs = args[1] if len(args) > 1 else kwargs.get("src", ())
            if any(isinstance(s, torch.Tensor) and s.is_meta for s in srcs):
                return None
        return func(*args, **kwargs)


@contextlib.contextmanager
def _no_extra_states(model: nn.Module) -> Iterator[None]:
    """`set_extra_state` does nothing inside the block (an instance attribute shadows the
    method; the class, which the walk inspects, is unchanged)."""
    patched = []
    for module in model.modules():
        if type(module).set_extra_state is not nn.Module.set_extra_state:
            module.__dict__["set_extra_state"] = _ignore_extra_state
            patched.append(module)
    try:
        yield
    finally:
        for module in patched:
            module.__dict__.pop("set_extra_state", None)


def _ignore_extra_state(state: Any) -> None:
    pass


def plan_load(
    checkpoint: Checkpoint | Mapping[str, Any],
    model: nn.Module,
    *,
    revise_keys: RuleSpec = DEFAULT_REVISE_KEYS,
    prefix: str | None = None,
) -> LoadPlan:
    """Plans loading `checkpoint` into `model` (see the module docstring); `model` is not changed.

    Args:
        checkpoint: an opened `Checkpoint` (`ckptmap.open_checkpoint`) or a state dict.
        model: the module the weights are meant for (wrappers are unwrapped, as in a load).
        revise_keys: `(pattern, replacement)` rules, as for `load_checkpoint`.
        prefix: keep only the keys under this prefix, stripped (after the rules).

    Returns:
        A `LoadPlan`.

    Raises:
        PrefixNotFoundError: `prefix` given and no key (after the rules) lies under it.
        re.error: a rule does not compile.
    """
    rules = as_key_rules(revise_keys)
    opened = checkpoint if isinstance(checkpoint, Checkpoint) else Checkpoint.of(checkpoint)
    shapes = opened.meta_state_dict()
    entries = {e.name: e for e in opened.entries()}
    # What each planned key was called in the file: the rules run on names -> names.
    names: OrderedDict[str, Any] = OrderedDict((k, k) for k in shapes)
    revised, collisions = _revise_keys(shapes, rules)
    origin, _ = _revise_keys(names, rules)
    if prefix:
        revised = select_prefix(revised, prefix, opened.source)
        origin = filter_prefix(origin, prefix, strip=True)
    with _NoCopies(), _no_extra_states(model), torch.no_grad(), warnings.catch_warnings():
        # A model built on the meta device (``ckptmap diff``) meets real tensors that modules
        # add themselves (BatchNorm's num_batches_tracked); torch warns that such copies do
        # nothing, which is what a dry run wants.
        warnings.filterwarnings("ignore", message=".*copying from a non-meta parameter")
        result = load_into(model, revised)
    result = with_collisions(result, collisions)
    skipped = set(result.unexpected_keys) | {m.name for m in result.mismatched}
    reads = [origin[k] for k in revised if k in origin and k not in skipped]
    return LoadPlan(
        source=opened.source,
        result=result,
        reads=reads,
        bytes_to_read=sum(entries[n].nbytes for n in reads if n in entries),
        header_only=opened.header_only,
        expected_keys=len(model.state_dict(keep_vars=True)),
    )
