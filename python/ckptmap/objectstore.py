"""Object stores (``s3://``, ``petrel://``): which client, how it is made, what its errors mean.

Loading (`ckptmap.schemes.s3`, `ckptmap.schemes.petrel`) and saving (`ckptmap.save.sinks`)
both come here, so the same URI always reaches the same store, through clients made the same
way, and a failure means the same thing in both directions.

Which client serves ``s3://`` (and ``cluster:s3://``), for loads and saves alike:

1. the backend asked for explicitly: ``load_from_ceph(..., backend=...)``, or
   ``backend_args={"backend": ...}`` / ``file_client_args={"backend": ...}`` when saving
   (``"petrel"`` or ``"boto3"``);
2. else ``$CKPTMAP_S3_BACKEND`` (``petrel`` or ``boto3``), which is how a load through
   `load_checkpoint` (which takes no backend) is pointed at the same store as a save that
   named one;
3. else petrel when ``petrel_client`` is importable (as mmengine does), otherwise boto3.

``petrel://`` always goes to petrel. A backend that can not serve the URI (``"local"`` for
``s3://``, ``"memcached"``, a typo) is an `UnsupportedBackendError`, never replaced silently.

boto3 clients come from `s3_client`: the endpoint from ``endpoint_url`` (saves only), else
``$AWS_ENDPOINT_URL_S3``, else ``$AWS_ENDPOINT_URL``, else AWS; standard retries
(`DEFAULT_MAX_ATTEMPTS`) and connect/read timeouts; credentials from boto3's usual chain.
petrel clients come from `petrel_client` (its own configuration, ``~/petreloss.conf``).
"""

from __future__ import annotations

import contextlib
import enum
import importlib.util
import os
import re
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

from ckptmap.errors import (
    CheckpointNotFoundError,
    CheckpointSaveError,
    DownloadError,
    IncompleteDownloadError,
    InvalidURIError,
    MissingDependencyError,
    RemoteAccessDenied,
    RemoteNotFoundError,
    RemoteUnavailableError,
    SavePermissionError,
    SaveUnavailableError,
    UnsupportedBackendError,
)

__all__ = [
    "BOTO3",
    "BOTO3_CLIENT_ARGS",
    "DEFAULT_CONNECT_TIMEOUT_S",
    "DEFAULT_MAX_ATTEMPTS",
    "DEFAULT_READ_TIMEOUT_S",
    "ENV_AWS_ENDPOINT_URL",
    "ENV_AWS_ENDPOINT_URL_S3",
    "ENV_S3_BACKEND",
    "PETREL",
    "PETREL_CLIENT_ARGS",
    "PETREL_WHERE",
    "S3URI",
    "Fault",
    "choose_s3_backend",
    "endpoint_text",
    "endpoint_url",
    "is_object_uri",
    "parse_s3_uri",
    "petrel_available",
    "petrel_client",
    "petrel_get",
    "petrel_uri",
    "s3_client",
    "store_error",
    "store_errors",
]

ENV_AWS_ENDPOINT_URL = "AWS_ENDPOINT_URL"
ENV_AWS_ENDPOINT_URL_S3 = "AWS_ENDPOINT_URL_S3"
#: Picks the client for ``s3://`` when no backend is named (``petrel`` or ``boto3``).
ENV_S3_BACKEND = "CKPTMAP_S3_BACKEND"

BOTO3 = "boto3"
PETREL = "petrel"
_S3_BACKENDS = (BOTO3, PETREL)

#: Attempts per request (the first included) and timeouts of the clients `s3_client` makes.
DEFAULT_MAX_ATTEMPTS = 3
DEFAULT_CONNECT_TIMEOUT_S = 10.0
DEFAULT_READ_TIMEOUT_S = 60.0

