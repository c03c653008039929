"""Saving checkpoints so that no failure ever destroys a good one.

`save_checkpoint` takes mmengine 0.x's arguments, or mmcv 1.x's when its first argument is a
module. Every local file goes through `ckptmap.atomic.atomic_write` (a temp file beside the
target, fsynced, renamed over it, the directory fsynced), so a crash, a full disk or an
exception leaves the previous checkpoint exactly as it was. ``s3://`` targets are uploaded with
a single PUT or a multipart upload, both of which S3 makes visible only once complete; a failed
upload is aborted.

Formats, chosen by the target's name:

- anything else than below: ``torch.save``'s zip format, streamed to the temp file.
- ``*.safetensors``: the state dict as tensors; every other entry of the checkpoint (``meta``,
  ...) goes into the header's ``__metadata__`` as a JSON string (see `checkpoint_metadata`).
- ``max_shard_size=...``: the state dict split into shards named
  ``<stem>-<token>-00001-of-0000N<suffix>`` plus ``<filename>.index.json`` (transformers'
  layout: ``{"metadata": {"total_size": ..., ...}, "weight_map": {name: shard}}``). The index
  is written last and is the commit point: shards carry a token unique to the save, so an
  interrupted save never touches the shards the previous index names.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
import re
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any, overload

import torch
from torch import nn
from torch.optim import Optimizer

from ckptmap.atomic import atomic_write
from ckptmap.errors import (
    CheckpointNotFoundError,
    CheckpointSaveError,
    NotSerializableError,
    SavePermissionError,
    UnsupportedSaveTargetError,
)
from ckptmap.formats.safetensors_write import check_tensors, tensor_nbytes, write_safetensors
from ckptmap.wrappers import is_model_wrapper, unwrap_model

__all__ = [
    "INDEX_SUFFIX",
    "checkpoint_metadata",
    "get_state_dict",
    "is_shard_file",
    "parse_size",
    "save_checkpoint",
    "weights_to_cpu",
]

logger = logging.getLogger("ckptmap")

PathLike = str | os.PathLike[str]

#: What a sharded checkpoint's index adds to the target's name.
INDEX_SUFFIX = ".index.json"

#: Metadata entries naming where the state dict sat in the checkpoint and its `_metadata`.
STATE_DICT_KEY_ENTRY = "ckptmap.state_dict_key"
STATE_DICT_METADATA_ENTRY = "ckptmap.state_dict_metadata"

#: Part size of multipart uploads; doubles every 1000 parts (S3 allows 10000).
S3_PART_SIZE = 64 * 2**20

# `<stem>-<8 hex>-00001-of-00004<suffix>`, and transformers' `<stem>-00001-of-00004<suffix>`.
_SHARD_RE = re.compile(r"-\d{5,}-of-\d{5,}(\.[A-Za-z0-9]+)?$")
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "b": 1}
for _i, _p in enumerate("kmgt", start=1):
    _SIZE_UNITS[f"{_p}b"] = 1000**_i
    _SIZE_UNITS[f"{_p}ib"] = 1024**_i


# --- errors ------------------------------------------------------------------------------------


# --- state dicts -------------------------------------------------------------------------------


def get_state_dict(
    module: nn.Module,
    destination: OrderedDict[str, Any] | None = None,
    prefix: str = "",
    keep_vars: bool = False,
) -> OrderedDict[str, Any]:
    """The state of `module` as `torch.nn.Module.state_dict` gives it, model wrappers unwrapped.

    Wrappers (DataParallel, DistributedDataParallel and classes registered with
    `ckptmap.module_load.register_model_wrapper`) are replaced by their ``.module`` at every
    level, so their ``module.`` never reaches a key. Everything else is torch's own recursion:
    state-dict pre-hooks and post-hooks, `_save_to_state_dict` overrides, ``_extra_state``,
    non-persistent buffers left out, and ``destination._metadata`` holding each module's
    version. A module whose class overrides `state_dict` itself is asked through that override.

    Args:
        module: the model, possibly wrapped.
        destination: the dict to fill; a new `OrderedDict` with `_metadata` by default.
        prefix: prepended to every key.
        keep_vars: keep parameters as they are instead of detached tensors.

    Returns:
        The filled state dict (a post-hook of the top module may return a different one, as
        in torch).
    """
    if destination is None:
        destination = OrderedDict()
        destination._metadata = OrderedDict()  # type: ignore[attr-defined]
    return _collect(unwrap_model(module), destination, prefix, keep_vars)


def _collect(module: nn.Module, destination: Any, prefix: str, keep_vars: bool) -> Any:
    if type(module).state_dict is not nn.Module.state_dict:
        return module.state_dict(destination=destination, prefix=prefix, keep_vars=keep_vars)
    local_metadata = {"version": module._version}
    if hasattr(destination, "_metadata"):
        destination._metadata[prefix[:-1]] = local_metadata
    for pre_hook in getattr(module, "_state_dict_pre_hooks", {}).values():
        pre_hook(module, prefix, keep_vars)
    module._save_to_state_dict(destination, prefix, keep_vars)
    for name, child in module._modules.items():
        if child is not None:
            # As in torch, what a child's post-hook returns does not reach its parent.
            _collect(unwrap_model(child), destination, f"{prefix}{name}.", keep_vars)
    for hook in module._state_dict_hooks.values():
        result = hook(module, destination, prefix, local_metadata)
        if getattr(hook, "_from_public_api", False):
            if result is not None:
                raise RuntimeError("state_dict post-hook must return None")
        elif result is not None:
            destination = result
    return destination


def weights_to_cpu(state_dict: Any) -> Any:
    """A copy of `state_dict` with every tensor in it moved to CPU memory.

    Nested dicts, lists and tuples (a whole checkpoint, optimizer state) are walked; their
    types are kept (OrderedDict, defaultdict, namedtuple), and so is the `_metadata` of every
    mapping that has one. Tensors already on the CPU are not copied; other objects with a
    ``cpu()`` method are moved with it, and anything else is kept as it is.

    Args:
        state_dict: a state dict, or any nesting of containers holding tensors.

    Returns:
        The same structure, on the CPU.
    """
    result = _to_cpu(state_dict)
    if not hasattr(result, "_metadata") and isinstance(result, OrderedDict):
        result._metadata = OrderedDict()  # type: ignore[attr-defined]
    return result


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.cpu()
    if isinstance(obj, Mapping):
        try:
            out = obj.copy()  # type: ignore[attr-defined]  # keeps the type and default_factory
        except (AttributeError, TypeError):
            out = dict(obj)
        if not isinstance(out, dict):
            out = dict(out)
        for key in out:
            out[key] = _to_cpu(out[key])
        metadata = getattr(obj, "_metadata", None)
        if metadata is not None:
            with contextlib.suppress(AttributeError):
                out._metadata = OrderedDict(metadata)  # type: ignore[attr-defined]
        return out
    if isinstance(obj, list):
        items = [_to_cpu(v) for v in obj]
        return items if type(obj) is list else type(obj)(items)
    if isinstance(obj, tuple):
        items = [_to_cpu(v) for v in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
    cpu = getattr(obj, "cpu", None)
    if callable(cpu) and not isinstance(obj, type):
        return cpu()
    return obj


# --- the public entry point -----------------------------------------------------------------


def _engine_form(file_client_args: dict | None = None, backend_args: dict | None = None) -> None:
    """save_checkpoint(checkpoint, filename, file_client_args=None, backend_args=None)"""


def _mmcv_form(
    optimizer: Optimizer | Mapping[str, Optimizer] | None = None,
    meta: dict | None = None,
    file_client_args: dict | None = None,
) -> None:
    """save_checkpoint(model, filename, optimizer=None, meta=None, file_client_args=None)"""


_FORMS = {form: inspect.signature(form) for form in (_engine_form, _mmcv_form)}


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

    Targets: a local path (its directory is created, as mmengine does) or ``s3://bucket/key``
    (boto3; the endpoint from ``backend_args["endpoint_url"]``, else ``AWS_ENDPOINT_URL_S3`` or
    ``AWS_ENDPOINT_URL``; other
    `backend_args` entries besides ``backend`` are passed to ``boto3.client``). A name ending in
    ``.safetensors`` writes the state dict as safetensors with the other entries in the header
    metadata as JSON strings. See the module docstring for `max_shard_size`.

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
        OSError: a local write failed (disk full, permissions); the message names the path.
        NotSerializableError: (a TypeError) a value the chosen format can't hold, e.g. a
            tensor in the metadata of a safetensors file, or an unsupported dtype.
        UnsupportedSaveTargetError: (a ValueError) a scheme other than local paths and s3://.
        CheckpointSaveError, SavePermissionError, CheckpointNotFoundError: S3 failures
            (an OSError, PermissionError and FileNotFoundError respectively).
        TypeError, ValueError: wrong arguments, as the OpenMMLab functions raise them.
    """
    mmcv_form = isinstance(checkpoint, nn.Module) or is_model_wrapper(checkpoint)
    form = _mmcv_form if mmcv_form else _engine_form
    try:
        bound = _FORMS[form].bind(*args, **kwargs)
    except TypeError as err:
        raise TypeError(f"{form.__doc__}: {err}") from None
    options = bound.arguments
    if mmcv_form:
        backend_args = options.get("file_client_args")
    else:
        backend_args = options.get("backend_args")
        if options.get("file_client_args") is not None:
            if backend_args is not None:
                raise ValueError(
                    '"file_client_args" and "backend_args" cannot be set at the same time.'
                )
            logger.warning(
                '"file_client_args" will be deprecated in future. Please use "backend_args" instead'
            )
            backend_args = options["file_client_args"]
    # Arguments first, so a bad target fails before a large model is copied to the CPU.
    limit = None if max_shard_size is None else parse_size(max_shard_size)
    sink, name = _sink_for(filename, backend_args)
    if mmcv_form:
        checkpoint = _mmcv_checkpoint(checkpoint, options.get("optimizer"), options.get("meta"))
    if limit is not None or name.endswith(INDEX_SUFFIX):
        if limit is None:
            raise ValueError(
                f"{filename}: a name ending in {INDEX_SUFFIX!r} is a sharded checkpoint's "
                "index; pass max_shard_size, or save under the name of a .pth / .safetensors"
            )
        return _save_sharded(sink, name, checkpoint, limit)
    if _is_safetensors(name):
        state_dict, metadata = _for_safetensors(checkpoint, sink.display(name))
        with sink.open(name) as f:
            write_safetensors(f, state_dict, metadata)
    else:
        with sink.open(name) as f:
            _torch_save(checkpoint, f)
    return sink.display(name)


