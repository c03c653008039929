"""Saving checkpoints so that no failure ever destroys a good one.

`save_checkpoint` takes mmengine 0.x's arguments, or mmcv 1.x's when its first argument is a
module. The package, by concern:

- `ckptmap.save.forms`: the two argument forms, and the checkpoint mmcv builds from a model;
- `ckptmap.save.state`: `get_state_dict` (wrappers unwrapped) and `weights_to_cpu`;
- `ckptmap.save.shards`: `max_shard_size`: `parse_size`, the shard plan and names, the index;
- `ckptmap.save.sinks`: where bytes go (local files atomically, S3 through boto3 or petrel).

The bytes themselves come from `ckptmap.formats` (``torch.save``'s zip format, the streaming
safetensors writer) and the non-tensor entries of a safetensors checkpoint are written by
`ckptmap.formats.codec`, which every loader reads them back with.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, overload

from torch import nn
from torch.optim import Optimizer

from ckptmap.checksum import with_checksum_option
from ckptmap.errors import SaveArgumentError
from ckptmap.formats.codec import encode
from ckptmap.formats.safetensors_write import write_safetensors
from ckptmap.formats.torch_write import torch_save
from ckptmap.save.forms import bind_arguments, mmcv_checkpoint
from ckptmap.save.shards import (
    INDEX_SUFFIX,
    is_safetensors_name,
    is_shard_file,
    parse_size,
    save_sharded,
)
from ckptmap.save.sinks import sink_for
from ckptmap.save.state import get_state_dict, weights_to_cpu

__all__ = [
    "INDEX_SUFFIX",
    "get_state_dict",
    "is_shard_file",
    "parse_size",
    "save_checkpoint",
    "weights_to_cpu",
]

PathLike = str | os.PathLike[str]


@overload
def save_checkpoint(
    checkpoint: nn.Module,
    filename: PathLike,
    optimizer: Optimizer | Mapping[str, Optimizer] | None = None,
    meta: dict | None = None,
    file_client_args: dict | None = None,
    *,
    max_shard_size: int | str | None = None,
) -> str: ...


@overload
def save_checkpoint(
    checkpoint: Any,
    filename: PathLike,
    file_client_args: dict | None = None,
    backend_args: dict | None = None,
    *,
    max_shard_size: int | str | None = None,
) -> str: ...


@with_checksum_option  # checksum=True: also write <file>.sha256 (see ckptmap.checksum)
def save_checkpoint(
    checkpoint: Any,
    filename: PathLike,
    *args: Any,
    max_shard_size: int | str | None = None,
    **kwargs: Any,
) -> str:
    """Saves a checkpoint so that a failure at any point leaves the previous file intact.

    Two call forms, told apart by the first argument:

    - mmengine 0.x: ``save_checkpoint(checkpoint, filename, file_client_args=None,
      backend_args=None)`` saves the object `checkpoint` (usually a dict) as it is.
    - mmcv 1.x: ``save_checkpoint(model, filename, optimizer=None, meta=None,
      file_client_args=None)`` with an `nn.Module` builds the checkpoint as mmcv does:
      ``{"meta": meta, "state_dict": weights_to_cpu(get_state_dict(model)), "optimizer": ...}``
      where `meta` (a copy; the caller's dict is not changed) gains ``ckptmap_version``,
      ``torch_version``, ``time`` (`time.asctime()`) and the model's ``CLASSES`` when it has
      them (mmcv writes ``mmcv_version`` instead of the first two). `optimizer` is one
      optimizer or a dict of them, saved as their ``state_dict()``.

    Targets: a local path (its directory is created, as mmengine does; a symlink stays one and
    the file it points to is replaced; the file's mode is kept), or ``[cluster:]s3://bucket/key``
    / ``petrel://bucket/key``, through petrel or boto3 by the rule of `ckptmap.objectstore`
    (the same that loads follow). `backend_args` (or `file_client_args`) may name the backend
    (``"local"`` / ``"disk"``; ``"petrel"`` / ``"boto3"``) and carry its arguments (boto3:
    ``endpoint_url``, ``region_name``, credentials, ``config``...; petrel: ``path_mapping``,
    ``enable_mc``, ``conf_path``); anything else is refused, never ignored.

    Formats, by the target's name: ``*.safetensors`` writes the state dict as safetensors and
    the checkpoint's other entries (``meta``...) in its metadata (`ckptmap.formats.codec`);
    anything else ``torch.save``'s format. With `max_shard_size`, shards plus an index
    (`ckptmap.save.shards`). Whatever is written loads back, through `_load_checkpoint` or
    `ckptmap.load_file`, as the same checkpoint, key order included.

    Args:
        checkpoint: the object to save, or the model (mmcv form).
        filename: where to save it.
        *args: the rest of the chosen form's arguments, positionally.
        max_shard_size: split the state dict into shards of at most this many bytes (an int,
            or a string such as ``"5GB"`` / ``"512MiB"``) and write an index. A tensor larger
            than the limit gets a shard of its own.
        **kwargs: the rest of the chosen form's arguments by name.

    Returns:
        The path or URI written: `filename`, or the index's name when sharding.

    Raises:
        CheckpointSaveError: the write failed (disk full, an I/O error, the store's error); an
            OSError with the errno, naming the target. `SavePermissionError` (a
            PermissionError), `CheckpointNotFoundError` (FileNotFoundError: no such bucket),
            `SaveUnavailableError` (ConnectionError: the store can not be reached).
        SaveTargetIsADirectoryError: the target is a directory (IsADirectoryError).
        NotSerializableError: (a TypeError) a value the chosen format can't hold, e.g. a
            tensor in the metadata of a safetensors file, or an unsupported dtype.
        UnsupportedSaveTargetError: (a ValueError) a scheme other than local paths and
            object stores.
        UnsupportedBackendError, BackendArgsError, InvalidURIError: a backend that can not
            write the target, arguments it does not take, an S3 URI without a key.
        SaveArgumentError, SaveArgumentTypeError: wrong arguments (ValueError / TypeError,
            as the OpenMMLab functions raise them).
        MissingDependencyError: boto3 or petrel_client is needed and not installed.
    """
    call = bind_arguments(checkpoint, args, kwargs)
    # Arguments first, so a bad target fails before a large model is copied to the CPU.
    limit = None if max_shard_size is None else parse_size(max_shard_size)
    sink, name = sink_for(filename, call.backend_args)
    sink.check(name)
    if limit is None and name.endswith(INDEX_SUFFIX):
        raise SaveArgumentError(
            f"{sink.display(name)}: a name ending in {INDEX_SUFFIX!r} is a sharded checkpoint's "
            "index; pass max_shard_size, or save under the name of a .pth / .safetensors"
        )
    if call.mmcv_form:
        checkpoint = mmcv_checkpoint(checkpoint, call.optimizer, call.meta)
    if limit is not None:
        return save_sharded(sink, name, checkpoint, limit)
    if is_safetensors_name(name):
        # The writer checks every tensor before its first byte: nothing is half-written.
        encoded = encode(checkpoint, sink.display(name))
        with sink.open(name) as f:
            write_safetensors(f, encoded.tensors, encoded.metadata)
    else:
        with sink.open(name) as f:
            torch_save(checkpoint, f)
    return sink.display(name)
