"""Opened remote checkpoints: `Checkpoint`s whose tables come from headers read by byte range.

`RemoteSafetensorsCheckpoint` answers `entries`, `keys`, `metadata` and dry runs from the
header alone; `state_dict(names)` fetches only those tensors' ranges; `load()` (the whole
checkpoint) goes through the scheme's download cache, as before.

`RemoteShardedCheckpoint` reads a shard index (``*.index.json``), then a shard's header only
when one of its tensors is needed (`keys` needs none: they come from the index; `entries`
needs them all). Torch ``.bin`` shards are read by range too (`ckptmap.remote.pth`). A shard
that can not be read by range (a server without range support, a ``.bin`` only torch can
read) is downloaded through the cache and opened locally, said in one log line.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Container, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ckptmap.errors import (
    ShardTensorMissingError,
    TensorNotFoundError,
    UnsafePathError,
    UnsafeShardPathError,
)
from ckptmap.formats import load_file
from ckptmap.formats.index import MAX_INDEX_BYTES, parse_index
from ckptmap.formats.sniff import Format
from ckptmap.opened import Checkpoint, TensorEntry, open_file
from ckptmap.paths import check_relative_name
from ckptmap.remote.pth import RemotePthFile, RemoteTorchZipCheckpoint, _NotByRange
from ckptmap.remote.reader import RangeReader, _NoRangeSupport
from ckptmap.remote.safetensors import (
    RangeOptions,
    RemoteSafetensors,
    _NotSafetensors,
    read_tensors,
)
from ckptmap.remote.uris import sibling_uri
from ckptmap.report import log_message
from ckptmap.schemes.ranks import fetch_on_local_leader

__all__ = ["RemoteSafetensorsCheckpoint", "RemoteShardedCheckpoint", "fallback_reason"]


def fallback_reason(err: _NoRangeSupport | _NotSafetensors) -> str:
    """Why a file is downloaded whole instead of read by range, for the log line."""
    if isinstance(err, _NoRangeSupport):
        return f"the server does not serve byte ranges ({err.reason})"
    if err.kind == "pickle":
        return "it is a pickle, which can only be read whole"
    return "it is not a safetensors file"


def _entries_of(remote: RemoteSafetensors) -> list[TensorEntry]:
    return [
        TensorEntry(i.name, i.dtype, tuple(i.shape), i.nbytes, remote.uri, i.start)
        for i in remote.infos()
    ]


class RemoteSafetensorsCheckpoint(Checkpoint):
    """A remote safetensors file (see the module docstring).

    Args:
        remote: the file, its header read.
        load_whole: loads the whole checkpoint (the scheme's cached download).
        map_location: as for `torch.load`.
        options: how ranges are fetched.
    """

    def __init__(
        self,
        remote: RemoteSafetensors,
        load_whole: Callable[[], Any],
        map_location: Any = None,
        options: RangeOptions | None = None,
    ) -> None:
        super().__init__(
            remote.uri,
            Format.SAFETENSORS,
            "a safetensors file (read by byte range)",
            header_only=True,
        )
        self.remote = remote
        self.size = remote.size
        self._load_whole = load_whole
        self._map_location = map_location
        self._options = options
        self._loaded: Any = None

    def entries(self) -> list[TensorEntry]:
        return _entries_of(self.remote)

    def all_entries(self) -> list[TensorEntry]:
        return self.entries()

    def keys(self) -> list[str]:
        return self.remote.names

    def meta_state_dict(self) -> Mapping[str, Any]:
        # From the header alone: nothing is fetched.
        return OrderedDict((e.name, e.meta) for e in self.entries())

    @property
    def metadata(self) -> dict[str, str]:
        return dict(self.remote.metadata)

    def load(self) -> Any:
        if self._loaded is None:
            self._loaded = self._load_whole()
        return self._loaded

    def state_dict(self, names: Iterable[str] | None = None) -> Mapping[str, Any]:
        if names is None:
            return super().state_dict()
        return read_tensors(
            [(self.remote, list(names))], map_location=self._map_location, options=self._options
        )

    def close(self) -> None:
        self._loaded = None


class RemoteShardedCheckpoint(Checkpoint):
    """A remote shard set (see the module docstring).

    Args:
        index_reader: the index's transport.
        reader_for: makes the transport of a shard's URI.
        map_location: as for `torch.load`.
        allowed_globals: for torch shards, as for `ckptmap.formats.load_file`.
        options: how ranges are fetched.

    Raises:
        InvalidShardIndexError: the index is not a shard index.
        UnsafeShardPathError: a shard name that is not a plain relative path (before any shard
            is asked for).
    """

    def __init__(
        self,
        index_reader: RangeReader,
        reader_for: Callable[[str], RangeReader],
        map_location: Any = None,
        *,
        allowed_globals: Iterable[Any] = (),
        options: RangeOptions | None = None,
    ) -> None:
        uri = index_reader.uri
        super().__init__(
            uri,
            Format.SHARDED,
            "a sharded checkpoint index (shards read by byte range)",
            header_only=True,
        )
        raw = index_reader.read_small(MAX_INDEX_BYTES)
        self.weight_map, self._index_metadata = parse_index(raw, uri)
        self.size = len(raw)
        self.shard_uris: dict[str, str] = {}
        for shard in dict.fromkeys(self.weight_map.values()):
            try:
                check_relative_name(shard, what="shard name")
            except UnsafePathError as err:
                raise UnsafeShardPathError(uri, shard, err.reason.removeprefix("it ")) from None
            self.shard_uris[shard] = sibling_uri(uri, shard)
        self._reader_for = reader_for
        self._map_location = map_location
        self._allowed_globals = tuple(allowed_globals)
        self._options = options or RangeOptions()
        self._opened: dict[str, RemoteSafetensors | Checkpoint] = {}
        self._lock = threading.Lock()

    # --- shards, opened on demand ---

    def _open_shard(self, shard: str) -> RemoteSafetensors | Checkpoint:
        uri = self.shard_uris[shard]
        reader = self._reader_for(uri)
        opened: RemoteSafetensors | Checkpoint | None
        try:
            opened = RemoteSafetensors.open(reader)
            present: Container[str] = opened
        except (_NoRangeSupport, _NotSafetensors) as err:
            opened = None
            reason = fallback_reason(err)
            if isinstance(err, _NotSafetensors) and err.kind == "zip":
                opened, reason = self._open_torch_shard(reader, err.head)
            if opened is None:
                log_message(
                    f"Downloading the shard {uri} whole through the cache: {reason}",
                    level=logging.INFO,
                )
                opened = open_file(
                    self._download(reader),
                    self._map_location,
                    allowed_globals=self._allowed_globals,
                )
            present = set(opened.keys())
        # The index is authoritative: each tensor it places here must be here.
        for name, owner in self.weight_map.items():
            if owner == shard and name not in present:
                raise ShardTensorMissingError(self.source, uri, name)
        return opened

    def _download(self, reader: RangeReader) -> Any:
        return fetch_on_local_leader(reader.download, reader.uri)

    def _open_torch_shard(self, reader: RangeReader, head: bytes) -> tuple[Checkpoint | None, str]:
        """A torch ``.bin`` shard by range, or None and why it must be downloaded whole."""

        def load_whole(map_location: Any) -> Any:
            path = self._download(reader)
            return load_file(path, map_location, allowed_globals=self._allowed_globals)

        try:
            pth_file = RemotePthFile.open(
                reader,
                head,
                load_whole,
                allowed_globals=self._allowed_globals,
                options=self._options,
            )
        except _NotByRange as err:
            return None, err.reason
        return RemoteTorchZipCheckpoint(pth_file, self._map_location), ""

    def _shards(self, shards: Iterable[str]) -> dict[str, RemoteSafetensors | Checkpoint]:
        """The shards named, opened (those not yet open in parallel)."""
        wanted = list(dict.fromkeys(shards))
        with self._lock:
            missing = [s for s in wanted if s not in self._opened]
            if len(missing) == 1:
                self._opened[missing[0]] = self._open_shard(missing[0])
            elif missing:
                workers = min(self._options.workers, len(missing))
                with ThreadPoolExecutor(workers, thread_name_prefix="ckptmap-shard") as pool:
                    for shard, opened in zip(
                        missing, pool.map(self._open_shard, missing), strict=True
                    ):
                        self._opened[shard] = opened
            return {s: self._opened[s] for s in wanted}

    def _shard_of(self, name: str) -> str:
        try:
            return self.weight_map[name]
        except (KeyError, TypeError):
            raise TensorNotFoundError(self.source, name) from None

    # --- the Checkpoint ---

    def entries(self) -> list[TensorEntry]:
        opened = self._shards(self.shard_uris)
        local: dict[str, dict[str, TensorEntry]] = {
            s: {e.name: e for e in c.entries()}
            for s, c in opened.items()
            if isinstance(c, Checkpoint)
        }
        out = []
        for name, shard in self.weight_map.items():
            shard_file = opened[shard]
            if isinstance(shard_file, RemoteSafetensors):
                i = shard_file.info(name)
                out.append(
                    TensorEntry(name, i.dtype, tuple(i.shape), i.nbytes, shard_file.uri, i.start)
                )
            else:
                e = local[shard][name]
                out.append(TensorEntry(name, e.dtype, e.shape, e.nbytes, e.file, e.start))
        return out

    def all_entries(self) -> list[TensorEntry]:
        return self.entries()

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def meta_state_dict(self) -> Mapping[str, Any]:
        # From the headers alone: no tensor is fetched.
        return OrderedDict((e.name, e.meta) for e in self.entries())

    @property
    def metadata(self) -> dict[str, str]:
        return {k: str(v) for k, v in self._index_metadata.items()}

    @property
    def shards(self) -> int | None:
        return len(self.shard_uris)

    def load(self) -> Any:
        return self.state_dict()

    def state_dict(self, names: Iterable[str] | None = None) -> Mapping[str, Any]:
        asked = list(self.weight_map) if names is None else list(names)
        by_shard: dict[str, list[str]] = {}
        for name in asked:
            by_shard.setdefault(self._shard_of(name), []).append(name)
        opened = self._shards(by_shard)
        remote = [(f, by_shard[s]) for s, f in opened.items() if isinstance(f, RemoteSafetensors)]
        found: dict[str, Any] = dict(
            read_tensors(remote, map_location=self._map_location, options=self._options)
        )
        for shard, shard_file in opened.items():
            if isinstance(shard_file, Checkpoint):
                found.update(shard_file.state_dict(by_shard[shard]))
        return OrderedDict((name, found[name]) for name in asked)

    def close(self) -> None:
        for opened in self._opened.values():
            if isinstance(opened, Checkpoint):
                opened.close()
        self._opened = {}