def _mmcv_checkpoint(model: nn.Module, optimizer: Any, meta: Any) -> dict[str, Any]:
    if meta is None:
        meta = {}
    elif not isinstance(meta, dict):
        raise TypeError(f"meta must be a dict or None, but got {type(meta)}")
    else:
        meta = dict(meta)
    from ckptmap import __version__

    # str(): torch.__version__ is a TorchVersion, which weights_only loads refuse.
    meta.update(
        ckptmap_version=str(__version__), torch_version=str(torch.__version__), time=time.asctime()
    )
    model = unwrap_model(model)
    classes = getattr(model, "CLASSES", None)
    if classes is not None:
        meta.update(CLASSES=classes)
    checkpoint: dict[str, Any] = {
        "meta": meta,
        "state_dict": weights_to_cpu(get_state_dict(model)),
    }
    if isinstance(optimizer, Optimizer):
        checkpoint["optimizer"] = optimizer.state_dict()
    elif isinstance(optimizer, Mapping):
        checkpoint["optimizer"] = {name: optim.state_dict() for name, optim in optimizer.items()}
    elif optimizer is not None:
        raise TypeError(
            f"optimizer must be an Optimizer, a dict of them or None, but got {type(optimizer)}"
        )
    return checkpoint


def parse_size(size: int | str) -> int:
    """Bytes in `size`: an int, or a string like ``"5GB"`` (10**9) or ``"5GiB"`` (2**30).

    Raises:
        ValueError: not a positive size.
    """
    if isinstance(size, bool) or not isinstance(size, int | str):
        raise TypeError(f"max_shard_size must be an int or a str like '5GB', not {size!r}")
    if isinstance(size, str):
        match = _SIZE_RE.match(size)
        if match is None:
            raise ValueError(
                f"max_shard_size {size!r} is not a size: write bytes as an int, or a number "
                "with one of B, KB, MB, GB, TB (powers of 1000) or KiB, MiB, GiB, TiB"
            )
        number, unit = match.groups()
        size = int(float(number) * _SIZE_UNITS[(unit or "").lower()])
    if size <= 0:
        raise ValueError(f"max_shard_size must be positive, got {size}")
    return size


