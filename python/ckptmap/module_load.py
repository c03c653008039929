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
  messages; their copies are queued and done in batches by `ckptmap.transfer.copy_tensors`
  (CPU and CUDA tensors alike; anything unusual about a tensor, see `_matcher`, sends the
  module to its own `_load_from_state_dict`).
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
from enum import IntEnum
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
from ckptmap.transfer import COPY_DTYPES, PLAIN_TENSORS, copy_tensors
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


class NodeKind(IntEnum):
    """How a module of the tree is loaded."""

    #: The stock `_load_from_state_dict`, no load pre-hooks, the stock `set_extra_state`:
    #: matched by the loader itself, its copies batched.
    FAST = 0
    #: Stock loading code otherwise (a `set_extra_state` of its own, a tensor the batch does
    #: not take): its `_load_from_state_dict` is called with its own keys.
    PLAIN = 1
    #: An override of `_load_from_state_dict`, or load pre-hooks: called with its whole
    #: subtree, which it may change for its descendants.
    CUSTOM = 2


class EventKind(IntEnum):
    """What happens at one point of torch's visiting order."""

    #: A module's `_load_from_state_dict` is called (the copies queued before it are done).
    LOAD = 0
    #: A fast module's outcome (missing, unexpected and error entries) joins the lists.
    COMMIT = 1
    #: A module's load post-hooks run, after its subtree (the queued copies are done).
    POST = 2


class Event(NamedTuple):
    """One step of the replay.

    Attributes:
        order: where it happens: ``2 * i`` at module ``i`` (modules numbered in pre-order),
            ``2 * n - 1`` for the post-hooks of a subtree whose last module is ``n - 1``.
        node: the module it concerns.
        kind: what happens.
        queued: how many copies of the top region were queued before it; they are done
            before a LOAD or POST runs any module code.
    """

    order: int
    node: int
    kind: EventKind
    queued: int


_FAST, _PLAIN, _CUSTOM = NodeKind.FAST, NodeKind.PLAIN, NodeKind.CUSTOM
_LOAD, _COMMIT, _POST = EventKind.LOAD, EventKind.COMMIT, EventKind.POST
_TOP = -1  # the region of modules not below a custom module
_BASE_LOAD = nn.Module._load_from_state_dict
_BASE_SET_EXTRA = nn.Module.set_extra_state
_EXTRA = "_extra_state"
_MISS = object()


_group_by_owner: Callable[[Sequence[str], Sequence[str]], list[list[int]]] = group_by_owner


class _Region(NamedTuple):
    """The dict a group of modules take their keys from, listed once for grouping."""

    keys: list[str]
    values: list[Any]
    state: Mapping[str, Any]


class _Match(NamedTuple):
    """A fast module's outcome when there is something to record.

    Attributes:
        missing: its missing keys, or None.
        errors: its error messages (shape mismatches), or None.
        device: whether one of its copies involves a device (not only CPU memory).
    """

    missing: list[str] | None
    errors: list[str] | None
    device: bool


#: `_match`'s outcome for a module with nothing to record: every tensor found, in CPU memory.
_CLEAN = _Match(None, None, False)


