"""Where tensors reach modules: `load_state_dict` over a module tree, linear in the keys.

torch's `Module.load_state_dict` (and the OpenMMLab copies of it) hand every module a dict
holding its whole subtree, built by scanning the parent's dict once per child: quadratic on a
wide `ModuleList`. A module's `_load_from_state_dict` only looks up `prefix + name` for its own
tensors, and reports as unexpected the keys under `prefix` whose first component is neither a
child module nor its own state. So a dict holding exactly the keys a module *owns* (those of
which it is the deepest module whose path is a dotted prefix) gives the same outcome.

One walk over the tree, in torch's order, does the work:

- Modules with the stock `_load_from_state_dict`, no load pre-hooks and the stock
  `set_extra_state` ("fast" modules) look their tensors up directly, with torch's checks and
  messages; their copies are batched into `torch._foreach_copy_` (CPU tensors: anything else,
  or anything unusual about a tensor, sends the module to its own `_load_from_state_dict`).
- The keys no fast module took are grouped by owner once, in the Rust key index: the fast
  modules' unexpected keys, and the keys of every other module.
- Modules that override `_load_from_state_dict` or carry pre-hooks may read, rename or delete
  their descendants' keys (OpenMMLab modules rename old keys, BatchNorm adds
  `num_batches_tracked`). They receive their whole subtree, as in torch, and their
  descendants' keys are grouped again from the dict they leave behind, so the descendants see
  every change.
- Post-hooks run after their module's subtree, with the shared missing / unexpected lists, as
  in torch; every queued copy is done before any module code or hook runs.
"""

from __future__ import annotations

import dataclasses
import gc
import itertools
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import nn

# torch's own record type, so that post-hooks get exactly what torch gives them.
from torch.nn.modules.module import _IncompatibleKeys

from ckptmap._core import group_by_owner
from ckptmap.dist import get_dist_info
from ckptmap.errors import (
    InvalidStateDictError,
    LoadHookError,
    NothingLoadedWarning,
    StateDictMismatchError,
)
from ckptmap.report import (
    LoadResult,
    LoggerLike,
    ReportStyle,
    log_message,
    nothing_loaded_line,
)
from ckptmap.wrappers import LoadWrapperTypes as _wrapper_types
from ckptmap.wrappers import is_model_wrapper, register_model_wrapper, unwrap_model

__all__ = [
    "is_model_wrapper",
    "load_state_dict",
    "register_model_wrapper",
    "unwrap_model",
]

# Model wrappers are defined in ckptmap.wrappers. `_wrapper_types` answers isinstance and
# issubclass for the classes a load unwraps: ckptmap's registrations, mmengine's
# MODEL_WRAPPERS registry and BaseTTAModel, as they are at load time.


# --- public entry point ---------------------------------------------------------------------


def load_state_dict(
    module: nn.Module,
    state_dict: Mapping[str, Any],
    strict: bool = False,
    logger: LoggerLike = None,
    *,
    assign: bool = False,
    report: ReportStyle = "folded",
    fast: bool = True,
) -> LoadResult:
    """Loads `state_dict` into `module` and its descendants.

    The OpenMMLab `load_state_dict`: the parameters, buffers and extra states end as
    `torch.nn.Module.load_state_dict` leaves them (every `_load_from_state_dict` override and
    load hook runs), but a shape mismatch is reported and the parameter kept instead of
    raising. Model wrappers (see `register_model_wrapper`) are unwrapped at every level.
    Mismatches are logged on rank 0 only; `num_batches_tracked` missing keys are not reported.

    Args:
        module: the module that receives the weights.
        state_dict: parameter and buffer names to tensors; not modified. Its `_metadata`
            (per-module versions) is used as torch uses it.
        strict: raise `StateDictMismatchError` (a RuntimeError) when keys are missing or
            unexpected, or shapes mismatch, on every rank.
        logger: where the report goes (see `ckptmap.report.log_message`); None logs to the
            ``"ckptmap"`` logger.
        assign: assign the state dict's tensors to the module instead of copying into the
            existing ones, as torch's `assign=True`.
        report: ``"folded"`` (indices folded into patterns) or ``"flat"`` (the OpenMMLab
            message, key by key).
        fast: load modules with the stock loading code in one batch (same outcome, faster);
            False calls every module's `_load_from_state_dict`.

    Returns:
        A `LoadResult` with the missing, unexpected and shape-mismatched keys and every error
        message.

    Raises:
        StateDictMismatchError: `strict` is set and the state dict does not match.
        InvalidStateDictError: `state_dict` is not a mapping, or has a key that is not a str.
    """
    result = load_into(module, state_dict, assign=assign, fast=fast)
    return finish_load(result, strict=strict, logger=logger, report=report)