def is_shard_file(path: PathLike) -> bool:
    """Whether `path` names one shard of a sharded checkpoint (``...-00001-of-00004.pth``).

    A shard holds part of a state dict and is never a checkpoint on its own.
    """
    return _SHARD_RE.search(Path(path).name) is not None


# --- formats -----------------------------------------------------------------------------------


def _is_safetensors(name: str) -> bool:
    return name.endswith(".safetensors")


class _WriteRecorder:
    """Passes writes through and remembers the first OSError.

    torch's zip writer turns an error of the file's ``write`` into a RuntimeError ("unexpected
    pos"); the recorded error is what gets raised instead, so a full disk stays an OSError.
    """

    def __init__(self, handle: IO[bytes]) -> None:
        self._handle = handle
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self._handle.write(data)
        except OSError as err:
            if self.error is None:
                self.error = err
            raise

    def flush(self) -> None:
        self._handle.flush()


def _torch_save(obj: Any, handle: IO[bytes]) -> None:
    recorder = _WriteRecorder(handle)
    try:
        torch.save(obj, recorder)  # type: ignore[arg-type]
    except RuntimeError as err:
        if recorder.error is not None:
            raise recorder.error from err
        raise


def _split_checkpoint(checkpoint: Any, source: str) -> tuple[Mapping[str, Any], dict, str | None]:
    """(state dict, the other entries, the state dict's key) as the loaders find them."""
    if not isinstance(checkpoint, Mapping):
        raise NotSerializableError(
            f"a {type(checkpoint).__name__} checkpoint",
            "safetensors or shards",
            "these need a dict of tensors, or a dict with a 'state_dict' entry",
            f"save {source} as a plain .pth instead",
        )
    for key in ("state_dict", "model"):
        if isinstance(checkpoint.get(key), Mapping):
            rest = {k: v for k, v in checkpoint.items() if k != key}
            return checkpoint[key], rest, key
    return checkpoint, {}, None