def _matcher(
    state: Mapping[str, Any],
    dst: list[torch.Tensor],
    src: list[torch.Tensor],
    matched: list[str],
) -> Callable[[Iterable[tuple[str, Any]], str], _Match | None]:
    """`match(entries, prefix)`: the parameter and buffer half of torch's
    `Module._load_from_state_dict` for one module, copies deferred.

    `entries` are the module's (name, tensor) pairs in torch's order, `prefix` its path with
    a trailing dot; keys are looked up in `state`. Each copy is appended to `dst`/`src` and
    each key found to `matched`. Returns `_CLEAN` or a `_Match`, or None when a tensor needs
    torch's own code: the module is then loaded by its `_load_from_state_dict`, and the
    caller removes what was appended.

    A tensor joins the batch only if its copy cannot fail or warn, and needs nothing of
    torch's beyond the copy: plain strided tensors in CPU memory or on a CUDA device, a
    `COPY_DTYPES` dtype each, a contiguous parameter outside inference mode (not lazy, not
    meta). This is the one statement of the fast path's rule; `ckptmap.transfer.copy_tensors`
    takes the pairs it admits. A closure, so that the hot loop (once per module, the inner
    loop once per tensor) reads everything from fast locals.
    """
    miss = _MISS
    plain = PLAIN_TENSORS
    strided = torch.strided
    dtypes = COPY_DTYPES
    get = state.get
    add_dst = dst.append
    add_src = src.append
    add_matched = matched.append
    clean = _CLEAN

    def match(entries: Iterable[tuple[str, Any]], prefix: str) -> _Match | None:
        missing: list[str] | None = None
        errors: list[str] | None = None
        device = False
        for name, param in entries:
            if param is None:
                continue
            key = prefix + name
            value = get(key, miss)
            if value is miss:
                if missing is None:
                    missing = []
                missing.append(key)
                continue
            dtype = param.dtype
            if not (
                type(value) in plain
                and type(param) in plain
                and value.layout is strided
                and param.layout is strided
                and dtype in dtypes
                and (value.dtype is dtype or value.dtype in dtypes)
                and param.is_contiguous()
                and not param.is_inference()
            ):
                return None
            if not (value.is_cpu and param.is_cpu):
                if not ((value.is_cpu or value.is_cuda) and (param.is_cpu or param.is_cuda)):
                    return None
                device = True
            add_matched(key)
            shape = param.shape
            # Kept by torch for 0.3 checkpoints: a 1-element 1-dim tensor loads into a 0-dim
            # parameter.
            if not shape and value.dim() == 1 and value.shape[0] == 1:
                value = value[0]
            if value.shape != shape:
                if errors is None:
                    errors = []
                errors.append(_size_mismatch(key, value, param))
                continue
            add_dst(param)
            add_src(value)
        if missing is None and errors is None and not device:
            return clean
        return _Match(missing, errors, device)

    return match


