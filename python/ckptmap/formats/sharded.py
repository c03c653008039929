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
`ckptmap.formats.pickle`) the first time one of its tensors is needed.

Shard names come from a file that may have been downloaded from anywhere, so every one is
checked before any shard is opened: it must be a plain relative path (no ``..``, absolute path,
drive letter, backslash, NUL or other control character) and must resolve, symlinks included,
to a file inside the index's directory. One exception keeps Hugging Face's cache usable: in a
``snapshots/<revision>/`` directory, shards may be symlinks into that repository's ``blobs/``.

The index is authoritative: a tensor it lists must be in its shard (`ShardTensorMissingError`
otherwise); tensors a shard has beyond the index are ignored, as Hugging Face does.
"""

from __future__ import annotations

import json
import os
import re
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch

from ckptmap._core import filter_prefix_keys
from ckptmap.errors import CheckpointIsADirectoryError, CheckpointNotFoundError, CkptmapError
from ckptmap.formats.errors import CorruptCheckpointError
from ckptmap.formats.safetensors import SafetensorsFile, TensorNotFoundError
from ckptmap.formats.sniff import Format, check_path, sniff

__all__ = [
    "AmbiguousIndexError",
    "InvalidShardIndexError",
    "ShardEntry",
    "ShardNotFoundError",
    "ShardTensorMissingError",
    "ShardedCheckpoint",
    "UnsafeShardPathError",
    "find_index",
    "load_sharded",
    "open_sharded",
]

#: The largest index file read (Hugging Face's largest are a few MB).
MAX_INDEX_BYTES = 256 * 1024 * 1024
_INDEX_SUFFIX = ".index.json"
_PICKLES = (Format.TORCH_ZIP, Format.TORCH_LEGACY, Format.PICKLE)
_DRIVE = re.compile(r"^[A-Za-z]:")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class InvalidShardIndexError(CkptmapError, ValueError):
    """An ``*.index.json`` that is not a valid shard index.

    Attributes:
        path: the index file.
        reason: what is wrong with it.
    """

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        self._init_args = (path, reason)
        super().__init__(
            f"shard index {path!r} is not usable: {reason}. A shard index is a JSON object "
            'whose "weight_map" maps each tensor name to the file holding it; re-download the '
            "index together with its shards"
        )


class UnsafeShardPathError(InvalidShardIndexError):
    """A shard name in the index that could point outside the index's directory.

    Raised before any shard is opened.

    Attributes:
        shard: the rejected name, as the index gives it.
    """

    def __init__(self, path: str, shard: object, reason: str) -> None:
        self.shard = shard
        super().__init__(
            path,
            f"it names the shard {shard!r}, which {reason}; shard names must be plain file "
            "names (or relative paths) inside the index's directory. Do not load a "
            "checkpoint whose index was tampered with",
        )
        self._init_args = (path, shard, reason)


class AmbiguousIndexError(CkptmapError, ValueError):
    """A directory with several ``*.index.json`` files and no way to choose.

    Attributes:
        path: the directory.
        indexes: the index file names found.
    """

    def __init__(self, path: str, indexes: list[str]) -> None:
        self.path = path
        self.indexes = indexes
        self._init_args = (path, indexes)
        super().__init__(
            f"directory {path!r} holds several shard indexes ({', '.join(indexes)}): pass the "
            "path of the one to load"
        )


class ShardNotFoundError(CheckpointNotFoundError):
    """Shards that the index names but that do not exist.

    Attributes:
        path: the first missing shard's path.
        index: the index file.
        missing: every missing shard, as the index names them.
    """

    def __init__(self, index: str, directory: str, missing: list[str]) -> None:
        self.index = index
        self.missing = missing
        shown = ", ".join(repr(m) for m in missing[:5]) + (", ..." if len(missing) > 5 else "")
        super().__init__(
            os.path.join(directory, missing[0]),
            f"shard index {index!r} names {len(missing)} shard file(s) missing from "
            f"{directory!r}: {shown}. Download or copy every shard next to the index",
        )
        self._init_args = (index, directory, missing)


class ShardTensorMissingError(TensorNotFoundError):
    """A tensor the index places in a shard that does not have it.

    Attributes:
        path: the shard.
        name: the tensor.
        index: the index file.
    """

    def __init__(self, index: str, shard: str, name: str) -> None:
        self.index = index
        super().__init__(
            shard,
            name,
            f"shard index {index!r} places tensor {name!r} in {shard!r}, but that shard has no "
            "such tensor: the index and its shards do not belong together. Re-download the "
            "index and all its shards from the same revision",
        )
        self._init_args = (index, shard, name)


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


def find_index(path: str | os.PathLike[str]) -> str:
    """The index file for `path`: the file itself, or the one ``*.index.json`` in a directory.

    A directory holding several indexes is accepted when exactly one of them is a
    ``*.safetensors.index.json`` (Hugging Face repositories ship both a safetensors and a
    ``.bin`` index for the same weights); it is chosen.

    Raises:
        CheckpointNotFoundError / DanglingSymlinkError: nothing at `path`.
        CheckpointIsADirectoryError: a directory without an index.
        AmbiguousIndexError: a directory with several indexes.
    """
    path = check_path(path)
    if not os.path.isdir(path):
        return path
    indexes = sorted(
        n
        for n in os.listdir(path)
        if n.endswith(_INDEX_SUFFIX) and os.path.isfile(os.path.join(path, n))
    )
    if len(indexes) > 1:
        preferred = [n for n in indexes if n.endswith(".safetensors" + _INDEX_SUFFIX)]
        if len(preferred) != 1:
            raise AmbiguousIndexError(path, indexes)
        indexes = preferred
    if not indexes:
        raise CheckpointIsADirectoryError(path)
    return os.path.join(path, indexes[0])


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


class _DuplicateKey(Exception):
    pass


def _read_index(path: str) -> tuple[dict[str, str], dict[str, Any]]:
    """Reads and checks an index: its weight map (in file order) and metadata."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_INDEX_BYTES + 1)
    except IsADirectoryError:
        raise CheckpointIsADirectoryError(path) from None
    if len(raw) > MAX_INDEX_BYTES:
        raise InvalidShardIndexError(path, f"it is larger than {MAX_INDEX_BYTES:,} bytes")
    try:
        doc = json.loads(raw, object_pairs_hook=_no_duplicates)
    except _DuplicateKey as err:
        raise InvalidShardIndexError(path, f"it has the key {err.args[0]!r} twice") from None
    except (ValueError, RecursionError) as err:  # UnicodeDecodeError is a ValueError
        raise InvalidShardIndexError(path, f"it is not valid JSON ({err})") from None
    if not isinstance(doc, dict):
        raise InvalidShardIndexError(path, f"its top level is a {type(doc).__name__}")
    weight_map = doc.get("weight_map")
    if not isinstance(weight_map, dict):
        raise InvalidShardIndexError(path, 'it has no "weight_map" object')
    for name, shard in weight_map.items():
        if not isinstance(shard, str):
            raise InvalidShardIndexError(
                path, f"it maps {name!r} to a {type(shard).__name__}, not a file name"
            )
    metadata = doc.get("metadata")
    return weight_map, metadata if isinstance(metadata, dict) else {}