def _check_json(value: Any, where: str) -> None:
    if value is None or isinstance(value, bool | int | float | str):
        return
    if isinstance(value, list | tuple):
        for i, item in enumerate(value):
            _check_json(item, f"{where}[{i}]")
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise NotSerializableError(
                    f"{where}[{key!r}]",
                    "JSON metadata",
                    f"its key is a {type(key).__name__}, and JSON keys are strings",
                    "use str keys, or save to a .pth file",
                )
            _check_json(item, f"{where}[{key!r}]")
        return
    raise NotSerializableError(
        where,
        "JSON metadata",
        f"it is a {type(value).__name__}; only None, bool, int, float, str, lists and "
        "dicts fit in safetensors or index metadata",
        "save to a .pth file, or drop or convert that entry",
    )


def checkpoint_metadata(
    rest: Mapping[str, Any], state_dict_key: str | None, state_dict: Any
) -> dict[str, str]:
    """The metadata entries for the non-tensor part of a checkpoint, each a JSON string.

    ``{key: json.dumps(value)}`` for every entry besides the state dict, plus
    ``"ckptmap.state_dict_key"`` (where the state dict sat, when it was not the whole
    checkpoint) and ``"ckptmap.state_dict_metadata"`` (its `_metadata`, when it has one).
    Loading rebuilds the checkpoint as
    ``{**{k: json.loads(v) ...}, state_dict_key: tensors}`` (tuples come back as lists).

    Raises:
        NotSerializableError: a value JSON can't hold exactly (a tensor, an int dict key...).
    """
    entries: dict[str, Any] = {}
    for key, value in rest.items():
        if not isinstance(key, str):
            raise NotSerializableError(
                f"checkpoint key {key!r}",
                "JSON metadata",
                "metadata keys are strings",
                "use str keys, or save to a .pth file",
            )
        _check_json(value, f"checkpoint[{key!r}]")
        entries[key] = value
    if state_dict_key is not None:
        entries[STATE_DICT_KEY_ENTRY] = state_dict_key
    sd_metadata = getattr(state_dict, "_metadata", None)
    if sd_metadata is not None:
        _check_json(sd_metadata, "state_dict._metadata")
        entries[STATE_DICT_METADATA_ENTRY] = sd_metadata
    return {key: json.dumps(value) for key, value in entries.items()}


