"""``s3://bucket/key`` (and ``cluster:s3://...``) through boto3, on any S3-compatible store.

The endpoint comes from ``$AWS_ENDPOINT_URL_S3`` or ``$AWS_ENDPOINT_URL`` (MinIO, Ceph RGW, a
moto server, ...), else AWS itself; credentials and region come from boto3's usual chain.
Objects are cached under ``<cache home>/s3/<bucket>/<key dirs>/<etag>/<key name>``: a new
version of an object (a new ETag) is a new entry, and the download is pinned to the ETag it
started with (``If-Match``). Like HTTP downloads, the body goes to a temp file that is renamed
into place only when its length matches and it looks like a checkpoint.

When the petrel client is installed, these URIs go to it instead (as in OpenMMLab), unless
``backend="boto3"`` is asked for.
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
from ckptmap.errors import (
    DownloadError,
    IncompleteDownloadError,
    MissingDependencyError,
    RemoteAccessDenied,
    RemoteNotFoundError,
    RemoteUnavailableError,
)
from ckptmap.paths import check_relative_name, safe_join
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

ENV_AWS_ENDPOINT_URL = "AWS_ENDPOINT_URL"
ENV_AWS_ENDPOINT_URL_S3 = "AWS_ENDPOINT_URL_S3"

#: botocore's retry budget and timeouts for the clients `s3_client` makes.
DEFAULT_MAX_ATTEMPTS = 3
DEFAULT_CONNECT_TIMEOUT_S = 10.0
DEFAULT_READ_TIMEOUT_S = 60.0

_S3_URI = re.compile(r"^(?:(?P<cluster>\S+?):)?s3://(?P<bucket>[^/]*)/?(?P<key>.*)$", re.DOTALL)
_NOT_FOUND = frozenset({"NoSuchKey", "NoSuchBucket", "NotFound", "404"})
_DENIED = frozenset(
    {
        "AccessDenied",
        "403",
        "401",
        "Forbidden",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "AllAccessDisabled",
        "AccountProblem",
        "InvalidToken",
        "ExpiredToken",
    }
)


def parse_s3_uri(uri: str) -> tuple[str | None, str, str]:
    """``"[cluster:]s3://bucket/key"`` -> ``(cluster or None, bucket, key)``.

    Raises:
        ValueError: not an s3 URI, or the bucket or key is missing.
    """
    match = _S3_URI.match(uri)
    if match is None:
        raise ValueError(f"{uri!r} is not an s3:// URI (expected s3://bucket/key)")
    bucket, key = match.group("bucket"), match.group("key")
    if not bucket or not key:
        raise ValueError(f"{uri!r} must name a bucket and a key: s3://bucket/path/to/file.pth")
    return match.group("cluster"), bucket, key


def _endpoint() -> str | None:
    return os.environ.get(ENV_AWS_ENDPOINT_URL_S3) or os.environ.get(ENV_AWS_ENDPOINT_URL) or None


def _endpoint_text() -> str:
    for name in (ENV_AWS_ENDPOINT_URL_S3, ENV_AWS_ENDPOINT_URL):
        if os.environ.get(name):
            return f"the endpoint {os.environ[name]!r} from ${name}"
    return (
        f"the default AWS endpoint (${ENV_AWS_ENDPOINT_URL} is not set; set it for MinIO, Ceph "
        "RGW or another S3-compatible store)"
    )


def s3_client(
    *,
    max_attempts: int | None = None,
    connect_timeout_s: float | None = None,
    read_timeout_s: float | None = None,
) -> Any:
    """A boto3 S3 client for ``$AWS_ENDPOINT_URL_S3`` / ``$AWS_ENDPOINT_URL`` (or AWS).

    Raises:
        MissingDependencyError: boto3 is not installed.
        RemoteUnavailableError: the endpoint URL is malformed (names the variable).
    """
    try:
        import boto3  # type: ignore[import-untyped]
        from botocore.config import Config  # type: ignore[import-untyped]
    except ImportError as err:
        raise MissingDependencyError(
            "s3:// checkpoints need boto3, which is not installed: pip install 'ckptmap[s3]'",
            name="boto3",
        ) from err
    config = Config(
        retries={
            "max_attempts": max_attempts if max_attempts is not None else DEFAULT_MAX_ATTEMPTS,
            "mode": "standard",
        },
        connect_timeout=connect_timeout_s or DEFAULT_CONNECT_TIMEOUT_S,
        read_timeout=read_timeout_s or DEFAULT_READ_TIMEOUT_S,
    )
    endpoint = _endpoint()
    try:
        return boto3.session.Session().client("s3", endpoint_url=endpoint, config=config)
    except ValueError as err:
        raise RemoteUnavailableError(
            f"can not use {_endpoint_text()} for S3 ({err}): set {ENV_AWS_ENDPOINT_URL} to a URL "
            "such as http://127.0.0.1:9000",
            url=endpoint or "",
        ) from err


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


def _map_error(err: BaseException, uri: str) -> BaseException:
    """The ckptmap error for a botocore exception (other exceptions are returned as they are)."""
    try:
        from botocore import exceptions as bex  # type: ignore[import-untyped]
    except ImportError:  # pragma: no cover - only called after boto3 was imported
        return err
    if isinstance(err, bex.ClientError):
        error = err.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        detail = f"S3 {code or status}: {error.get('Message') or err}"
        if code in _NOT_FOUND:
            return RemoteNotFoundError(
                f"{uri} does not exist ({detail}); check the bucket and key. Endpoint: "
                f"{_endpoint_text()}",
                url=uri,
                status=status,
            )
        if code in _DENIED:
            return RemoteAccessDenied(
                f"access to {uri} was denied ({detail}); check your AWS credentials and the "
                f"bucket's policy. Endpoint: {_endpoint_text()}",
                url=uri,
                status=status,
            )
        if code in ("PreconditionFailed", "412"):
            return DownloadError(
                f"{uri} changed while it was being downloaded ({detail}); nothing was cached. "
                "Try again",
                url=uri,
                status=status,
            )
        if (status or 0) >= 500 or code in ("SlowDown", "ServiceUnavailable", "InternalError"):
            return RemoteUnavailableError(
                f"{uri} failed ({detail}) after retries; the store is overloaded or down: try "
                f"again later. Endpoint: {_endpoint_text()}",
                url=uri,
                status=status,
            )
        return DownloadError(f"{uri} failed ({detail})", url=uri, status=status)
    if isinstance(err, (bex.NoCredentialsError, bex.PartialCredentialsError)):
        return RemoteAccessDenied(
            f"no usable AWS credentials to read {uri} ({err}): set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE",
            url=uri,
        )
    if isinstance(
        err,
        (bex.EndpointConnectionError, bex.ConnectTimeoutError, bex.ConnectionClosedError),
    ):
        return RemoteUnavailableError(
            f"could not reach {_endpoint_text()} to read {uri} ({err}): check "
            f"${ENV_AWS_ENDPOINT_URL} and that the store is running",
            url=uri,
        )
    if isinstance(err, (bex.ReadTimeoutError, bex.ResponseStreamingError)):
        return IncompleteDownloadError(
            f"reading {uri} from {_endpoint_text()} broke off ({err}); nothing was cached. "
            "Try again",
            url=uri,
        )
    if isinstance(err, bex.BotoCoreError):
        return DownloadError(f"could not read {uri} ({type(err).__name__}: {err})", url=uri)
    return err


def _body_chunks(body: Any, uri: str) -> Iterator[bytes]:
    try:
        yield from body.iter_chunks(CHUNK_SIZE)
    except Exception as err:
        mapped = _map_error(err, uri)
        if mapped is err:
            raise
        raise mapped from err
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
    try:
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
    except Exception as err:
        mapped = _map_error(err, uri)
        if mapped is err:
            raise
        raise mapped from err
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
    """Loads ``s3://bucket/key`` (or ``cluster:s3://...``) through the cache.

    In a distributed job each machine's local rank 0 downloads first.

    Args:
        filename: the URI.
        map_location: as for `torch.load`.
        backend: "boto3", "petrel", or None for petrel when it is installed, else boto3.

    Raises:
        See `s3_download`; MissingDependencyError when the chosen client is not installed.
    """
    from ckptmap.schemes import petrel

    if backend is None:
        backend = "petrel" if petrel.petrel_available() else "boto3"
    if backend == "petrel":
        return petrel.load_with_petrel(filename, map_location)
    if backend != "boto3":
        raise ValueError(f"backend must be 'boto3', 'petrel' or None, got {backend!r}")
    cluster, _, _ = parse_s3_uri(filename)
    if cluster:
        logger.warning(
            "Ignoring the cluster prefix %r of %s: it is a petrel setting, and boto3 uses %s",
            cluster,
            filename,
            _endpoint_text(),
        )
    path = fetch_on_local_leader(lambda: s3_download(filename), filename)
    return load_cached_file(path, filename, map_location)