class _Loader:
    """One load of a module tree.

    The tree is walked once in torch's order. Fast modules of the top region (not below a
    custom module) are matched against the source while walking; their copies are queued in
    `top_dst`/`top_src` and their outcome recorded per module. Everything that must happen in
    order (custom and plain modules' loads, post-hooks, the fast modules' outcomes) becomes an
    `Event`; `run` replays the events, doing the queued copies before anything that could look
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
        self.kinds: list[NodeKind] = []
        self.regions: list[int] = []
        # Members of each custom module's region: they get their keys from its dict.
        self.members: dict[int, list[int]] = {}
        self.events: list[Event] = []
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
        # Whether a queued copy involves a device (else all copies are in CPU memory).
        self.device_copies = False
        # Keys of the modules loaded through their own `_load_from_state_dict`.
        self.views: dict[int, _Region] = {}
        self.owned: dict[int, list[int]] = {}
        self.class_traits: dict[type, tuple[bool, NodeKind]] = {}
        self._walk(root)
        self._assign_leftovers()

    # -- the walk --

    def _class_traits(self, cls: type) -> tuple[bool, NodeKind]:
        """(is a model wrapper, kind by the class alone), cached for this load."""
        traits = self.class_traits.get(cls)
        if traits is None:
            kind: NodeKind
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

        Once per module, hence written out with locals. A fast module of the top region is
        matched by `_match`; a tensor it cannot take sends the module to torch's code. A
        module's post-hooks run after its subtree: a marker is pushed before its children.
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
        match = _matcher(self.source, top_dst, top_src, matched)
        stack: list[tuple[Any, Any, int]] = [(root, "", _TOP)]
        push = stack.append
        module: Any = root
        prefix: Any = ""
        try:
            while stack:
                module, prefix, region = stack.pop()
                if module is None:  # the end of a subtree whose root has post-hooks
                    events.append(Event(2 * len(modules) - 1, prefix, _POST, len(top_dst)))
                    continue
                wrapper, kind = traits.get(type(module)) or class_traits(type(module))
                while wrapper:
                    module = module.module
                    wrapper, kind = traits.get(type(module)) or class_traits(type(module))
                i = len(modules)
                # The module's own attributes, read from its __dict__ (where nn.Module keeps
                # them) rather than through attribute lookup: this runs once per module.
                attrs = module.__dict__
                if kind is not _CUSTOM and (
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
                    events.append(Event(2 * i, i, _LOAD, len(top_dst)))
                elif kind is not _FAST:
                    events.append(Event(2 * i, i, _LOAD, len(top_dst)))
                elif params or buffers:
                    entries: Iterable[tuple[str, Any]] = params.items()
                    if buffers:
                        entries = _with_persistent_buffers(module, entries)
                    start = len(top_dst)
                    start_matched = len(matched)
                    outcome = match(entries, prefix)
                    if outcome is None:
                        del top_dst[start:], top_src[start:], matched[start_matched:]
                        kind = _PLAIN
                        events.append(Event(2 * i, i, _LOAD, len(top_dst)))
                    elif outcome is not _CLEAN:
                        missing, errors, device = outcome
                        if device:
                            self.device_copies = True
                        if missing is not None or errors is not None:
                            if missing is not None:
                                fast_missing[i] = missing
                            if errors is not None:
                                fast_errors[i] = errors
                            events.append(Event(2 * i, i, _COMMIT, 0))
                kinds.append(kind)
                if kind is _CUSTOM:
                    region = i
                    members[i] = []
                if attrs["_load_state_dict_post_hooks"]:
                    stack.append((None, i, 0))
                children = attrs["_modules"]
                if children:
                    # Pushed last to first, so that the first child is visited next. A loop,
                    # not a list comprehension: no extra frame per module.
                    for name, child in reversed(children.items()):
                        if child is not None:
                            push((child, f"{prefix}{name}.", region))
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
            if self.kinds[n] is not _FAST:
                self.views[n] = view
                self.owned[n] = group
                continue
            unexpected = _unexpected(self.modules[n], self.prefixes[n], keys, group)
            if unexpected:
                self.fast_unexpected[n] = unexpected
                if n not in self.fast_missing and n not in self.fast_errors:
                    self.events.append(Event(2 * n, n, _COMMIT, 0))
                    added = True
        if added:
            self.events.sort(key=_order)

    # -- replaying the events --

    def run(self) -> None:
        queued = 0
        try:
            for _, i, kind, queued in self.events:
                if kind is _COMMIT:
                    self.missing.extend(self.fast_missing.get(i, ()))
                    self.errors.extend(self.fast_errors.get(i, ()))
                    self.unexpected.extend(self.fast_unexpected.get(i, ()))
                elif kind is _LOAD:
                    self._load(i, queued)
                else:
                    self._flush(queued)
                    self._post_hooks(i)
            queued = len(self.top_dst)
        finally:
            # What was visited is copied even when a module's code raises, as in torch.
            self._flush(queued)

    def _load(self, i: int, queued: int) -> None:
        kind = self.kinds[i]
        if kind is _FAST:  # below a custom module
            if self._load_fast(i):
                return
            kind = _PLAIN
        self._flush(queued)
        if kind is _PLAIN:
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

    def _flush(self, queued: int) -> None:
        """Does every queued copy of the modules visited so far (see `copy_tensors`).

        The copies queued below custom modules come first: every top-region copy not yet done
        belongs to a module visited after them. Within a batch, a weight tied to two keys ends
        with the later one, as in torch.
        """
        dst: list[torch.Tensor] = []
        src: list[torch.Tensor] = []
        if self.dst:
            dst, src = self.dst, self.src
            self.dst, self.src = [], []
        if queued > self.top_done:
            dst += self.top_dst[self.top_done : queued]
            src += self.top_src[self.top_done : queued]
            self.top_done = queued
        if dst:
            copy_tensors(dst, src, host_only=not self.device_copies)

    def _load_fast(self, i: int) -> bool:
        """A fast module below a custom one: matched like the top region's, copies queued in
        `dst`/`src`. False when a tensor needs torch's code (nothing queued then)."""
        module = self.modules[i]
        prefix = self.prefixes[i]
        view = self.views.get(i)
        state: Mapping[str, Any] = {} if view is None else view.state
        entries: Iterable[tuple[str, Any]] = module._parameters.items()
        if module._buffers:
            entries = _with_persistent_buffers(module, entries)
        dst: list[torch.Tensor] = []
        src: list[torch.Tensor] = []
        outcome = _matcher(state, dst, src, [])(entries, prefix)
        if outcome is None:
            return False
        if outcome.missing:
            self.missing += outcome.missing
        if outcome.errors:
            self.errors += outcome.errors
        if outcome.device:
            self.device_copies = True
        if view is not None:
            self.unexpected += _unexpected(module, prefix, view.keys, self.owned[i])
        self.dst += dst
        self.src += src
        return True


def _order(event: Event) -> int:
    return event.order


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