def _shard_roots(directory: Path) -> list[Path]:
    """Where shards may resolve to: the directory, plus ``blobs/`` of a Hugging Face cache."""
    roots = [directory]
    if directory.parent.name == "snapshots":
        roots.append(directory.parent.parent / "blobs")
    return roots


def _unsafe_reason(name: str) -> str | None:
    """Why the shard name `name` could leave its directory, or None when it is a plain name."""
    if not name.strip():
        return "is empty"
    if _CONTROL.search(name):
        return "contains a control character (NUL or similar)"
    if "\\" in name:
        return "contains a backslash (a Windows path separator)"
    if name.startswith("/"):
        return "is an absolute path"
    for part in name.split("/"):
        if part in ("", ".", ".."):
            return f"has {'an empty' if not part else repr(part)} path component"
        if _DRIVE.match(part):
            return "has a drive letter"
    return None


def _check_shard(index: str, directory: Path, name: str) -> Path:
    """Checks one shard name and returns its path; raises before anything is opened."""
    reason = _unsafe_reason(name)
    if reason is not None:
        raise UnsafeShardPathError(index, name, reason)
    joined = directory.joinpath(*name.split("/"))
    resolved = joined.resolve()
    if not any(resolved.is_relative_to(root) for root in _shard_roots(directory)):
        raise UnsafeShardPathError(
            index, name, f"resolves to {str(resolved)!r}, outside {str(directory)!r}"
        )
    return joined


class ShardedCheckpoint(Mapping[str, torch.Tensor]):
    """A lazy mapping of names to tensors over a sharded checkpoint.

    Args:
        path: the ``*.index.json``, or a directory holding it (see `find_index`).
        map_location: as for `torch.load`.
        weights_only, allowed_globals, mmap: for torch (pickle) shards, as for
            `ckptmap.formats.load_file`.

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
        self.weight_map, self.metadata = _read_index(self.index_path)
        self._map_location = map_location
        self._pickle_options: dict[str, Any] = {
            "weights_only": weights_only,
            "allowed_globals": tuple(allowed_globals),
            "mmap": mmap,
        }
        directory = Path(self.directory).resolve()
        self.shards: dict[str, str] = {}
        for shard in dict.fromkeys(self.weight_map.values()):
            self.shards[shard] = str(_check_shard(self.index_path, directory, shard))
        missing = [s for s, p in self.shards.items() if not os.path.isfile(p)]
        if missing:
            raise ShardNotFoundError(self.index_path, self.directory, missing)
        self._names = list(self.weight_map)
        self._opened: dict[str, Mapping[str, Any]] = {}
        self._pending: dict[str, Any] = {}
        for shard, shard_path in self.shards.items():
            sniffed = sniff(shard_path)
            sniffed.raise_if_corrupt()
            if sniffed.format is Format.SAFETENSORS:
                opened = SafetensorsFile(shard_path, map_location=map_location)
                self._opened[shard] = opened
            elif sniffed.format in _PICKLES:
                self._pending[shard] = sniffed
            else:
                raise CorruptCheckpointError(
                    shard_path,
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
        return OrderedDict((name, self[name]) for name in chosen)

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
        from ckptmap.formats.pickle import load_pickle

        loaded = load_pickle(sniffed, self._map_location, **self._pickle_options)
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
            from ckptmap.errors import InvalidStateDictError

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
