"""`load_checkpoint` and friends: from a checkpoint file to a loaded model.

The OpenMMLab functions (`load_checkpoint`, `_load_checkpoint`, `_load_checkpoint_to_model`,
`_load_checkpoint_with_prefix`) and vis4d's `load_model_checkpoint`, with the same arguments
and return values. Checkpoints come through `CheckpointLoader` (local paths and every
registered URI scheme); pickles load with ``weights_only=True``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ckptmap.errors import (
    NoStateDictError,
    PrefixNotFoundError,
)
from ckptmap.module_load import finish_load, load_into, with_collisions
from ckptmap.prefix import filter_prefix
from ckptmap.report import LoggerLike, ReportStyle
from ckptmap.revise import RuleSpec, as_key_rules
from ckptmap.revise import revise_keys as _revise_keys

__all__ = [
    "DEFAULT_REVISE_KEYS",
    "_load_checkpoint",
    "_load_checkpoint_to_model",
    "_load_checkpoint_with_prefix",
    "find_state_dict",
    "load_checkpoint",
    "load_model_checkpoint",
]

PathLike = str | os.PathLike[str]
MapLocation = str | torch.device | dict[str, str] | Callable[..., Any] | None

#: Strips the `module.` prefix that DataParallel / DistributedDataParallel add.
DEFAULT_REVISE_KEYS: tuple[tuple[str, str], ...] = ((r"^module\.", ""),)


def _load_checkpoint(
    filename: PathLike, map_location: MapLocation = None, logger: LoggerLike = None
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

    Returns:
        The loaded object: usually a dict holding the weights or a ``"state_dict"`` entry.
    """
    from ckptmap.schemes import CheckpointLoader

    return CheckpointLoader.load_checkpoint(filename, map_location, logger)


def find_state_dict(checkpoint: Any, source: str = "<checkpoint>") -> Mapping[str, Any]:
    """The weights in a loaded checkpoint: under ``"state_dict"``, then ``"model"``, else all of it.

    Args:
        checkpoint: what `torch.load` returned.
        source: the file name, for messages.

    Raises:
        NoStateDictError: the checkpoint (or its ``"state_dict"`` / ``"model"`` entry) is not a
            mapping.
    """
    if not isinstance(checkpoint, Mapping):
        raise NoStateDictError(source, checkpoint, "top-level object")
    if "state_dict" in checkpoint:
        state_dict = checkpoint["state_dict"]
        if not isinstance(state_dict, Mapping):
            raise NoStateDictError(source, state_dict, "'state_dict' entry")
        return state_dict
    if "model" in checkpoint:
        model = checkpoint["model"]
        if isinstance(model, Mapping):
            return model
        if not isinstance(model, torch.Tensor):
            raise NoStateDictError(source, model, "'model' entry")
        # A tensor named "model": the checkpoint is itself the state dict.
    return checkpoint


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

    Returns:
        The loaded checkpoint (a dict), as the OpenMMLab function does.

    Raises:
        CheckpointNotFoundError: no file at `filename` (also a FileNotFoundError).
        NoStateDictError: the file holds no mapping of weights (also a RuntimeError).
        StateDictMismatchError: `strict` and the weights do not match (also a RuntimeError).
        re.error: a pattern of `revise_keys` does not compile (before the file is read).
    """
    # Compiled up front, so a bad pattern fails before any file is read.
    rules = as_key_rules(revise_keys)
    checkpoint = _load_checkpoint(filename, map_location, logger)
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
    prefix: str, filename: PathLike, map_location: MapLocation = None
) -> dict[str, Any]:
    """The weights under one sub-module of a checkpoint, with the prefix stripped.

    ``_load_checkpoint_with_prefix("backbone", f)`` keeps ``backbone.conv.weight`` as
    ``conv.weight``; ``"backbone"`` and ``"backbone."`` mean the same.

    Raises:
        PrefixNotFoundError: no key starts with the prefix (a ValueError and, as the
            OpenMMLab `assert` raised, an AssertionError); the message lists the top-level
            names the checkpoint has.
    """
    checkpoint = _load_checkpoint(filename, map_location=map_location)
    state_dict = find_state_dict(checkpoint, os.fspath(filename))
    kept = filter_prefix(state_dict, prefix, strip=True)
    if not kept:
        full = prefix if prefix.endswith(".") or not prefix else prefix + "."
        raise PrefixNotFoundError(full, os.fspath(filename), _top_level_names(state_dict))
    return kept


def load_model_checkpoint(
    model: nn.Module,
    weights: PathLike,
    strict: bool = False,
    rev_keys: RuleSpec | None = None,
    map_location: MapLocation = "cpu",
) -> None:
    """vis4d's entry point: `load_checkpoint` with vis4d's argument names and defaults.

    Args:
        model: the module to load into.
        weights: the checkpoint's path.
        strict: as in `load_checkpoint`.
        rev_keys: key rules; None strips the `module.` prefix.
        map_location: as for `torch.load`; CPU by default.
    """
    load_checkpoint(
        model,
        weights,
        map_location=map_location,
        strict=strict,
        revise_keys=DEFAULT_REVISE_KEYS if rev_keys is None else rev_keys,
    )


def _top_level_names(state_dict: Mapping[str, Any], limit: int = 10) -> Sequence[str]:
    names: dict[str, None] = {}
    for key in state_dict:
        names.setdefault(str(key).split(".", 1)[0], None)
        if len(names) >= limit:
            break
    return list(names)
