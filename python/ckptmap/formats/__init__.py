"""Checkpoint formats: sniff a file by its content, then load it the way its format allows.

=================  =====================================================================
format             how `load_file` reads it
=================  =====================================================================
torch zip          ckptmap's Rust reader (`ckptmap.formats.pth`): zero-copy, paged lazily;
                   what it can not build, ``torch.load(mmap=True, weights_only=True)``
legacy torch       ``torch.load(weights_only=True)`` read into memory (no mmap; one log line)
plain pickle       torch's weights-only unpickler, after a scan of the globals it needs
safetensors        `ckptmap.formats.safetensors` (validated header, zero-copy views)
sharded            `ckptmap.formats.sharded` (``*.index.json``, or a directory with one)
DCP                `ckptmap.formats.dcp`: a `torch.distributed.checkpoint` directory, planned
                   from ``.metadata``; tensors read by byte range on first access
TorchScript        `TorchScriptArchiveError`: use ``torch.jit.load``
anything else      `CorruptCheckpointError`: empty, truncated, HTML page, LFS pointer, ...
=================  =====================================================================

The file name never decides: a safetensors file named ``.pth`` loads as safetensors, a zip
named ``.safetensors`` as a torch checkpoint.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from ckptmap.errors import (
    InvalidStateDictError,
    TorchScriptArchiveError,
)
from ckptmap.formats import codec, pth
from ckptmap.formats.pickled import AllowedGlobal, load_pickle
from ckptmap.formats.sniff import Format, Sniffed, sniff

__all__ = [
    "AllowedGlobal",
    "Format",
    "Sniffed",
    "load_file",
    "sniff",
    "validate_state_dict",
]

_PICKLES = (Format.TORCH_ZIP, Format.TORCH_LEGACY, Format.PICKLE)


def load_file(
    path: str | os.PathLike[str],
    map_location: Any = None,
    *,
    weights_only: bool = True,
    allowed_globals: Iterable[AllowedGlobal] = (),
    mmap: bool | None = None,
) -> Any:
    """Loads a local checkpoint file (or sharded checkpoint directory), whatever its format.

    Args:
        path: a checkpoint file, a ``*.index.json``, a directory holding one, or a
            `torch.distributed.checkpoint` directory.
        map_location: as for `torch.load` (a device, a string, a dict or a callable).
        weights_only: keep True. False unpickles pickle checkpoints without restrictions and
            warns `UnsafeLoadWarning`; it has no effect on safetensors. DCP object entries
            are only ever read safely (False is refused when one is accessed).
        allowed_globals: objects (classes, functions) the safe unpickler may use besides
            torch's own allowlist, e.g. `ckptmap.formats.allowlist.MMENGINE_RUNNER` (for DCP:
            in ``.metadata`` and in object entries). Pass the objects, or
            ``(object, "module.name")`` pairs; names alone are never imported.
        mmap: memory-map the file (None: wherever the format allows it). Tensors of a mapped
            file are views of its pages: the file must not change while they are in use (a
            file truncated under them kills the process with SIGBUS, the OS's answer to a
            read past the end of a map). False reads every format into memory, safetensors
            and sharded checkpoints included, and leaves no map of the file.

    Returns:
        For pickles, what `torch.load` returns (any object: the caller looks for the state
        dict). For safetensors and sharded checkpoints written by `save_checkpoint`, the
        checkpoint it saved (entries, their order and the state dict's key order, decoded by
        `ckptmap.formats.codec`); for others, a mapping of names to tensors. For a DCP
        directory, a lazy `ckptmap.formats.dcp.DcpTree` with the saved nesting (tensors read
        on first access; objects through the safe unpickler only).

    Raises:
        CheckpointNotFoundError: no such path (`DanglingSymlinkError`: a broken symlink).
        CheckpointIsADirectoryError: a directory without an index file or DCP ``.metadata``.
        CheckpointPermissionError: the file exists but can not be read.
        CorruptCheckpointError: empty, truncated, damaged, or not a checkpoint at all.
        TorchScriptArchiveError: a `torch.jit.save` archive.
        UnsafeCheckpointError: a pickle that needs globals outside the allowlist.
        UnsafeAllowlistError: an `allowed_globals` entry that can run code (nothing is read).
    """
    from ckptmap.formats import allowlist

    allowed_globals = allowlist.checked(allowed_globals)  # before anything is read
    sniffed = sniff(path)
    sniffed.raise_if_corrupt()
    if sniffed.format is Format.TORCHSCRIPT:
        raise TorchScriptArchiveError(sniffed.path)
    if sniffed.format in _PICKLES:
        return load_pickle(
            sniffed,
            map_location,
            weights_only=weights_only,
            allowed_globals=allowed_globals,
            mmap=mmap,
            zip_reader=pth.load_fast,
        )
    if sniffed.format is Format.SAFETENSORS:
        return _load_safetensors(sniffed, map_location, mmap)
    if sniffed.format is Format.SHARDED:
        return _load_sharded(
            sniffed,
            map_location,
            weights_only=weights_only,
            allowed_globals=allowed_globals,
            mmap=mmap,
        )
    if sniffed.format is Format.DCP:
        return _load_dcp(
            sniffed, map_location, weights_only=weights_only, allowed_globals=allowed_globals
        )
    raise AssertionError(f"unhandled format {sniffed.format}")  # pragma: no cover


def validate_state_dict(state_dict: Any, path: str | os.PathLike[str]) -> Mapping[str, Any]:
    """Checks that `state_dict` maps str keys to tensors before it reaches a module.

    Values under ``_extra_state`` keys may be any object, as `torch.nn.Module` allows.

    Returns:
        `state_dict`, unchanged.

    Raises:
        InvalidStateDictError: not a mapping, a key that is not a str, or a value that is
            not a tensor; the message names the key and the file.
    """
    source = os.fspath(path)
    if not isinstance(state_dict, Mapping):
        raise InvalidStateDictError(
            f"the state dict in {source!r} is a {type(state_dict).__name__}, not a mapping of "
            "parameter names to tensors"
        )
    for key, value in state_dict.items():
        if not isinstance(key, str):
            raise InvalidStateDictError(
                f"the state dict in {source!r} has a key that is not a str: {key!r} (a "
                f"{type(key).__name__}); parameter names are dotted strings"
            )
        if not isinstance(value, torch.Tensor) and not (
            key == "_extra_state" or key.endswith("._extra_state")
        ):
            raise InvalidStateDictError(
                f"the state dict in {source!r} maps {key!r} to a {type(value).__name__}, not a "
                "tensor; check that this entry is the model's weights (e.g. not the optimizer "
                "state or the whole checkpoint)"
            )
    return state_dict


def _load_safetensors(sniffed: Sniffed, map_location: Any, mmap: bool | None) -> Any:
    # Imported on use: a pickle-only load never pays for it.
    from ckptmap.formats import safetensors

    tensors, metadata = safetensors.load_safetensors(sniffed.path, map_location, mmap=mmap)
    return codec.decode(tensors, metadata)


def _load_sharded(
    sniffed: Sniffed,
    map_location: Any,
    *,
    weights_only: bool,
    allowed_globals: Iterable[AllowedGlobal],
    mmap: bool | None,
) -> Any:
    from ckptmap.formats import sharded

    with sharded.open_sharded(
        sniffed.path,
        map_location,
        weights_only=weights_only,
        allowed_globals=tuple(allowed_globals),
        mmap=mmap,
    ) as opened:
        return codec.decode(opened.load(), opened.metadata)


def _load_dcp(
    sniffed: Sniffed,
    map_location: Any,
    *,
    weights_only: bool,
    allowed_globals: Iterable[AllowedGlobal],
) -> Any:
    # Ranged reads, never a map of whole data files: mmap has no meaning here.
    from ckptmap.formats import dcp

    return dcp.load_dcp(
        sniffed.path,
        map_location,
        weights_only=weights_only,
        allowed_globals=tuple(allowed_globals),
    )
