"""Sharded saves: the state dict split into shards plus a ``*.index.json`` that names them.

Shards are named ``<stem>-<token>-00001-of-0000N<suffix>`` and the index is transformers'
layout, ``{"metadata": {"total_size": ..., ...}, "weight_map": {name: shard}}``, with the
checkpoint's other entries in ``metadata`` (`ckptmap.formats.codec`). The index is written
last and is the commit point: shards carry a token unique to the save, so an interrupted save
never touches the shards the previous index names, and those are deleted only once the new
index is in place.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import uuid
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ckptmap.errors import InvalidShardIndexError, SaveArgumentError, SaveArgumentTypeError
from ckptmap.formats.codec import encode, state_dict_key
from ckptmap.formats.index import INDEX_SUFFIX, parse_index
from ckptmap.formats.safetensors_write import check_tensors, tensor_nbytes, write_safetensors
from ckptmap.formats.torch_write import torch_save
from ckptmap.save.sinks import Sink

__all__ = [
    "INDEX_SUFFIX",
    "is_safetensors_name",
    "is_shard_file",
    "parse_size",
    "plan_shards",
    "save_sharded",
    "shard_names",
]

logger = logging.getLogger("ckptmap")

# `<stem>-<8 hex>-00001-of-00004<suffix>`, and transformers' `<stem>-00001-of-00004<suffix>`.
_SHARD_RE = re.compile(r"-\d{5,}-of-\d{5,}(\.[A-Za-z0-9]+)?$")
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "b": 1}
for _i, _p in enumerate("kmgt", start=1):
    _SIZE_UNITS[f"{_p}b"] = 1000**_i
    _SIZE_UNITS[f"{_p}ib"] = 1024**_i

#: The index's own metadata entry; a checkpoint entry of this name is refused.
TOTAL_SIZE = "total_size"


def parse_size(size: int | str) -> int:
    """Bytes in `size`: an int, or a string like ``"5GB"`` (10**9) or ``"5GiB"`` (2**30).

    Raises:
        SaveArgumentError: not a positive size (a ValueError).
        SaveArgumentTypeError: neither an int nor a str (a TypeError).
    """
    if isinstance(size, bool) or not isinstance(size, int | str):
        raise SaveArgumentTypeError(
            f"max_shard_size must be an int or a str like '5GB', not {size!r}"
        )
    if isinstance(size, str):
        match = _SIZE_RE.match(size)
        if match is None:
            raise SaveArgumentError(
                f"max_shard_size {size!r} is not a size: write bytes as an int, or a number "
                "with one of B, KB, MB, GB, TB (powers of 1000) or KiB, MiB, GiB, TiB"
            )
        number, unit = match.groups()
        size = int(float(number) * _SIZE_UNITS[(unit or "").lower()])
    if size <= 0:
        raise SaveArgumentError(f"max_shard_size must be positive, got {size}")
    return size


def is_shard_file(path: str | os.PathLike[str]) -> bool:
    """Whether `path` names one shard of a sharded checkpoint (``...-00001-of-00004.pth``).

    A shard holds part of a state dict and is never a checkpoint on its own.
    """
    return _SHARD_RE.search(Path(path).name) is not None


def is_safetensors_name(name: str) -> bool:
    """Whether a target's name asks for safetensors."""
    return name.endswith(".safetensors")


def _value_nbytes(value: Any) -> int:
    return tensor_nbytes(value) if isinstance(value, torch.Tensor) else 0


def plan_shards(state_dict: Mapping[str, Any], limit: int) -> list[list[str]]:
    """The state dict's keys, in order, cut into runs of at most `limit` bytes each.

    A tensor larger than `limit` gets a shard of its own; an empty state dict one empty shard.
    """
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


def shard_names(name: str, count: int) -> list[str]:
    """`count` shard names for the checkpoint `name`, with a token unique to this save."""
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


def _old_shards(sink: Sink, index_name: str, stem: str) -> set[str]:
    """The shards a previous save under this name wrote (and only those: an index written by
    another tool may name files that are not ours to delete)."""
    try:
        text = sink.read_text(index_name)
        if text is None:
            return set()
        weight_map, _ = parse_index(text.encode("utf-8"), index_name)
    except (OSError, InvalidShardIndexError):
        return set()
    names = set(weight_map.values())
    return {s for s in names if s == Path(s).name and s.startswith(stem) and is_shard_file(s)}


def save_sharded(sink: Sink, name: str, checkpoint: Any, limit: int) -> str:
    """Writes `checkpoint` as shards of at most `limit` bytes plus the index; returns the
    index's path or URI.

    `name` is the checkpoint's name (``model.safetensors``, ``epoch_3.pth``) or its index's
    (``model.safetensors.index.json``); the shards' format follows the name without the index
    suffix.

    Raises:
        SaveArgumentError: the checkpoint has an entry named ``total_size``.
        NotSerializableError: entries JSON can not hold, or tensors safetensors can not.
    """
    if name.endswith(INDEX_SUFFIX):
        index_name, name = name, name[: -len(INDEX_SUFFIX)]
    else:
        index_name = name + INDEX_SUFFIX
    source = sink.display(index_name)
    if state_dict_key(checkpoint) is not None and TOTAL_SIZE in checkpoint:
        raise SaveArgumentError(
            f"{source}: the checkpoint entry {TOTAL_SIZE!r} clashes with the index's own; rename it"
        )
    encoded = encode(checkpoint, source)
    state_dict = encoded.tensors
    safetensors = is_safetensors_name(name)
    if safetensors:  # every check before the first shard is written
        check_tensors(state_dict)
    plan = plan_shards(state_dict, limit)
    names = shard_names(name, len(plan))
    previous = _old_shards(sink, index_name, _shard_stem(name)[0] + "-")
    weight_map: dict[str, str] = {}
    written: list[str] = []
    try:
        for shard, keys in zip(names, plan, strict=True):
            with sink.open(shard, like=index_name) as f:
                if safetensors:
                    write_safetensors(f, {k: state_dict[k] for k in keys})
                else:
                    seen: dict[tuple, torch.Tensor] = {}
                    torch_save(OrderedDict((k, _compact(state_dict[k], seen)) for k in keys), f)
            written.append(shard)
            weight_map.update(dict.fromkeys(keys, shard))
        index = {
            "metadata": {
                TOTAL_SIZE: sum(_value_nbytes(v) for v in state_dict.values()),
                **encoded.metadata,
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
    for shard in sorted(previous - set(names)):
        try:
            sink.remove(shard)
        except Exception as err:
            logger.warning("could not remove the old shard %s: %s", sink.display(shard), err)
    return source