def load_into(
    module: nn.Module,
    state_dict: Mapping[str, Any],
    *,
    assign: bool = False,
    fast: bool = True,
    collisions: Iterable[Any] = (),
) -> LoadResult:
    """Loads `state_dict` into `module` and returns the outcome, without logging or raising."""
    if not isinstance(state_dict, Mapping):
        raise InvalidStateDictError(
            f"expected state_dict to be a mapping of names to tensors, got "
            f"{type(state_dict).__name__}; pass checkpoint['state_dict'] or use load_checkpoint"
        )
    metadata = getattr(state_dict, "_metadata", None)
    # Read, never written: a module that may change its keys gets a copy of them.
    source = state_dict if type(state_dict) in (dict, OrderedDict) else dict(state_dict)
    if set(map(type, source)) - {str}:
        key = next(k for k in source if type(k) is not str)
        raise InvalidStateDictError(
            f"state_dict key {key!r} is a {type(key).__name__}, not a str: state dict keys "
            "are dotted parameter names such as 'layer1.0.weight'"
        )
    use_fast = fast and not assign and not torch.__future__.get_swap_module_params_on_conversion()
    # The walk allocates a few small objects per module; on a model with a million live
    # objects the collector would rescan them all several times over for nothing.
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        loader = _Loader(unwrap_model(module), source, metadata, assign, use_fast)
        loader.run()
    finally:
        if gc_was_enabled:
            gc.enable()
    return LoadResult.build(
        loader.missing,
        loader.unexpected,
        loader.errors,
        collisions=collisions,
        num_source_keys=len(source),
    )


def finish_load(
    result: LoadResult,
    *,
    strict: bool,
    logger: LoggerLike = None,
    report: ReportStyle = "folded",
) -> LoadResult:
    """Raises (strict, every rank) or logs (rank 0) what `result` holds; returns it."""
    message = result.report(report)
    failed = bool(result.unexpected_keys or result.reported_missing_keys or result.error_msgs)
    if strict and failed:
        raise StateDictMismatchError(message, result)
    if result.nothing_loaded and get_dist_info()[0] == 0:
        warnings.warn(NothingLoadedWarning(nothing_loaded_line(result)), stacklevel=3)
    log_message(message, logger)
    return result


# --- the recursion --------------------------------------------------------------------------

# Node kinds. _FAST: the stock `_load_from_state_dict`, no pre-hooks, the stock
# `set_extra_state`: loaded by `_Loader` itself. _PLAIN: stock loading code otherwise (called
# with the module's own keys). _CUSTOM: an override or pre-hooks (called with its subtree).
_FAST, _PLAIN, _CUSTOM = 0, 1, 2
# Event types, in torch's visiting order: a module's load, a fast module's outcome (its missing,
# unexpected and error entries), a module's post-hooks.
_LOAD, _COMMIT, _POST = 0, 1, 2
_TOP = -1
_BASE_LOAD = nn.Module._load_from_state_dict
_BASE_SET_EXTRA = nn.Module.set_extra_state
_EXTRA = "_extra_state"
_PLAIN_TENSORS = (torch.Tensor, nn.Parameter)
_STRIDED = torch.strided
# dtypes whose CPU copies (with casting) cannot fail or warn.
_COPY_DTYPES = frozenset(
    {
        torch.float16,
        torch.bfloat16,
        torch.float32,
        torch.float64,
        torch.uint8,
        torch.int8,
        torch.int16,
        torch.int32,
        torch.int64,
        torch.bool,
    }
)
_MISS = object()


