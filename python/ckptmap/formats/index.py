"""The one reader of shard indexes (``*.index.json``): which index a directory means, what it
maps, and where each shard it names may be opened.

Shard names come from a file that may have been downloaded from anywhere, so each one is checked
(`ckptmap.paths.check_relative_name`) and resolved, symlinks included, to a file inside the
index's directory before any shard is opened. One exception keeps Hugging Face's cache usable:
in a ``snapshots/<revision>/`` directory, shards may be symlinks into that repository's
``blobs/``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ckptmap.errors import (
    AmbiguousIndexError,
    CheckpointIsADirectoryError,
    InvalidShardIndexError,
    UnsafePathError,
    UnsafeShardPathError,
)
from ckptmap.paths import check_path, check_relative_name, open_regular, reject_special

__all__ = [
    "INDEX_SUFFIX",
    "MAX_INDEX_BYTES",
    "find_index",
    "parse_index",
    "read_index",
    "shard_path",
]

#: The suffix of a shard index's file name.
INDEX_SUFFIX = ".index.json"
#: An index larger than this is refused before it is parsed.
MAX_INDEX_BYTES = 256 * 1024 * 1024


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
        if n.endswith(INDEX_SUFFIX) and os.path.isfile(os.path.join(path, n))
    )
    if len(indexes) > 1:
        preferred = [n for n in indexes if n.endswith(".safetensors" + INDEX_SUFFIX)]
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


def read_index(path: str) -> tuple[dict[str, str], dict[str, Any]]:
    """Reads and checks an index: its weight map (in file order) and metadata."""
    with open_regular(path, what="shard index") as f:
        raw = f.read(MAX_INDEX_BYTES + 1)
    return parse_index(raw, path)


def parse_index(raw: bytes, path: str) -> tuple[dict[str, str], dict[str, Any]]:
    """Checks the bytes of an index (read from a file or fetched from a URL, named `path` in
    messages): its weight map (in file order) and metadata.

    Raises:
        InvalidShardIndexError: larger than `MAX_INDEX_BYTES`, not JSON, a key twice, no
            ``weight_map`` object, or a tensor mapped to something that is not a file name.
    """
    if len(raw) > MAX_INDEX_BYTES:
        raise InvalidShardIndexError(path, f"it is larger than {MAX_INDEX_BYTES:,} bytes")
    try:
        doc = json.loads(raw, object_pairs_hook=_no_duplicates)
    except _DuplicateKey as err:
        raise InvalidShardIndexError(path, f"it has the key {err.args[0]!r} twice") from None
    except RecursionError:
        raise InvalidShardIndexError(path, "it is not valid JSON (nested too deeply)") from None
    except ValueError as err:  # UnicodeDecodeError is a ValueError
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


def shard_path(index: str, directory: Path, name: str) -> Path:
    """Checks one shard name and returns its path; raises before anything is opened.

    Raises:
        UnsafeShardPathError: the name could leave the directory.
        NotARegularFileError: the shard is a FIFO, socket or device (or a symlink to one).
    """
    try:
        check_relative_name(name, what="shard name")
    except UnsafePathError as err:
        raise UnsafeShardPathError(index, name, err.reason.removeprefix("it ")) from None
    joined = directory.joinpath(*name.split("/"))
    resolved = joined.resolve()
    if not any(resolved.is_relative_to(root) for root in _shard_roots(directory)):
        raise UnsafeShardPathError(
            index, name, f"resolves to {str(resolved)!r}, outside {str(directory)!r}"
        )
    reject_special(joined, what="shard", named_by=index)
    return joined
