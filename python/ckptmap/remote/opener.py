"""`open_remote`: the http(s) and ``s3://`` checkpoints that are opened by byte range.

`ckptmap.open_checkpoint` asks here first for every URI whose loader is the built-in
``http(s)://`` or ``s3://`` (boto3) one; a URI this module does not read by range returns
None and is loaded as before, whole, through the scheme's download cache. That happens, in
one log line, when:

- the server does not serve byte ranges (it answers a ranged request with the whole file);
- the file is neither a safetensors file nor a torch zip (``torch.save``'s format, read by
  `ckptmap.remote.pth`), or a torch zip only torch can read (compressed members, a pickle
  the Rust reader does not run, big-endian data);
- an http(s) file name carries a SHA-256 prefix (``name-<8+ hex digits>.ext``), which only a
  whole download can check.

URIs ending in ``.index.json`` are shard sets (`RemoteShardedCheckpoint`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

from ckptmap.cache import expected_hash_from_name, url_basename
from ckptmap.formats import allowlist
from ckptmap.opened import Checkpoint
from ckptmap.remote.checkpoint import (
    RemoteSafetensorsCheckpoint,
    RemoteShardedCheckpoint,
    fallback_reason,
)
from ckptmap.remote.pth import RemotePthFile, RemoteTorchZipCheckpoint, _NotByRange
from ckptmap.remote.reader import RangeReader, _NoRangeSupport
from ckptmap.remote.safetensors import RangeOptions, RemoteSafetensors, _NotSafetensors
from ckptmap.remote.uris import is_index_uri
from ckptmap.report import log_message
from ckptmap.schemes import load_from_ceph, load_from_http

__all__ = ["open_remote", "transport_for"]


def transport_for(uri: str, loader: Any) -> Callable[[str], RangeReader] | None:
    """How to read `uri` by range, given the loader the scheme registry picked for it; None
    for loaders other than the built-in http(s) and boto3 ``s3://`` ones (model zoos, petrel,
    custom schemes, a user's own override)."""
    if loader is load_from_http:
        from ckptmap.remote.web_ranges import HttpRangeReader

        return HttpRangeReader
    if loader is load_from_ceph:
        from ckptmap.objectstore import (
            PETREL,
            choose_s3_backend,
            endpoint_text,
            parse_s3_uri,
            s3_client,
        )

        if choose_s3_backend(uri) == PETREL:
            return None  # the object-store rule picks petrel: its own whole reads
        from ckptmap.remote.s3_ranges import S3RangeReader

        cluster, _, _ = parse_s3_uri(uri)
        if cluster:
            log_message(
                f"Ignoring the cluster prefix {cluster!r} of {uri}: it is a petrel setting, and "
                f"boto3 uses {endpoint_text()}",
                level=logging.WARNING,
            )
        client = s3_client()  # one client (and connection pool) for the index and its shards
        return lambda u: S3RangeReader(u, client)
    return None


def _whole(uri: str, reason: str) -> None:
    log_message(f"Downloading {uri} whole through the cache: {reason}", level=logging.INFO)


def open_remote(
    uri: str,
    loader: Any,
    map_location: Any = None,
    *,
    allowed_globals: Iterable[Any] = (),
    options: RangeOptions | None = None,
) -> Checkpoint | None:
    """Opens `uri` by byte range, or returns None for a whole download (see the module
    docstring).

    Args:
        uri: the URI.
        loader: the loader the scheme registry chose for it.
        map_location: as for `torch.load`.
        allowed_globals: for torch shards of a shard set, as for `ckptmap.formats.load_file`.
        options: how ranges are fetched (default `RangeOptions()`).

    Raises:
        InvalidSafetensorsError: a safetensors header that fails validation.
        InvalidShardIndexError, UnsafeShardPathError: a bad shard index.
        DownloadError and subclasses: as the scheme's downloads raise them.
    """
    transport = transport_for(uri, loader)
    if transport is None:
        return None
    if is_index_uri(uri):
        return RemoteShardedCheckpoint(
            transport(uri),
            transport,
            map_location,
            allowed_globals=allowed_globals,
            options=options,
        )
    if loader is load_from_http and expected_hash_from_name(url_basename(uri)):
        _whole(uri, "its name carries a SHA-256 prefix, which only a whole download can check")
        return None
    reader = transport(uri)
    try:
        remote = RemoteSafetensors.open(reader)
    except _NotSafetensors as err:
        if err.kind == "zip":
            return _open_torch_zip(
                reader, err.head, uri, loader, map_location, allowed_globals, options
            )
        _whole(uri, fallback_reason(err))
        return None
    except _NoRangeSupport as err:
        _whole(uri, fallback_reason(err))
        return None
    return RemoteSafetensorsCheckpoint(
        remote, lambda: loader(uri, map_location), map_location, options
    )


def _open_torch_zip(
    reader: RangeReader,
    head: bytes,
    uri: str,
    loader: Any,
    map_location: Any,
    allowed_globals: Iterable[Any],
    options: RangeOptions | None,
) -> Checkpoint | None:
    allowed = tuple(allowed_globals)

    def load_whole(location: Any) -> Any:
        # Later, outside the caller's block: with the allowlist the checkpoint was opened with.
        with allowlist.extended(allowed):
            return loader(uri, location)

    try:
        pth_file = RemotePthFile.open(
            reader, head, load_whole, allowed_globals=allowed, options=options
        )
    except _NotByRange as err:
        _whole(uri, err.reason)
        return None
    return RemoteTorchZipCheckpoint(pth_file, map_location)