def _group_by_owner_py(keys: Sequence[str], paths: Sequence[str]) -> list[list[int]]:
    """What `ckptmap._core.group_by_owner` computes, in Python (the tests compare them)."""
    index: dict[str, int] = {}
    for i, path in enumerate(paths):
        index.setdefault(path, i)
    fallback = index.get("", len(paths))
    groups: list[list[int]] = [[] for _ in range(len(paths) + 1)]
    for j, key in enumerate(keys):
        owner = fallback
        pos = key.rfind(".")
        while pos >= 0:
            found = index.get(key[:pos])
            if found is not None:
                owner = found
                break
            pos = key.rfind(".", 0, pos) if pos else -1
        groups[owner].append(j)
    return groups


_group_by_owner: Callable[[Sequence[str], Sequence[str]], list[list[int]]] = group_by_owner


class _Region(NamedTuple):
    """The dict a group of modules take their keys from, listed once for grouping."""

    keys: list[str]
    values: list[Any]
    state: Mapping[str, Any]


class _Loader:
    """One load of a module tree.

    The tree is walked once in torch's order. Fast modules of the top region (not below a
    custom module) are matched against the source while walking; their copies are queued in
    `top_dst`/`top_src` and their outcome recorded per module. Everything that must happen in
    order (custom and plain modules' loads, post-hooks, the fast modules' outcomes) becomes an
    event; `run` replays the events, doing the queued copies before anything that could look
    at the weights. Modules below a custom module are loaded one by one when their turn comes,
    from the dict that custom module leaves behind.
    """

    def __init__(
        self,
        root: nn.Module,
        source: Mapping[str, Any],
        metadata: Mapping[str, Any] | None,
        assign: bool,
        fast: bool,
    ) -> None:
        self.source = source
        self.metadata = metadata
        self.assign = assign
        self.fast = fast
        self.missing: list[str] = []
        self.unexpected: list[str] = []
        self.errors: list[str] = []
        self.incompatible = _IncompatibleKeys(self.missing, self.unexpected)
        # The tree in pre-order (torch's `_load_from_state_dict` order).
        self.modules: list[nn.Module] = []
        self.prefixes: list[str] = []
        self.kinds: list[int] = []
        self.regions: list[int] = []
        # Members of each custom module's region: they get their keys from its dict.
        self.members: dict[int, list[int]] = {}
        # (order, node, type, copies queued before it), sorted by order.
        self.events: list[tuple[float, int, int, int]] = []
        # The top region's fast modules: queued copies, matched keys, outcomes.
        self.top_dst: list[torch.Tensor] = []
        self.top_src: list[torch.Tensor] = []
        self.top_done = 0
        self.matched: list[str] = []
        self.fast_missing: dict[int, list[str]] = {}
        self.fast_errors: dict[int, list[str]] = {}
        self.fast_unexpected: dict[int, list[str]] = {}
        # Copies queued by fast modules below custom ones, in visiting order.
        self.dst: list[torch.Tensor] = []
        self.src: list[torch.Tensor] = []
        # Keys of the modules loaded through their own `_load_from_state_dict`.
        self.views: dict[int, _Region] = {}
        self.owned: dict[int, list[int]] = {}
        self.class_traits: dict[type, tuple[bool, int]] = {}
        self._walk(root)
        self._assign_leftovers()

    # -- the walk --

    def _class_traits(self, cls: type) -> tuple[bool, int]:
        """(is a model wrapper, kind by the class alone), cached for this load."""
        traits = self.class_traits.get(cls)
        if traits is None:
            kind: int
            if cls._load_from_state_dict is not _BASE_LOAD:  # type: ignore[attr-defined]
                kind = _CUSTOM
            elif self.fast and getattr(cls, "set_extra_state", _BASE_SET_EXTRA) is _BASE_SET_EXTRA:
                kind = _FAST
            else:
                kind = _PLAIN
            traits = self.class_traits[cls] = (issubclass(cls, _wrapper_types), kind)
        return traits

    def _walk(self, root: nn.Module) -> None:
        """Flattens the tree in torch's order, loading the top region's fast modules on the way.

        The hot loop of a load (once per module and tensor), hence written out with locals.
        For a fast module of the top region it does what torch's `_load_from_state_dict` does
        for the parameters and buffers, copies deferred; anything unusual about a tensor sends
        the module to torch's code instead (see `_match`). A module's post-hooks run after its
        subtree: a marker is pushed before its children.
        """
        traits = self.class_traits
        class_traits = self._class_traits
        modules = self.modules
        prefixes = self.prefixes
        kinds = self.kinds
        regions = self.regions
        members = self.members
        events = self.events
        top_dst = self.top_dst
        top_src = self.top_src
        matched = self.matched
        fast_missing = self.fast_missing
        fast_errors = self.fast_errors
        state = self.source
        plain_tensors = _PLAIN_TENSORS
        copy_dtypes = _COPY_DTYPES
        strided = _STRIDED
        missing_value = _MISS
        stack: list[tuple[Any, Any, int]] = [(root, "", _TOP)]
        module: Any = root
        prefix: Any = ""
        try:
            while stack:
                module, prefix, region = stack.pop()
                if module is None:  # the end of a subtree whose root has post-hooks
                    events.append((len(modules) - 0.5, prefix, _POST, len(top_dst)))
                    continue
                wrapper, kind = traits.get(type(module)) or class_traits(type(module))
                while wrapper:
                    module = module.module
                    wrapper, kind = traits.get(type(module)) or class_traits(type(module))
                i = len(modules)
                # The module's own attributes, read from its __dict__ (where nn.Module keeps them)
                # rather than through attribute lookup: this runs once per module.
                attrs = module.__dict__
                if kind != _CUSTOM and (
                    attrs["_load_state_dict_pre_hooks"] or "_load_from_state_dict" in attrs
                ):
                    kind = _CUSTOM
                modules.append(module)
                prefixes.append(prefix)
                regions.append(region)
                params = attrs["_parameters"]
                buffers = attrs["_buffers"]
                if region != _TOP:
                    members[region].append(i)
                    events.append((i, i, _LOAD, len(top_dst)))
                elif kind != _FAST:
                    events.append((i, i, _LOAD, len(top_dst)))
                elif params or buffers:
                    entries: Iterable[tuple[str, Any]] = params.items()
                    if buffers:
                        entries = _with_persistent_buffers(module, entries)
                    start = len(top_dst)
                    start_matched = len(matched)
                    missing: list[str] | None = None
                    errors: list[str] | None = None
                    for name, param in entries:
                        if param is None:
                            continue
                        key = prefix + name
                        value = state.get(key, missing_value)
                        if value is missing_value:
                            if missing is None:
                                missing = []
                            missing.append(key)
                            continue
                        if not (
                            type(value) in plain_tensors
                            and type(param) in plain_tensors
                            and value.is_cpu
                            and param.is_cpu
                            and value.layout is strided
                            and param.layout is strided
                            and param.dtype in copy_dtypes
                            and (value.dtype is param.dtype or value.dtype in copy_dtypes)
                            and param.is_contiguous()
                            and not param.is_inference()
                        ):
                            # `copy_` might fail or warn: torch's own code reports it its way.
                            del top_dst[start:], top_src[start:], matched[start_matched:]
                            kind = _PLAIN
                            events.append((i, i, _LOAD, len(top_dst)))
                            break
                        matched.append(key)
                        shape = param.shape
                        # Kept by torch for 0.3 checkpoints: a 1-element 1-dim tensor loads into
                        # a 0-dim parameter.
                        if not shape and value.dim() == 1 and value.shape[0] == 1:
                            value = value[0]
                        if value.shape != shape:
                            if errors is None:
                                errors = []
                            errors.append(_size_mismatch(key, value, param))
                            continue
                        top_dst.append(param)
                        top_src.append(value)
                    else:
                        if missing is not None or errors is not None:
                            if missing is not None:
                                fast_missing[i] = missing
                            if errors is not None:
                                fast_errors[i] = errors
                            events.append((i, i, _COMMIT, 0))
                kinds.append(kind)
                if kind == _CUSTOM:
                    region = i
                    members[i] = []
                if attrs["_load_state_dict_post_hooks"]:
                    stack.append((None, i, 0))
                children = attrs["_modules"]
                if children:
                    stack.extend(
                        reversed(
                            [
                                (child, f"{prefix}{name}.", region)
                                for name, child in children.items()
                                if child is not None
                            ]
                        )
                    )
        except KeyError as err:  # a module whose nn.Module.__init__ never ran
            raise AttributeError(
                f"{type(module).__name__} at {prefix[:-1] or '<root>'!r} has no {err.args[0]} "
                "attribute: was nn.Module.__init__ called on it?"
            ) from err

    def _assign_leftovers(self) -> None:
        """Hands the top region's keys that no fast module took to their owners.

        They are the keys of plain and custom modules (their subtrees, for custom ones) and
        the fast modules' unexpected keys.
        """
        source = self.source
        if len(self.matched) == len(source):
            return
        taken = set(self.matched)
        keys = [k for k in source if k not in taken]
        values = [source[k] for k in keys]
        # Only modules whose prefix starts some leftover key can own one: usually a handful,
        # so the grouping does not pay for every module of the tree.
        wanted = {""}
        for key in keys:
            pos = key.find(".")
            while pos >= 0:
                wanted.add(key[: pos + 1])
                pos = key.find(".", pos + 1)
        regions = self.regions
        nodes = [
            n for n, prefix in enumerate(self.prefixes) if prefix in wanted and regions[n] == _TOP
        ]
        groups = _group_by_owner(keys, [self.prefixes[n][:-1] for n in nodes])
        view = _Region(keys, values, source)
        added = False
        for n, group in zip(nodes, groups, strict=False):
            if not group:
                continue
            if self.kinds[n] != _FAST:
                self.views[n] = view
                self.owned[n] = group
                continue
            unexpected = _unexpected(self.modules[n], self.prefixes[n], keys, group)
            if unexpected:
                self.fast_unexpected[n] = unexpected
                if n not in self.fast_missing and n not in self.fast_errors:
                    self.events.append((n, n, _COMMIT, 0))
                    added = True
        if added:
            self.events.sort(key=_order)

    # -- replaying the events --

    def run(self) -> None:
        marker = 0
        try:
            for _, i, kind, marker in self.events:
                if kind == _COMMIT:
                    self.missing.extend(self.fast_missing.get(i, ()))
                    self.errors.extend(self.fast_errors.get(i, ()))
                    self.unexpected.extend(self.fast_unexpected.get(i, ()))
                elif kind == _LOAD:
                    self._load(i, marker)
                else:
                    self._flush(marker)
                    self._post_hooks(i)
            marker = len(self.top_dst)
        finally:
            # What was visited is copied even when a module's code raises, as in torch.
            self._flush(marker)

    def _load(self, i: int, marker: int) -> None:
        kind = self.kinds[i]
        if kind == _FAST:  # below a custom module
            if self._load_fast(i):
                return
            kind = _PLAIN
        self._flush(marker)
        if kind == _PLAIN:
            self._call(i, self._own_dict(i))
            return
        if i == 0:
            # The root gets a copy of everything, `_metadata` included, as in torch.
            local: Mapping[str, Any] = OrderedDict(self.source)
            if self.metadata is not None:
                local._metadata = self.metadata  # type: ignore[attr-defined]
        else:
            local = self._own_dict(i)
        self._call(i, local)
        if self.members[i]:
            self._group(i, local)

    def _post_hooks(self, i: int) -> None:
        module = self.modules[i]
        for hook in module._load_state_dict_post_hooks.values():
            if hook(module, self.incompatible) is not None:
                raise LoadHookError(
                    "Hooks registered with ``register_load_state_dict_post_hook`` are not "
                    "expected to return new values, if incompatible_keys need to be modified, "
                    f"it should be done inplace (hook {hook!r} on {type(module).__name__} at "
                    f"{self.prefixes[i][:-1] or '<root>'!r})"
                )

    def _group(self, region: int, state: Mapping[str, Any]) -> None:
        """Hands each member of a custom module's region its keys from that module's dict."""
        members = self.members[region]
        keys = list(state.keys())
        for key in keys:
            if type(key) is not str:
                raise InvalidStateDictError(
                    f"{type(self.modules[region]).__name__}._load_from_state_dict or a load "
                    f"pre-hook put the non-str key {key!r} in the state dict"
                )
        paths = [self.prefixes[m][:-1] for m in members]
        paths.append(self.prefixes[region][:-1])
        groups = _group_by_owner(keys, paths)
        view = _Region(keys, list(state.values()), state)
        for m, group in zip(members, groups, strict=False):  # the region root's group is last
            self.views[m] = view
            self.owned[m] = group

    def _own_dict(self, i: int) -> dict[str, Any]:
        view = self.views.get(i)
        if view is None:
            return {}
        keys, values, _ = view
        return {keys[j]: values[j] for j in self.owned[i]}

    def _local_metadata(self, prefix: str) -> dict[str, Any]:
        local = {} if self.metadata is None else self.metadata.get(prefix[:-1], {})
        if self.assign:
            # torch writes this flag into the caller's metadata; a copy leaves it untouched.
            local = {**local, "assign_to_params_buffers": True}
        return local

    def _call(self, i: int, local: Mapping[str, Any]) -> None:
        prefix = self.prefixes[i]
        self.modules[i]._load_from_state_dict(
            local,
            prefix,
            self._local_metadata(prefix),
            True,
            self.missing,
            self.unexpected,
            self.errors,
        )

    def _flush(self, marker: int) -> None:
        """Does every queued copy of the modules visited so far, in visiting order.

        The copies queued below custom modules come first: every top-region copy not yet done
        belongs to a module visited after them.
        """
        batches = []
        if self.dst:
            batches.append((self.dst, self.src))
            self.dst, self.src = [], []
        if marker > self.top_done:
            batches.append(
                (self.top_dst[self.top_done : marker], self.top_src[self.top_done : marker])
            )
            self.top_done = marker
        if batches:
            with torch.no_grad():
                for dst, src in batches:
                    # On CPU this is `copy_` tensor by tensor, in order: a weight tied to two
                    # keys ends with the later one, as in torch.
                    torch._foreach_copy_(dst, src)

    def _load_fast(self, i: int) -> bool:
        """`_match_top` for a fast module below a custom one, copies queued in `dst`/`src`."""
        module = self.modules[i]
        prefix = self.prefixes[i]
        view = self.views.get(i)
        state: Mapping[str, Any] = {} if view is None else view.state
        outcome = _match(module, prefix, state, module._parameters, module._buffers)
        if outcome is None:
            return False
        missing, errors, dst, src, _ = outcome
        self.missing += missing
        self.errors += errors
        if view is not None:
            self.unexpected += _unexpected(module, prefix, view.keys, self.owned[i])
        self.dst += dst
        self.src += src
        return True