def _for_safetensors(checkpoint: Any, source: str) -> tuple[Mapping[str, Any], dict[str, str]]:
    state_dict, rest, key = _split_checkpoint(checkpoint, source)
    return state_dict, checkpoint_metadata(rest, key, state_dict)


# --- sharding ------------------------------------------------------------------------------------


def _value_nbytes(value: Any) -> int:
    return tensor_nbytes(value) if isinstance(value, torch.Tensor) else 0


def _plan_shards(state_dict: Mapping[str, Any], limit: int) -> list[list[str]]:
    shards: list[list[str]] = []
    current: list[str] = []
    size = 0
    for key, value in state_dict.items():
        nbytes = _value_nbytes(value)
        if current and size + nbytes > limit:
            shards.append(current)
            current, size = [], 0
        current.append(key)
        size += nbytes
    if current or not shards:
        shards.append(current)
    return shards


def _shard_stem(name: str) -> tuple[str, str]:
    base = Path(name)
    suffix = base.suffix if base.suffix[1:].isalnum() else ""
    return base.name[: len(base.name) - len(suffix)], suffix


def _shard_names(name: str, count: int) -> list[str]:
    stem, suffix = _shard_stem(name)
    token = uuid.uuid4().hex[:8]
    return [f"{stem}-{token}-{i:05d}-of-{count:05d}{suffix}" for i in range(1, count + 1)]


def _compact(value: Any, seen: dict[tuple, torch.Tensor]) -> Any:
    """A tensor that views part of a larger storage, cloned so a .pth shard holds only it."""
    if not isinstance(value, torch.Tensor) or value.device.type == "meta":
        return value
    storage = value.untyped_storage()
    if storage.nbytes() <= tensor_nbytes(value):
        return value
    ident = (storage.data_ptr(), value.storage_offset(), tuple(value.shape), value.stride())
    if ident not in seen:
        seen[ident] = value.clone()
    return seen[ident]


