"""`load_checkpoint` and friends: from a checkpoint file to a loaded model.

The OpenMMLab functions (`load_checkpoint`, `_load_checkpoint`, `_load_checkpoint_to_model`,
`_load_checkpoint_with_prefix`) and vis4d's `load_model_checkpoint`, with the same arguments
and return values. Checkpoints come through `CheckpointLoader` (local paths and every
registered URI scheme); pickles load with ``weights_only=True``.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from ckptmap.module_load import finish_load, load_into, with_collisions
from ckptmap.opened import Checkpoint, open_checkpoint
from ckptmap.plan import DEFAULT_REVISE_KEYS, LoadPlan, plan_load, select_prefix
from ckptmap.report import LoggerLike, ReportStyle
from ckptmap.revise import RuleSpec, as_key_rules
from ckptmap.revise import revise_keys as _revise_keys
from ckptmap.schemes import CheckpointLoader
from ckptmap.statedict import find_state_dict

__all__ = [
    "DEFAULT_REVISE_KEYS",
    "Checkpoint",
    "LoadPlan",
    "_load_checkpoint",
    "_load_checkpoint_to_model",
    "_load_checkpoint_with_prefix",
    "find_state_dict",
    "load_checkpoint",
    "load_model_checkpoint",
    "open_checkpoint",
    "plan_load",
]

PathLike = str | os.PathLike[str]
MapLocation = str | torch.device | dict[str, str] | Callable[..., Any] | None
#: Objects, or ``(object, "module.name")`` pairs, a pickle may use (`ckptmap.formats.allowlist`).
AllowedGlobals = Iterable[Any]


def _load_checkpoint(
    filename: PathLike,
    map_location: MapLocation = None,
    logger: LoggerLike = None,
    *,
    allowed_globals: AllowedGlobals = (),
) -> Any:
    """Reads a checkpoint from a local path or any registered URI scheme.

    The path goes through `CheckpointLoader`'s registry (``http(s)://`` through the download
    cache, ``s3://``, the model zoos, local files); local files are recognised by content
    (torch zip, legacy pickle, safetensors, sharded index) and pickles load with
    ``weights_only=True``.

    Args:
        filename: a local path (`~` is expanded) or a URI.
        map_location: as for `torch.load`.
        logger: where the "Loads checkpoint" line goes (rank 0, INFO).
        allowed_globals: objects (classes, functions) a pickle checkpoint may use besides
            torch's list and the default allowlist, which already covers everything
            mmengine's Runner writes (`ckptmap.formats.allowlist`).

    Returns:
        The loaded object: usually a dict holding the weights or a ``"state_dict"`` entry.
    """
    return CheckpointLoader.load_checkpoint(
        filename, map_location, logger, allowed_globals=allowed_globals
    )


def _load_checkpoint_to_model(
    model: nn.Module,
    checkpoint: Any,
    strict: bool = False,
    logger: LoggerLike = None,
    revise_keys: RuleSpec = DEFAULT_REVISE_KEYS,
    *,
    report: ReportStyle = "folded",
    source: str = "<checkpoint>",
    assign: bool = False,
) -> Any:
    """Loads the weights of an already loaded checkpoint into `model`.

    The state dict is found by `find_state_dict`; `revise_keys` rename its keys (and the
    module paths of its `_metadata`) as `re.sub` would, each collision reported. With
    `assign=True` the parameters become the checkpoint's tensors (as torch's `assign=True`):
    with a memory-mapped checkpoint nothing is copied, and the file must not change while the
    model uses it.

    Returns:
        `checkpoint`, unchanged.
    """
    state_dict = find_state_dict(checkpoint, source)
    revised, collisions = _revise_keys(state_dict, revise_keys)
    result = with_collisions(load_into(model, revised, assign=assign), collisions)
    finish_load(result, strict=strict, logger=logger, report=report)
    return checkpoint


def load_checkpoint(
    model: nn.Module,
    filename: PathLike,
    map_location: MapLocation = None,
    strict: bool = False,
    logger: LoggerLike = None,
    revise_keys: RuleSpec = DEFAULT_REVISE_KEYS,
    *,
    report: ReportStyle = "folded",
    assign: bool = False,
    dry_run: bool = False,
    allowed_globals: AllowedGlobals = (),
) -> Any:
    """Loads a checkpoint file into `model`.

    Args:
        model: the module to load into (wrappers such as DistributedDataParallel are
            unwrapped).
        filename: the checkpoint's path.
        map_location: as for `torch.load`.
        strict: raise `StateDictMismatchError` (a RuntimeError) unless the keys match exactly
            and no shape differs.
        logger: where the mismatch report goes (rank 0); None: the ``"ckptmap"`` logger.
        revise_keys: `(pattern, replacement)` rules applied to every key in order, as
            `re.sub`; the default strips the `module.` prefix of wrapped models.
        report: ``"folded"`` or ``"flat"`` (the OpenMMLab message).
        assign: make the parameters the loaded tensors instead of copying into them (zero
            copy for memory-mapped files, which must then not change while in use).
        dry_run: change nothing: return the `LoadPlan` (what the load would report, which
            keys it would read, their bytes), computed without reading tensor data where
            the format allows.
        allowed_globals: objects (classes, functions) a pickle checkpoint may use besides
            torch's list and the default allowlist (numpy values, mmengine's HistoryBuffer:
            everything mmengine's Runner writes); see `ckptmap.formats.allowlist`.

    Returns:
        The loaded checkpoint (a dict), as the OpenMMLab function does; with `dry_run`, the
        `LoadPlan`.

    Raises:
        CheckpointNotFoundError: no file at `filename` (also a FileNotFoundError).
        NoStateDictError: the file holds no mapping of weights (also a RuntimeError).
        UnsafeCheckpointError: a pickle that needs globals outside the allowlist.
        StateDictMismatchError: `strict` and the weights do not match (also a RuntimeError).
        re.error: a pattern of `revise_keys` does not compile (before the file is read).
    """
    # Compiled up front, so a bad pattern fails before any file is read.
    rules = as_key_rules(revise_keys)
    if dry_run:
        with open_checkpoint(
            filename, map_location, logger, allowed_globals=allowed_globals
        ) as opened:
            return plan_load(opened, model, revise_keys=rules)
    checkpoint = _load_checkpoint(filename, map_location, logger, allowed_globals=allowed_globals)
    return _load_checkpoint_to_model(
        model,
        checkpoint,
        strict,
        logger,
        rules,
        report=report,
        source=os.fspath(filename),
        assign=assign,
    )


def _load_checkpoint_with_prefix(
    prefix: str,
    filename: PathLike,
    map_location: MapLocation = None,
    *,
    allowed_globals: AllowedGlobals = (),
) -> dict[str, Any]:
    """The weights under one sub-module of a checkpoint, with the prefix stripped.

    ``_load_checkpoint_with_prefix("backbone", f)`` keeps ``backbone.conv.weight`` as
    ``conv.weight``; ``"backbone"`` and ``"backbone."`` mean the same. Only the tensors under
    the prefix are built (read from disk when used), where the format allows it.

    Raises:
        PrefixNotFoundError: no key starts with the prefix (a ValueError and, as the
            OpenMMLab `assert` raised, an AssertionError); the message lists the top-level
            names the checkpoint has.
    """
    source = os.fspath(filename)
    with open_checkpoint(filename, map_location, allowed_globals=allowed_globals) as opened:
        names = OrderedDict((key, None) for key in opened.keys())
        wanted = select_prefix(names, prefix, source)
        full = prefix if prefix.endswith(".") or not prefix else prefix + "."
        selected = opened.state_dict([full + name for name in wanted])
        return dict(select_prefix(selected, prefix, source))


def load_model_checkpoint(
    model: nn.Module,
    weights: PathLike,
    strict: bool = False,
    rev_keys: RuleSpec | None = None,
    map_location: MapLocation = "cpu",
    *,
    allowed_globals: AllowedGlobals = (),
) -> None:
    """vis4d's entry point: `load_checkpoint` with vis4d's argument names and defaults.

    Args:
        model: the module to load into.
        weights: the checkpoint's path.
        strict: as in `load_checkpoint`.
        rev_keys: key rules; None strips the `module.` prefix.
        map_location: as for `torch.load`; CPU by default.
        allowed_globals: as in `load_checkpoint`.
    """
    load_checkpoint(
        model,
        weights,
        map_location=map_location,
        strict=strict,
        revise_keys=DEFAULT_REVISE_KEYS if rev_keys is None else rev_keys,
        allowed_globals=allowed_globals,
    )