def _match(
    module: nn.Module,
    prefix: str,
    state: Mapping[str, Any],
    params: Mapping[str, Any],
    buffers: Mapping[str, Any],
) -> tuple[list[str], list[str], list[torch.Tensor], list[torch.Tensor], list[str]] | None:
    """The parameter and buffer half of torch's `Module._load_from_state_dict`, copies deferred.

    Returns `(missing, errors, dst, src, matched keys)`, or None when a tensor needs torch's
    own code (not a plain CPU tensor, an unusual dtype or layout, a lazy or inference-mode
    parameter).
    """
    missing: list[str] = []
    errors: list[str] = []
    dst: list[torch.Tensor] = []
    src: list[torch.Tensor] = []
    matched: list[str] = []
    entries: Iterable[tuple[str, Any]] = params.items()
    if buffers:
        entries = _with_persistent_buffers(module, entries)
    for name, param in entries:
        if param is None:
            continue
        key = prefix + name
        value = state.get(key, _MISS)
        if value is _MISS:
            missing.append(key)
            continue
        if not (
            type(value) in _PLAIN_TENSORS
            and type(param) in _PLAIN_TENSORS
            and value.is_cpu
            and param.is_cpu
            and value.layout is _STRIDED
            and param.layout is _STRIDED
            and param.dtype in _COPY_DTYPES
            and (value.dtype is param.dtype or value.dtype in _COPY_DTYPES)
            and param.is_contiguous()
            and not param.is_inference()
        ):
            # `param.copy_(value)` might fail or warn: torch's code reports it its way.
            return None
        matched.append(key)
        shape = param.shape
        # Kept by torch for 0.3 checkpoints: a 1-element 1-dim tensor loads into a 0-dim
        # parameter.
        if not shape and value.dim() == 1 and value.shape[0] == 1:
            value = value[0]
        if value.shape != shape:
            errors.append(_size_mismatch(key, value, param))
            continue
        dst.append(param)
        src.append(value)
    return missing, errors, dst, src, matched