def _old_shards(sink: _Sink, index_name: str, stem: str) -> set[str]:
    """The shards a previous save under this name wrote (and only those: an index written by
    another tool may name files that are not ours to delete)."""
    try:
        text = sink.read_text(index_name)
        if text is None:
            return set()
        weight_map = json.loads(text).get("weight_map", {})
        names = {s for s in weight_map.values() if isinstance(s, str)}
    except (OSError, ValueError, AttributeError):
        return set()
    return {s for s in names if s == Path(s).name and s.startswith(stem) and is_shard_file(s)}


def _save_sharded(sink: _Sink, name: str, checkpoint: Any, limit: int) -> str:
    if name.endswith(INDEX_SUFFIX):
        index_name, name = name, name[: -len(INDEX_SUFFIX)]
    else:
        index_name = name + INDEX_SUFFIX
    source = sink.display(index_name)
    state_dict, rest, key = _split_checkpoint(checkpoint, source)
    if "total_size" in rest:
        raise ValueError(
            f"{source}: the checkpoint entry 'total_size' clashes with the index's own; rename it"
        )
    metadata = checkpoint_metadata(rest, key, state_dict)
    safetensors = _is_safetensors(name)
    if safetensors:  # every check before the first shard is written
        check_tensors(state_dict)
    plan = _plan_shards(state_dict, limit)
    shard_names = _shard_names(name, len(plan))
    previous = _old_shards(sink, index_name, _shard_stem(name)[0] + "-")
    weight_map: dict[str, str] = {}
    written: list[str] = []
    try:
        for shard, keys in zip(shard_names, plan, strict=True):
            with sink.open(shard) as f:
                if safetensors:
                    write_safetensors(f, {k: state_dict[k] for k in keys})
                else:
                    seen: dict[tuple, torch.Tensor] = {}
                    _torch_save(OrderedDict((k, _compact(state_dict[k], seen)) for k in keys), f)
            written.append(shard)
            weight_map.update(dict.fromkeys(keys, shard))
        index = {
            "metadata": {
                "total_size": sum(_value_nbytes(v) for v in state_dict.values()),
                **metadata,
            },
            "weight_map": weight_map,
        }
        with sink.open(index_name, text=True) as f:
            json.dump(index, f, indent=2, ensure_ascii=False)
            f.write("\n")
    except BaseException:
        for shard in written:
            with contextlib.suppress(Exception):
                sink.remove(shard)
        raise
    # The new index is durable: the shards only the old one named are garbage now.
    for shard in sorted(previous - set(shard_names)):
        try:
            sink.remove(shard)
        except Exception as err:
            logger.warning("could not remove the old shard %s: %s", sink.display(shard), err)
    return source


# --- where the bytes go ---------------------------------------------------------------------


class _Sink:
    """A directory-like place files are written to atomically, one name at a time."""

    def open(self, name: str, text: bool = False) -> contextlib.AbstractContextManager[IO[Any]]:
        raise NotImplementedError

    def read_text(self, name: str) -> str | None:
        raise NotImplementedError

    def remove(self, name: str) -> None:
        raise NotImplementedError

    def display(self, name: str) -> str:
        raise NotImplementedError


class _LocalSink(_Sink):
    def __init__(self, directory: str) -> None:
        self.directory = directory

    def open(self, name: str, text: bool = False) -> contextlib.AbstractContextManager[IO[Any]]:
        os.makedirs(self.directory or ".", exist_ok=True)
        return atomic_write(os.path.join(self.directory, name), "w" if text else "wb")

    def read_text(self, name: str) -> str | None:
        try:
            with open(os.path.join(self.directory, name), encoding="utf-8") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def remove(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(self.directory, name))

    def display(self, name: str) -> str:
        return os.path.join(self.directory, name)


