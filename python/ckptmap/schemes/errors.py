"""Errors of the scheme registry, the download cache and the remote stores.

Each class is a `CkptmapError` and also the builtin that older code catches in the same
situation: a 404 or a missing S3 key is a `FileNotFoundError`, a 403 a `PermissionError`, an
unknown zoo name a `KeyError`, a missing optional client an `ImportError`. They keep their
attributes when pickled, so an error raised on rank 0 can be re-raised on the other ranks.

These classes are meant to move into `ckptmap.errors` once the shared hierarchy settles.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ckptmap.errors import CkptmapError

__all__ = [
    "ChecksumMismatchError",
    "DownloadError",
    "IncompleteDownloadError",
    "MissingDependencyError",
    "RemoteAccessDenied",
    "RemoteNotFoundError",
    "RemoteUnavailableError",
    "UnexpectedContentError",
    "UnknownModelNameError",
    "UnknownSchemeError",
    "UnsafePathError",
    "ZooTableError",
]


class _Detailed(CkptmapError):
    """A message plus keyword attributes; `str()` is the message, pickling keeps both."""

    def __init__(self, message: str, **attrs: Any) -> None:
        super().__init__(message)
        for key, value in attrs.items():
            setattr(self, key, value)

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (str(self),), dict(self.__dict__))


class DownloadError(_Detailed, OSError):
    """A remote checkpoint could not be fetched; nothing was added to the cache.

    Attributes:
        url: the URL or URI that was asked for (also in `filename`, as for other OSErrors).
        status: the HTTP status when the server sent one, else None.
    """

    def __init__(self, message: str, *, url: str = "", status: int | None = None, **attrs: Any):
        super().__init__(message, url=url, status=status, **attrs)
        # Set so that `atomic_write` keeps this error as it is instead of re-wrapping it.
        self.filename = url or None

    def __setstate__(self, state: dict[str, Any] | None) -> None:
        self.__dict__.update(state or {})
        self.filename = (state or {}).get("url") or None


class RemoteNotFoundError(DownloadError, FileNotFoundError):
    """The server has no such file (HTTP 404/410, S3 NoSuchKey or NoSuchBucket)."""


class RemoteAccessDenied(DownloadError, PermissionError):
    """The server refused access (HTTP 401/403, S3 AccessDenied, missing credentials)."""


class RemoteUnavailableError(DownloadError, ConnectionError):
    """The server kept failing (5xx, 429, refused or timed-out connections) or can't be reached."""


class IncompleteDownloadError(DownloadError):
    """The body ended before the length the server announced (or the connection dropped).

    Attributes:
        received: bytes received.
        expected: bytes announced (Content-Length), or None when unknown.
    """


class ChecksumMismatchError(DownloadError, RuntimeError):
    """The SHA-256 of the downloaded bytes does not match the expected one.

    Attributes:
        expected: the expected hex digest (or prefix of one).
        actual: the full hex digest of what arrived.
    """


class UnexpectedContentError(DownloadError, ValueError):
    """The body is not a checkpoint (an HTML page, a JSON error, ...).

    Attributes:
        head: the first bytes that arrived.
    """


class UnsafePathError(_Detailed, ValueError):
    """An untrusted name would leave the directory it is joined onto.

    Attributes:
        name: the rejected name.
        root: the directory it was to be joined onto.
    """


class UnknownSchemeError(_Detailed, ValueError):
    """No registered loader handles the URI's scheme.

    Attributes:
        filename: the URI.
        schemes: the registered prefixes.
    """


class UnknownModelNameError(_Detailed, KeyError):
    """A model-zoo name is not in any of the name tables.

    Attributes:
        name: the name that was asked for.
        suggestions: close matches, best first.
        sources: the tables that were consulted.
    """

    def __init__(
        self,
        message: str,
        *,
        name: str = "",
        suggestions: Sequence[str] = (),
        sources: Sequence[str] = (),
    ) -> None:
        super().__init__(message, name=name, suggestions=list(suggestions), sources=list(sources))


class ZooTableError(_Detailed, ValueError):
    """A model-zoo JSON table is not an object mapping names to strings.

    Attributes:
        path: the file.
    """


class MissingDependencyError(_Detailed, ImportError):
    """An optional package needed for this URI (torchvision, boto3, petrel, pavi) is missing."""