#: ``boto3.client`` arguments a save's `backend_args` may carry.
BOTO3_CLIENT_ARGS = frozenset(
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
#: mmengine's ``PetrelBackend`` arguments a save's `backend_args` may carry.
PETREL_CLIENT_ARGS = frozenset({"path_mapping", "enable_mc", "conf_path"})

_S3_URI = re.compile(r"^(?:(?P<cluster>\S+?):)?s3://(?P<bucket>[^/]*)/?(?P<key>.*)$", re.DOTALL)
_PETREL_URI = re.compile(r"^(?:\S+?:)?petrel://", re.DOTALL)


class S3URI(NamedTuple):
    """The parts of ``[cluster:]s3://bucket/key``."""

    cluster: str | None
    bucket: str
    key: str


def parse_s3_uri(uri: str) -> S3URI:
    """``"[cluster:]s3://bucket/key"`` -> ``(cluster or None, bucket, key)``.

    Raises:
        InvalidURIError: not an s3 URI, or the bucket or key is missing (a ValueError).
    """
    match = _S3_URI.match(uri)
    if match is None:
        raise InvalidURIError(f"{uri!r} is not an s3:// URI (expected s3://bucket/key)", uri=uri)
    bucket, key = match.group("bucket"), match.group("key")
    if not bucket or not key:
        raise InvalidURIError(
            f"{uri!r} must name a bucket and a key: s3://bucket/path/to/file.pth", uri=uri
        )
    return S3URI(match.group("cluster"), bucket, key)


def is_object_uri(target: str) -> bool:
    """Whether `target` is an ``s3://`` or ``petrel://`` URI (with or without a cluster)."""
    return _S3_URI.match(target) is not None or _PETREL_URI.match(target) is not None


def petrel_uri(uri: str, path_mapping: Mapping[str, str] | None = None) -> str:
    """The URI as the petrel client takes it: `path_mapping` applied (each ``old: new`` once,
    as mmengine's ``PetrelBackend`` does), then ``petrel://`` spelled ``s3://``."""
    for old, new in (path_mapping or {}).items():
        uri = uri.replace(old, new, 1)
    return re.sub(r"petrel://", "s3://", uri, count=1)


# --- which client -------------------------------------------------------------------------------


def petrel_available() -> bool:
    """Whether the petrel client (``petrel_client``) can be imported."""
    try:
        return importlib.util.find_spec("petrel_client") is not None
    except (ImportError, ValueError):
        return False


def choose_s3_backend(uri: str, requested: str | None = None) -> str:
    """The client for `uri`: `BOTO3` or `PETREL`, by the rule in the module docstring.

    Args:
        uri: an ``s3://`` or ``petrel://`` URI (for messages, and petrel:// is petrel's).
        requested: the backend named by the caller, or None.

    Raises:
        UnsupportedBackendError: `requested` (or ``$CKPTMAP_S3_BACKEND``) is neither
            ``"boto3"`` nor ``"petrel"``, or ``"boto3"`` for a ``petrel://`` URI.
    """
    source = "backend"
    if requested is None and os.environ.get(ENV_S3_BACKEND, "").strip():
        requested, source = os.environ[ENV_S3_BACKEND].strip().lower(), f"${ENV_S3_BACKEND}"
    supported = [PETREL] if _PETREL_URI.match(uri) else list(_S3_BACKENDS)
    if requested is None:
        return PETREL if PETREL in supported and petrel_available() else supported[0]
    if requested not in supported:
        hint = {
            "local": "it writes local files",
            "disk": "it writes local files",
            "ceph": "mmcv's CephBackend is gone; petrel reads the same stores",
        }.get(str(requested), "ckptmap does not have it")
        raise UnsupportedBackendError(
            f"{source} {requested!r} can not serve {uri} ({hint}): use "
            f"{' or '.join(map(repr, supported))}, or leave it out to pick petrel when "
            "petrel_client is installed, else boto3",
            backend=requested,
            target=uri,
            supported=supported,
        )
    return requested


# --- making clients -----------------------------------------------------------------------------


def endpoint_url() -> str | None:
    """``$AWS_ENDPOINT_URL_S3``, else ``$AWS_ENDPOINT_URL``, else None (AWS itself)."""
    return os.environ.get(ENV_AWS_ENDPOINT_URL_S3) or os.environ.get(ENV_AWS_ENDPOINT_URL) or None


def endpoint_text(explicit: str | None = None) -> str:
    """Which endpoint boto3 talks to, in words (for messages)."""
    if explicit:
        return f"the endpoint {explicit!r} (endpoint_url)"
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
    **client_args: Any,
) -> Any:
    """A boto3 S3 client with bounded retries and timeouts.

    Args:
        max_attempts: botocore's attempts per request (default `DEFAULT_MAX_ATTEMPTS`).
        connect_timeout_s, read_timeout_s: per-request timeouts.
        **client_args: `BOTO3_CLIENT_ARGS` for ``boto3.client``; a ``config`` is merged over
            ours (its retries and timeouts win), an ``endpoint_url`` over the environment.

    Raises:
        MissingDependencyError: boto3 is not installed (an ImportError).
        RemoteUnavailableError: the endpoint URL is malformed (names where it came from).
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
        # total_max_attempts counts the first try (botocore's max_attempts does not).
        retries={
            "total_max_attempts": (
                max_attempts if max_attempts is not None else DEFAULT_MAX_ATTEMPTS
            ),
            "mode": "standard",
        },
        connect_timeout=connect_timeout_s or DEFAULT_CONNECT_TIMEOUT_S,
        read_timeout=read_timeout_s or DEFAULT_READ_TIMEOUT_S,
    )
    if client_args.get("config") is not None:
        config = config.merge(client_args["config"])
    args = {**client_args, "config": config}
    explicit = args.get("endpoint_url")
    args["endpoint_url"] = explicit or endpoint_url()
    try:
        return boto3.session.Session().client("s3", **args)
    except ValueError as err:
        raise RemoteUnavailableError(
            f"can not use {endpoint_text(explicit)} for S3 ({err}): set "
            f"{ENV_AWS_ENDPOINT_URL} (or endpoint_url) to a URL such as http://127.0.0.1:9000",
            url=args["endpoint_url"] or "",
        ) from err


def petrel_client(*, conf_path: str | None = None, enable_mc: bool | None = None) -> Any:
    """A petrel ``Client`` (arguments as mmengine's ``PetrelBackend`` passes them).

    Raises:
        MissingDependencyError: ``petrel_client`` is not installed (an ImportError).
    """
    try:
        from petrel_client.client import Client  # type: ignore[import-not-found]
    except ImportError as err:
        raise MissingDependencyError(
            "petrel:// (and s3:// with the petrel backend) checkpoints need the petrel client "
            "(petrel_client), which is not installed: install it from your cluster's "
            "documentation, or use boto3 (backend 'boto3', or "
            f"{ENV_S3_BACKEND}=boto3) with {ENV_AWS_ENDPOINT_URL} for S3-compatible stores",
            name="petrel_client",
        ) from err
    kwargs: dict[str, Any] = {}
    if conf_path is not None:
        kwargs["conf_path"] = conf_path
    if enable_mc is not None:
        kwargs["enable_mc"] = enable_mc
    return Client(**kwargs)


def petrel_get(client: Any, uri: str) -> Any:
    """The bytes of `uri` from a petrel client, or None when it has no such object."""
    # mmengine calls `Get`; some clients only have `get`.
    get = getattr(client, "Get", None) or client.get
    return get(uri)


# --- what errors mean ---------------------------------------------------------------------------


class Fault(enum.Enum):
    """What went wrong with a store request, whichever client reported it."""

    NOT_FOUND = "not found"
    DENIED = "access denied"
    UNAVAILABLE = "unavailable"
    CHANGED = "changed meanwhile"
    BROKEN_OFF = "broke off"
    FAILED = "failed"


_NOT_FOUND_CODES = frozenset({"NoSuchKey", "NoSuchBucket", "NotFound", "404"})
_DENIED_CODES = frozenset(
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
_BUSY_CODES = frozenset({"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout"})


def _boto_fault(err: BaseException) -> tuple[Fault, str, int | None] | None:
    try:
        from botocore import exceptions as bex  # type: ignore[import-untyped]
    except ImportError:
        return None
    if isinstance(err, bex.ClientError):
        error = err.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        detail = f"S3 {code or status}: {error.get('Message') or err}"
        if code in _NOT_FOUND_CODES:
            return Fault.NOT_FOUND, detail, status
        if code in _DENIED_CODES:
            return Fault.DENIED, detail, status
        if code in ("PreconditionFailed", "412"):
            return Fault.CHANGED, detail, status
        if (status or 0) >= 500 or code in _BUSY_CODES:
            return Fault.UNAVAILABLE, detail, status
        return Fault.FAILED, detail, status
    if isinstance(err, (bex.NoCredentialsError, bex.PartialCredentialsError)):
        return Fault.DENIED, f"no usable AWS credentials ({err})", None
    if isinstance(
        err, (bex.EndpointConnectionError, bex.ConnectTimeoutError, bex.ConnectionClosedError)
    ):
        return Fault.UNAVAILABLE, str(err), None
    if isinstance(err, (bex.ReadTimeoutError, bex.ResponseStreamingError)):
        return Fault.BROKEN_OFF, str(err), None
    if isinstance(err, bex.BotoCoreError):
        return Fault.FAILED, f"{type(err).__name__}: {err}", None
    return None


# The petrel client is closed source; its exceptions are told apart by name.
_PETREL_NAMES = (
    (("NotFound", "NoSuch"), Fault.NOT_FOUND),
    (("AccessDenied", "Permission", "Forbidden", "Credential"), Fault.DENIED),
    (("Timeout", "Connection", "Unavailable", "Network"), Fault.UNAVAILABLE),
)


def _petrel_fault(err: BaseException) -> tuple[Fault, str, int | None] | None:
    module = type(err).__module__ or ""
    if not module.startswith("petrel_client"):
        return None
    name = type(err).__name__
    detail = f"petrel {name}: {err}"
    for words, fault in _PETREL_NAMES:
        if any(word in name for word in words):
            return fault, detail, None
    return Fault.FAILED, detail, None


#: How messages name the petrel client's store.
PETREL_WHERE = "the petrel client's store (configured in ~/petreloss.conf)"


def store_error(
    err: BaseException, uri: str, *, writing: bool, where: str | None = None
) -> BaseException:
    """The ckptmap error for a store client's exception (others are returned as they are).

    Reading: `RemoteNotFoundError` (FileNotFoundError), `RemoteAccessDenied` (PermissionError),
    `RemoteUnavailableError` (ConnectionError), `IncompleteDownloadError`, `DownloadError`.
    Writing: `CheckpointNotFoundError` (no such bucket), `SavePermissionError`,
    `SaveUnavailableError` (ConnectionError), `CheckpointSaveError`. Every message names the
    URI and the store.

    Args:
        err: what the client raised.
        uri: the object's URI.
        writing: whether the request was part of a save.
        where: the store in words (default: boto3's endpoint, `endpoint_text`).
    """
    found = _boto_fault(err) or _petrel_fault(err)
    if found is None:
        return err
    fault, detail, status = found
    where = where or endpoint_text()
    if writing:
        return _write_error(fault, detail, uri, where)
    return _read_error(fault, detail, status, uri, where)


def _read_error(fault: Fault, detail: str, status: int | None, uri: str, where: str) -> Exception:
    if fault is Fault.NOT_FOUND:
        return RemoteNotFoundError(
            f"{uri} does not exist ({detail}); check the bucket and key. Endpoint: {where}",
            url=uri,
            status=status,
        )
    if fault is Fault.DENIED:
        return RemoteAccessDenied(
            f"access to {uri} was denied ({detail}); check your credentials (AWS_ACCESS_KEY_ID "
            f"and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE) and the bucket's policy. Endpoint: "
            f"{where}",
            url=uri,
            status=status,
        )
    if fault is Fault.CHANGED:
        return DownloadError(
            f"{uri} changed while it was being downloaded ({detail}); nothing was cached. "
            "Try again",
            url=uri,
            status=status,
        )
    if fault is Fault.UNAVAILABLE:
        return RemoteUnavailableError(
            f"could not read {uri} from {where} ({detail}) after retries: check "
            f"${ENV_AWS_ENDPOINT_URL} and that the store is running, or try again later",
            url=uri,
            status=status,
        )
    if fault is Fault.BROKEN_OFF:
        return IncompleteDownloadError(
            f"reading {uri} from {where} broke off ({detail}); nothing was cached. Try again",
            url=uri,
        )
    return DownloadError(f"could not read {uri} ({detail})", url=uri, status=status)


def _write_error(fault: Fault, detail: str, uri: str, where: str) -> Exception:
    if fault is Fault.NOT_FOUND:
        return CheckpointNotFoundError(
            uri,
            f"can not write {uri}: no such bucket at {where} ({detail}): create the bucket, or "
            f"check the URI and {ENV_AWS_ENDPOINT_URL}",
        )
    if fault is Fault.DENIED:
        return SavePermissionError(
            f"can not write {uri}: {where} refused access ({detail}); check the credentials "
            "(AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE) and the bucket policy"
        )
    if fault is Fault.UNAVAILABLE:
        return SaveUnavailableError(
            f"can not write {uri}: {where} could not be reached or kept failing ({detail}); "
            f"check ${ENV_AWS_ENDPOINT_URL} and that the store is running"
        )
    return CheckpointSaveError(f"can not write {uri}: {where} answered {detail}")


@contextlib.contextmanager
def store_errors(uri: str, *, writing: bool, where: str | None = None) -> Iterator[None]:
    """Runs the block, raising a client's exceptions as `store_error` maps them."""
    try:
        yield
    except Exception as err:
        mapped = store_error(err, uri, writing=writing, where=where)
        if mapped is err:
            raise
        raise mapped from err