def _sink_for(filename: PathLike, backend_args: Mapping[str, Any] | None) -> tuple[_Sink, str]:
    if backend_args is not None and not isinstance(backend_args, Mapping):
        raise TypeError(f"backend_args must be a dict or None, not {type(backend_args)}")
    target = os.fspath(filename)
    if not isinstance(target, str):
        raise TypeError(f"filename must be a str or os.PathLike[str], not {type(filename)}")
    scheme, sep, _ = target.partition("://")
    if not sep or "/" in scheme:
        path = os.path.expanduser(target)
        directory, name = os.path.split(path)
        if not name:
            raise IsADirectoryError(f"{target!r} names a directory; add the checkpoint's name")
        return _LocalSink(directory), name
    if scheme.lower() == "s3":
        return _S3Sink.for_uri(target, backend_args or {})
    raise UnsupportedSaveTargetError(
        f"can not save to {target!r}: ckptmap writes local paths and s3:// URIs, not "
        f"{scheme}://; save locally and upload it yourself"
    )


# --- S3 -----------------------------------------------------------------------------------------

#: boto3 client arguments `backend_args` may carry for s3:// targets.
_S3_CLIENT_ARGS = frozenset(
    {
        "endpoint_url",
        "region_name",
        "aws_access_key_id",
        "aws_secret_access_key",
        "aws_session_token",
        "config",
        "verify",
        "use_ssl",
    }
)


class _S3Sink(_Sink):
    """Objects under one S3 prefix; each is made visible whole or not at all."""

    def __init__(self, client: Any, bucket: str, prefix: str, endpoint: str | None) -> None:
        self.client = client
        self.bucket = bucket
        self.prefix = prefix
        self.endpoint = endpoint

    @classmethod
    def for_uri(cls, uri: str, backend_args: Mapping[str, Any]) -> tuple[_S3Sink, str]:
        bucket, _, key = uri.partition("://")[2].partition("/")
        if not bucket or not key or key.endswith("/"):
            raise ValueError(f"{uri!r} is not an S3 object URI: write s3://bucket/path/name.pth")
        try:
            import boto3
        except ImportError as err:
            raise ImportError(f"saving to {uri} needs boto3: pip install 'ckptmap[s3]'") from err
        unknown = set(backend_args) - _S3_CLIENT_ARGS - {"backend"}
        if unknown:
            raise TypeError(
                f"backend_args for s3:// take {sorted(_S3_CLIENT_ARGS)} (and 'backend'); "
                f"unknown: {sorted(unknown)}"
            )
        kwargs = {k: v for k, v in backend_args.items() if k in _S3_CLIENT_ARGS}
        endpoint = (
            kwargs.get("endpoint_url")
            or os.environ.get("AWS_ENDPOINT_URL_S3")
            or os.environ.get("AWS_ENDPOINT_URL")
        )
        if endpoint:
            kwargs["endpoint_url"] = endpoint
        client = boto3.client("s3", **kwargs)
        prefix, _, name = key.rpartition("/")
        return cls(client, bucket, prefix + "/" if prefix else "", endpoint), name

    def display(self, name: str) -> str:
        return f"s3://{self.bucket}/{self.prefix}{name}"

    def open(self, name: str, text: bool = False) -> contextlib.AbstractContextManager[IO[Any]]:
        return self._upload(name, text)

    @contextlib.contextmanager
    def _upload(self, name: str, text: bool) -> Iterator[IO[Any]]:
        writer = _S3Writer(self, self.prefix + name)
        try:
            yield _TextWriter(writer) if text else writer  # type: ignore[misc]
            with self._errors(name):
                writer.commit()
        except BaseException:
            writer.abort()
            raise

    def read_text(self, name: str) -> str | None:
        try:
            with self._errors(name):
                body = self.client.get_object(Bucket=self.bucket, Key=self.prefix + name)["Body"]
                return body.read().decode("utf-8")
        except CheckpointNotFoundError:
            return None

    def remove(self, name: str) -> None:
        with self._errors(name):
            self.client.delete_object(Bucket=self.bucket, Key=self.prefix + name)

    @contextlib.contextmanager
    def _errors(self, name: str) -> Iterator[None]:
        """botocore's errors as the builtin-derived ones, naming the URI and the endpoint."""
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

        uri = self.display(name)
        where = f"endpoint {self.endpoint} (AWS_ENDPOINT_URL)" if self.endpoint else "AWS S3"
        try:
            yield
        except ClientError as err:
            info = err.response.get("Error", {})
            code = str(info.get("Code", ""))
            message = info.get("Message", "") or str(err)
            if code in ("NoSuchBucket", "NoSuchKey", "404"):
                what = "bucket" if code == "NoSuchBucket" else "object"
                raise CheckpointNotFoundError(
                    uri,
                    f"can not write {uri}: no such {what} at {where} ({code}): create the "
                    "bucket, or check the URI and AWS_ENDPOINT_URL",
                ) from err
            if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                raise SavePermissionError(
                    f"can not write {uri}: {where} refused access ({code}: {message}); check the "
                    "credentials and the bucket policy"
                ) from err
            raise CheckpointSaveError(
                f"can not write {uri}: {where} answered {code}: {message}"
            ) from err
        except NoCredentialsError as err:
            raise SavePermissionError(
                f"can not write {uri}: no AWS credentials found; set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY or configure a profile"
            ) from err
        except BotoCoreError as err:
            raise CheckpointSaveError(
                f"can not write {uri}: {err}; check that {where} is reachable"
            ) from err