def _order(event: tuple[float, int, int, int]) -> float:
    return event[0]


def _with_persistent_buffers(
    module: nn.Module, params: Iterable[tuple[str, Any]]
) -> Iterable[tuple[str, Any]]:
    """torch's local state order: the parameters, then the persistent buffers."""
    non_persistent = module._non_persistent_buffers_set
    persistent = [(k, v) for k, v in module._buffers.items() if k not in non_persistent]
    return itertools.chain(params, persistent)


def _size_mismatch(key: str, value: torch.Tensor, param: torch.Tensor) -> str:
    return (
        f"size mismatch for {key}: copying a param with shape {value.shape} from checkpoint, "
        f"the shape in current model is {param.shape}."
    )


def _unexpected(module: nn.Module, prefix: str, keys: list[str], owned: list[int]) -> list[str]:
    """torch's unexpected-key scan of a stock module, over the keys it owns."""
    params = module._parameters
    buffers = module._buffers
    non_persistent = module._non_persistent_buffers_set
    submodules = module._modules
    extra_key = prefix + _EXTRA
    unexpected: list[str] = []
    cut = len(prefix)
    for j in owned:
        key = keys[j]
        if key == extra_key:
            # Without a `set_extra_state`, an extra state is unexpected, reported first.
            unexpected.insert(0, key)
            continue
        rest = key[cut:]
        dot = rest.find(".")
        if dot >= 0:
            if rest[:dot] not in submodules:
                unexpected.append(key)
        elif params.get(rest) is None and (buffers.get(rest) is None or rest in non_persistent):
            unexpected.append(key)
    return unexpected


def with_collisions(result: LoadResult, collisions: Iterable[Any]) -> LoadResult:
    """`result` with its `collisions` replaced."""
    return dataclasses.replace(result, collisions=tuple(collisions))
