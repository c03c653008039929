"""``s3://bucket/key`` (and ``cluster:s3://...``) through boto3 or petrel, on any S3 store.

Which client serves a URI is `ckptmap.objectstore`'s rule, the same for loads and saves:
petrel when ``petrel_client`` is installed (as in OpenMMLab), else boto3, unless
``backend=...`` or ``$CKPTMAP_S3_BACKEND`` names one. With boto3 the endpoint comes from
``$AWS_ENDPOINT_URL_S3`` or ``$AWS_ENDPOINT_URL`` (MinIO, Ceph RGW, a moto server, ...), else
AWS itself; credentials and region come from boto3's usual chain. Objects are cached under
``<cache home>/s3/<bucket>/<key dirs>/<etag>/<key name>``: a new version of an object (a new
ETag) is a new entry, and the download is pinned to the ETag it started with (``If-Match``).
Like HTTP downloads, the body goes to a temp file that is renamed into place only when its
length matches and it looks like a checkpoint.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ckptmap.atomic import remove_stale_temps
from ckptmap.cache import CHUNK_SIZE, cache_home, write_verified
from ckptmap.objectstore import (
    ENV_AWS_ENDPOINT_URL,
    PETREL,
    choose_s3_backend,
    endpoint_text,
    parse_s3_uri,
    s3_client,
    store_errors,
)
from ckptmap.paths import check_relative_name, safe_join
from ckptmap.schemes.petrel import load_with_petrel
from ckptmap.schemes.ranks import fetch_on_local_leader
from ckptmap.schemes.registry import CheckpointLoader
from ckptmap.schemes.web import load_cached_file

__all__ = [
    "ENV_AWS_ENDPOINT_URL",
    "load_from_ceph",
    "parse_s3_uri",
    "s3_cache_path",
    "s3_client",
    "s3_download",
]

logger = logging.getLogger("ckptmap")


def s3_cache_path(
    bucket: str, key: str, etag: str, root: str | os.PathLike[str] | None = None
) -> Path:
    """Where the object version `etag` of ``s3://bucket/key`` is cached.

    Raises:
        UnsafePathError: the bucket or key can not be used as a path inside the cache.
    """
    base = Path(root) if root is not None else cache_home() / "s3"
    bucket_dir = safe_join(base, bucket, what="S3 bucket name", allow_subdirs=False)
    parts = check_relative_name(key, what="S3 key", root=str(bucket_dir))
    version = re.sub(r"[^0-9A-Za-z-]", "", etag)[:64] or "no-etag"
    return safe_join(bucket_dir, "/".join((*parts[:-1], version, parts[-1])), what="S3 key")


def _body_chunks(body: Any, uri: str) -> Iterator[bytes]:
    try:
        with store_errors(uri, writing=False):
            yield from body.iter_chunks(CHUNK_SIZE)
    finally:
        body.close()


def s3_download(
    uri: str,
    *,
    client: Any = None,
    cache_root: str | os.PathLike[str] | None = None,
    progress: bool | None = None,
    stale_temp_age_s: float = 3600.0,
) -> Path:
    """Returns the cached file of ``s3://bucket/key``, downloading it first if needed.

    Args:
        uri: ``s3://bucket/key`` (a ``cluster:`` prefix is ignored).
        client: a boto3 S3 client (default: `s3_client()`).
        cache_root: the directory for S3 objects (default ``<cache home>/s3``).
        progress: show a progress bar (None: only when stderr is a terminal).
        stale_temp_age_s: temp files of other downloads older than this are removed.

    Raises:
        RemoteNotFoundError: NoSuchKey / NoSuchBucket (a FileNotFoundError).
        RemoteAccessDenied: AccessDenied, bad or missing credentials (a PermissionError).
        RemoteUnavailableError: the endpoint can not be reached (names AWS_ENDPOINT_URL).
        IncompleteDownloadError, UnexpectedContentError: see `write_verified`.
        UnsafePathError: the bucket or key can not be a path inside the cache.
    """
    _, bucket, key = parse_s3_uri(uri)
    # Reject unusable keys before any request or write.
    s3_cache_path(bucket, key, "check", cache_root)
    client = client if client is not None else s3_client()
    with store_errors(uri, writing=False):
        head = client.head_object(Bucket=bucket, Key=key)
        etag = str(head.get("ETag", ""))
        length = head.get("ContentLength")
        target = s3_cache_path(bucket, key, etag, cache_root)
        if target.is_file() and (length is None or target.stat().st_size == length):
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(target.parent, older_than_s=stale_temp_age_s)
        logger.info("Downloading %s to %s", uri, target)
        extra = {"IfMatch": etag} if etag else {}
        response = client.get_object(Bucket=bucket, Key=key, **extra)
    return write_verified(
        target,
        _body_chunks(response["Body"], uri),
        url=uri,
        expected_length=response.get("ContentLength", length),
        sniff=True,
        progress=progress,
    )


@CheckpointLoader.register_scheme(prefixes=r"(\S+\:)?s3://")
def load_from_ceph(filename: str, map_location: Any = None, backend: str | None = None) -> Any:
    """Loads ``s3://bucket/key`` (or ``cluster:s3://...``) with petrel or through the cache.

    With boto3, each machine's local rank 0 downloads first in a distributed job.

    Args:
        filename: the URI.
        map_location: as for `torch.load`.
        backend: ``"petrel"``, ``"boto3"``, or None for `ckptmap.objectstore`'s rule
            (``$CKPTMAP_S3_BACKEND``, else petrel when it is installed, else boto3).

    Raises:
        UnsupportedBackendError: another backend (a ValueError).
        MissingDependencyError: the chosen client is not installed.
        See `s3_download` and `ckptmap.schemes.petrel.load_with_petrel`.
    """
    if choose_s3_backend(filename, backend) == PETREL:
        return load_with_petrel(filename, map_location)
    cluster, _, _ = parse_s3_uri(filename)
    if cluster:
        logger.warning(
            "Ignoring the cluster prefix %r of %s: it is a petrel setting, and boto3 uses %s",
            cluster,
            filename,
            endpoint_text(),
        )
    path = fetch_on_local_leader(lambda: s3_download(filename), filename)
    return load_cached_file(path, filename, map_location)