class _S3Writer:
    """A write-only file that uploads as it goes: one PUT when small, else a multipart upload.

    Nothing is visible at the key until `commit`; `abort` drops an unfinished upload.
    """

    def __init__(self, sink: _S3Sink, key: str) -> None:
        self._sink = sink
        self._key = key
        self._buffer = bytearray()
        self._parts: list[dict[str, Any]] = []
        self._upload_id: str | None = None

    def _part_size(self) -> int:
        return S3_PART_SIZE << (len(self._parts) // 1000)

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        start = 0
        while start < len(view):
            take = min(len(view) - start, self._part_size() - len(self._buffer))
            self._buffer += view[start : start + take]
            start += take
            if len(self._buffer) >= self._part_size():
                self._upload_part()
        return len(view)

    def flush(self) -> None:
        pass

    def _upload_part(self) -> None:
        client, bucket = self._sink.client, self._sink.bucket
        name = self._key[len(self._sink.prefix) :]
        with self._sink._errors(name):
            if self._upload_id is None:
                self._upload_id = client.create_multipart_upload(Bucket=bucket, Key=self._key)[
                    "UploadId"
                ]
            body, self._buffer = self._buffer, bytearray()
            number = len(self._parts) + 1
            answer = client.upload_part(
                Bucket=bucket,
                Key=self._key,
                UploadId=self._upload_id,
                PartNumber=number,
                Body=bytes(body),
            )
            self._parts.append({"ETag": answer["ETag"], "PartNumber": number})

    def commit(self) -> None:
        client, bucket = self._sink.client, self._sink.bucket
        if self._upload_id is None:
            client.put_object(Bucket=bucket, Key=self._key, Body=bytes(self._buffer))
            self._buffer = bytearray()
            return
        if self._buffer:
            self._upload_part()
        client.complete_multipart_upload(
            Bucket=bucket,
            Key=self._key,
            UploadId=self._upload_id,
            MultipartUpload={"Parts": self._parts},
        )
        self._upload_id = None

    def abort(self) -> None:
        self._buffer = bytearray()
        if self._upload_id is not None:
            with contextlib.suppress(Exception):
                self._sink.client.abort_multipart_upload(
                    Bucket=self._sink.bucket, Key=self._key, UploadId=self._upload_id
                )
            self._upload_id = None


class _TextWriter:
    """Text in, UTF-8 out, for the index file."""

    def __init__(self, raw: _S3Writer) -> None:
        self._raw = raw

    def write(self, text: str) -> int:
        self._raw.write(text.encode("utf-8"))
        return len(text)
