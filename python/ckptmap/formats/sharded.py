"""Sharded checkpoints: a ``*.index.json`` whose ``weight_map`` names the shard of each tensor.

The layout Hugging Face and torch-based tools write::

    model.safetensors.index.json   {"weight_map": {"fc.weight": "model-00001-of-00002.safetensors",
                                                   "fc.bias": "model-00002-of-00002.safetensors"},
                                    "metadata": {"total_size": 123}}
    model-00001-of-00002.safetensors
    model-00002-of-00002.safetensors

Shards may be safetensors files or torch checkpoints (``pytorch_model-00001-of-00002.bin``);
each shard's format is sniffed from its content. `ShardedCheckpoint` is lazy: opening it
reads the index and the safetensors shards' headers (so the plan, `plan()`, needs no tensor
data), and a torch shard is loaded (``torch.load(mmap=True, weights_only=True)`` via
`ckptmap.formats.pickled`) the first time one of its tensors is needed.

Shard names come from a file that may have been downloaded from anywhere, so every one is
checked before any shard is opened: it must be a plain relative path (no ``..``, absolute path,
drive letter, backslash, NUL or other control character) and must resolve, symlinks included,
to a file inside the index's directory. One exception keeps Hugging Face's cache usable: in a
``snapshots/<revision>/`` directory, shards may be symlinks into that repository's ``blobs/``.

The index is authoritative: a tensor it lists must be in its shard (`ShardTensorMissingError`
otherwise); tensors a shard has beyond the index are ignored, as Hugging Face does.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch

from ckptmap import streaming
from ckptmap._core import filter_prefix_keys
from ckptmap.errors import (
    CorruptCheckpointError,
    InvalidStateDictError,
    ShardNotFoundError,
    ShardTensorMissingError,
    TensorNotFoundError,
)
from ckptmap.formats import pth
from ckptmap.formats.index import find_index, read_index, shard_path
from ckptmap.formats.pickled import load_pickle
from ckptmap.formats.safetensors import SafetensorsFile
from ckptmap.formats.sniff import Format, sniff

__all__ = [
    "ShardEntry",
    "ShardedCheckpoint",
    "find_index",
    "load_sharded",
    "open_sharded",
]

#: The largest index file read (Hugging Face's largest are a few MB).
_PICKLES = (Format.TORCH_ZIP, Format.TORCH_LEGACY, Format.PICKLE)


class ShardEntry(NamedTuple):
    """One tensor of the plan of a sharded checkpoint.

    Attributes:
        name: the tensor's name.
        shard: the shard's name as the index gives it.
        dtype: the torch-style dtype name (``"bfloat16"``).
        shape: the shape.
        nbytes: the size of its data in bytes.
    """

    name: str
    shard: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


class ShardedCheckpoint(Mapping[str, torch.Tensor]):
    """A lazy mapping of names to tensors over a sharded checkpoint.

    Args:
        path: the ``*.index.json``, or a directory holding it (see `find_index`).
        map_location: as for `torch.load`.
        weights_only, allowed_globals: for torch (pickle) shards, as for
            `ckptmap.formats.load_file`.
        mmap: map the shards (None: wherever the format allows); False reads every shard
            into memory, safetensors shards included.

    Raises:
        InvalidShardIndexError: the index is not JSON, lacks a ``weight_map``, repeats a key,
            or maps a tensor to something that is not a file name.
        UnsafeShardPathError: a shard name that could leave the directory (before any shard
            is opened).
        ShardNotFoundError: shards the index names that do not exist (all are listed).
        ShardTensorMissingError: a safetensors shard without a tensor the index places there
            (torch shards: when the shard is loaded).
        InvalidSafetensorsError, CorruptCheckpointError, UnsafeCheckpointError: a bad shard.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        map_location: Any = None,
        weights_only: bool = True,
        allowed_globals: Iterable[Any] = (),
        mmap: bool | None = None,
    ) -> None:
        self.index_path = find_index(path)
        self.directory = os.path.dirname(os.path.abspath(self.index_path))
        self.weight_map, self.metadata = read_index(self.index_path)
        self._map_location = map_location
        self._pickle_options: dict[str, Any] = {
            "weights_only": weights_only,
            "allowed_globals": tuple(allowed_globals),
            "mmap": mmap,
        }
        directory = Path(self.directory).resolve()
        self.shards: dict[str, str] = {}
        for shard in dict.fromkeys(self.weight_map.values()):
            self.shards[shard] = str(shard_path(self.index_path, directory, shard))
        missing = [s for s, p in self.shards.items() if not os.path.isfile(p)]
        if missing:
            raise ShardNotFoundError(self.index_path, self.directory, missing)
        self._names = list(self.weight_map)
        self._opened: dict[str, Mapping[str, Any]] = {}
        self._pending: dict[str, Any] = {}
        for shard, file in self.shards.items():
            sniffed = sniff(file)
            sniffed.raise_if_corrupt()
            if sniffed.format is Format.SAFETENSORS:
                opened = SafetensorsFile(file, map_location=map_location, mmap=mmap)
                self._opened[shard] = opened
            elif sniffed.format in _PICKLES:
                self._pending[shard] = sniffed
            else:
                raise CorruptCheckpointError(
                    file,
                    sniffed.size,
                    f"{sniffed.looks_like}, not a shard (a safetensors or torch.save file)",
                    f"check the shard names in {self.index_path!r}",
                )
        for name, shard in self.weight_map.items():
            opened = self._opened.get(shard)
            if opened is not None and name not in opened:
                raise ShardTensorMissingError(self.index_path, self.shards[shard], name)

    # --- the plan ---

    def shard_of(self, name: str) -> str:
        """The shard (as the index names it) holding tensor `name`."""
        try:
            return self.weight_map[name]
        except KeyError:
            raise TensorNotFoundError(self.index_path, name) from None

    def plan(self) -> list[ShardEntry]:
        """Every tensor's shard, dtype, shape and size, in index order.

        Safetensors shards answer from their headers; torch shards are loaded (mapped) first.
        """
        out = []
        for name, shard in self.weight_map.items():
            opened = self._shard(shard)
            if isinstance(opened, SafetensorsFile):
                info = opened.info(name)
                out.append(ShardEntry(name, shard, info.dtype, info.shape, info.nbytes))
            else:
                t = self._from_pickle(shard, opened, name)
                dtype = str(t.dtype).removeprefix("torch.")
                out.append(ShardEntry(name, shard, dtype, tuple(t.shape), t.nbytes))
        return out

    # --- Mapping ---

    def __getitem__(self, name: str) -> torch.Tensor:
        shard = self.shard_of(name)
        opened = self._shard(shard)
        if isinstance(opened, SafetensorsFile):
            return opened[name]
        return self._from_pickle(shard, opened, name)

    def __contains__(self, name: object) -> bool:
        return name in self.weight_map

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __repr__(self) -> str:
        return (
            f"ShardedCheckpoint({self.index_path!r}, tensors={len(self)}, "
            f"shards={len(self.shards)})"
        )

    def load(
        self, names: Iterable[str] | None = None, *, prefix: str | None = None
    ) -> OrderedDict[str, torch.Tensor]:
        """Builds the tensors `names` (default: all, in index order), optionally under `prefix`.

        Shards none of whose tensors are selected are never loaded or read.
        """
        chosen = self._names if names is None else list(names)
        if prefix is not None:
            kept, _ = filter_prefix_keys(chosen, prefix, False)
            chosen = [chosen[k] for k in kept]
        streamed = self._stream(chosen)
        return OrderedDict(
            (name, streamed[name] if name in streamed else self[name]) for name in chosen
        )

    def _stream(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The safetensors shards' tensors among `names`, read onto the map location's device
        through one ring (`ckptmap.streaming`); empty when the map location does not stream."""
        device = streaming.named_device(self._map_location)
        engine = streaming.engine_for(device)
        if engine is None or device is None:
            return {}
        by_shard: dict[str, list[str]] = {}
        for name in names:
            if isinstance(self._opened.get(self.shard_of(name)), SafetensorsFile):
                by_shard.setdefault(self.shard_of(name), []).append(name)
        items: list[streaming.ReadItem] = []
        order: list[str] = []
        for shard, shard_names in by_shard.items():
            opened = self._opened[shard]
            assert isinstance(opened, SafetensorsFile)
            items += opened.read_plan(shard_names, device)
            order += shard_names
        return dict(zip(order, streaming.read_tensors(items, engine=engine), strict=True))

    def close(self) -> None:
        """Drops the shards (tensors taken from them stay valid)."""
        for opened in self._opened.values():
            if isinstance(opened, SafetensorsFile):
                opened.close()
        self._opened.clear()

    def __enter__(self) -> ShardedCheckpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _shard(self, shard: str) -> Mapping[str, Any]:
        opened = self._opened.get(shard)
        if opened is not None:
            return opened
        sniffed = self._pending.get(shard)
        if sniffed is None:
            raise ValueError(f"{self.index_path!r}: this ShardedCheckpoint is closed")

        loaded = load_pickle(
            sniffed, self._map_location, **self._pickle_options, zip_reader=pth.load_fast
        )
        if not isinstance(loaded, Mapping):
            raise CorruptCheckpointError(
                sniffed.path,
                sniffed.size,
                f"a torch checkpoint holding a {type(loaded).__name__}, not a state dict shard",
                f"check the shard names in {self.index_path!r}",
            )
        for name, s in self.weight_map.items():
            if s == shard and name not in loaded:
                raise ShardTensorMissingError(self.index_path, sniffed.path, name)
        self._opened[shard] = loaded
        del self._pending[shard]
        return loaded

    def _from_pickle(self, shard: str, opened: Mapping[str, Any], name: str) -> torch.Tensor:
        value = opened[name]
        if not isinstance(value, torch.Tensor):
            raise InvalidStateDictError(
                f"shard {self.shards[shard]!r} maps {name!r} to a {type(value).__name__}, not a "
                "tensor; check that the index and shards are a model's weights"
            )
        return value


def open_sharded(
    path: str | os.PathLike[str], map_location: Any = None, **options: Any
) -> ShardedCheckpoint:
    """Opens a sharded checkpoint lazily (see `ShardedCheckpoint` for `options`)."""
    return ShardedCheckpoint(path, map_location=map_location, **options)


def load_sharded(
    path: str | os.PathLike[str], map_location: Any = None, **options: Any
) -> OrderedDict[str, torch.Tensor]:
    """Loads every tensor of a sharded checkpoint (what the dispatcher calls).

    Args:
        path: the ``*.index.json`` or a directory holding it.
        map_location: as for `torch.load`.
        **options: ``weights_only``, ``allowed_globals``, ``mmap`` for torch shards.

    Returns:
        The tensors in index order; safetensors tensors are zero-copy views of their shards.
    """
    return ShardedCheckpoint(path, map_location=map_location, **options).load()
