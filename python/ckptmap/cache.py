"""The download cache: remote checkpoints become local files that are never half-written.

Layout: ``<cache home>/checkpoints/<url key>/<file name>``, where the cache home is
``$CKPTMAP_HOME``, else ``$XDG_CACHE_HOME/ckptmap``, else ``~/.cache/ckptmap``, and the url key
is a digest of the URL without its query, so two URLs that end in the same file name never
share an entry.

Every download streams into a process-unique temp file beside the target (`atomic_write`)
and is renamed over the target only after these checks pass:

- the byte count equals Content-Length (a dropped connection is not a complete file);
- the SHA-256 starts with the hash in the file name (``resnet50-0676ba61.pth``: 8 to 64 lowercase
  hex digits after the last dash; fewer digits are not taken as a hash) and with any hash the
  caller gives;
- the first bytes look like a checkpoint (torch zip, pickle or safetensors), so an HTML login
  or error page is never cached.

Several processes fetching one URL at once each write their own temp file and the renames
race harmlessly: the entry is complete whichever wins. Temp files left by killed downloads
are removed by later downloads into the same directory once they are old enough.

This module does not import torch.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import logging
import os
import posixpath
import re
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ckptmap._core import MAX_SAFETENSORS_HEADER_LEN
from ckptmap.atomic import atomic_write, remove_stale_temps
from ckptmap.errors import (
    ChecksumMismatchError,
    DownloadError,
    IncompleteDownloadError,
    RemoteAccessDenied,
    RemoteNotFoundError,
    RemoteUnavailableError,
    UnexpectedContentError,
)
from ckptmap.paths import safe_join

__all__ = [
    "ENV_CKPTMAP_HOME",
    "cache_home",
    "cached_download",
    "checkpoints_dir",
    "expected_hash_from_name",
    "sniff_checkpoint",
    "url_basename",
    "url_cache_dir",
    "write_verified",
]

logger = logging.getLogger("ckptmap")

ENV_CKPTMAP_HOME = "CKPTMAP_HOME"
ENV_XDG_CACHE_HOME = "XDG_CACHE_HOME"

CHUNK_SIZE = 1 << 20
#: Bytes looked at to decide whether a body is a checkpoint.
SNIFF_SIZE = 16
#: safetensors' own cap on the JSON header; a larger length prefix is not a safetensors file.

# Like torch.hub's names (`resnet50-0676ba61.pth`), but fewer than 8 digits are not a hash:
# torch.hub treats `name-.pth` as an empty hash that every file matches.
_HASH_IN_NAME = re.compile(r"-([0-9a-f]{8,64})\.")
_HEX = re.compile(r"[0-9a-fA-F]{8,64}")

_RETRY_STATUSES = frozenset({408, 425, 429})


def cache_home() -> Path:
    """The root of ckptmap's cache (created on first use by the functions that write to it).

    ``$CKPTMAP_HOME``, else ``$XDG_CACHE_HOME/ckptmap``, else ``~/.cache/ckptmap``; empty
    variables count as unset.
    """
    home = os.environ.get(ENV_CKPTMAP_HOME)
    if not home:
        xdg = os.environ.get(ENV_XDG_CACHE_HOME) or os.path.join("~", ".cache")
        home = os.path.join(xdg, "ckptmap")
    return Path(os.path.expanduser(home))


def checkpoints_dir() -> Path:
    """Where downloaded checkpoints live: ``<cache home>/checkpoints``."""
    return cache_home() / "checkpoints"


def url_basename(url: str) -> str:
    """The last component of the URL's path (not URL-decoded, as torch.hub names files)."""
    return posixpath.basename(urlsplit(url).path)


def url_cache_dir(url: str, root: str | os.PathLike[str] | None = None) -> Path:
    """The directory that holds the cache entry of `url`: a digest of the URL minus its query."""
    parts = urlsplit(url)
    identity = f"{parts.scheme.lower()}://{parts.netloc.lower()}{parts.path}"
    key = hashlib.sha256(identity.encode("utf-8")).hexdigest()[:16]
    return Path(root) / key if root is not None else checkpoints_dir() / key


def expected_hash_from_name(file_name: str) -> str | None:
    """The SHA-256 prefix in a torch.hub-style file name, or None when it has none."""
    match = _HASH_IN_NAME.search(file_name)
    return match.group(1) if match else None


def sniff_checkpoint(head: bytes) -> str | None:
    """What kind of checkpoint the first bytes belong to: "zip", "pickle", "safetensors" or None.

    torch.save writes a zip archive (or, with the legacy format, a pickle with protocol 2 or
    later); safetensors files start with a little-endian u64 header length and a JSON object.
    """
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "pickle"
    if len(head) >= 9 and head[8:9] == b"{":
        header_len = int.from_bytes(head[:8], "little")
        if 2 <= header_len <= MAX_SAFETENSORS_HEADER_LEN:
            return "safetensors"
    return None


def _describe(head: bytes) -> str:
    if not head:
        return "an empty body"
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    if text[:1] == b"<":
        return f"an HTML/XML page (starts with {head[:SNIFF_SIZE]!r})"
    if text[:1] in (b"{", b"["):
        return f"JSON (starts with {head[:SNIFF_SIZE]!r})"
    if head.startswith(b"\x1f\x8b"):
        return "gzip data"
    return f"unrecognised bytes {head[:SNIFF_SIZE]!r}"


def _normalise_hash(sha256: str | None) -> str | None:
    if sha256 is None:
        return None
    if not isinstance(sha256, str) or not _HEX.fullmatch(sha256):
        raise ValueError(
            f"sha256 must be 8 to 64 hex digits (a SHA-256 digest or a prefix of one), "
            f"got {sha256!r}"
        )
    return sha256.lower()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(CHUNK_SIZE), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def _progress_bar(total: int | None, desc: str, enabled: bool | None) -> Iterator[Any]:
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        yield None
        return
    from tqdm import tqdm  # type: ignore[import-untyped]

    with tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024) as bar:
        yield bar


def write_verified(
    target: str | os.PathLike[str],
    chunks: Iterable[bytes],
    *,
    url: str,
    expected_length: int | None = None,
    expected_sha256: Iterable[str] = (),
    sniff: bool = True,
    progress: bool | None = None,
) -> Path:
    """Streams `chunks` into `target` atomically, after checking length, hashes and content.

    Args:
        target: the final path; its directory must exist.
        chunks: the body, in pieces. Errors the iterator raises propagate unchanged.
        url: where the bytes come from, for messages.
        expected_length: the announced size; a different byte count is an error.
        expected_sha256: hex digests or prefixes (lowercase) the SHA-256 must start with.
        sniff: reject bodies whose first bytes are not a checkpoint.
        progress: show a tqdm bar (None: only when stderr is a terminal).

    Returns:
        `target`, now complete.

    Raises:
        IncompleteDownloadError: fewer or more bytes than `expected_length`.
        ChecksumMismatchError: the SHA-256 does not match; names both digests.
        UnexpectedContentError: the body is not a checkpoint.
        OSError: writing failed (disk full, ...); the message names the target.
        In every case the temp file is removed and `target` is as it was.
    """
    target = Path(target)
    expected = [h for h in expected_sha256 if h]
    hasher = hashlib.sha256()
    received = 0
    head = b""
    sniffed = not sniff

    def check_head() -> None:
        if sniff_checkpoint(head) is None:
            raise UnexpectedContentError(
                f"{url} did not return a checkpoint but {_describe(head)}; nothing was cached. "
                "Check the URL (a login, error or redirect page?) or that the file is a torch or "
                "safetensors checkpoint",
                url=url,
                head=head,
            )

    with (
        atomic_write(target) as out,
        _progress_bar(expected_length, target.name, progress) as bar,
    ):
        for chunk in chunks:
            if not chunk:
                continue
            if not sniffed:
                head += chunk[: SNIFF_SIZE - len(head)]
                if len(head) >= SNIFF_SIZE:
                    check_head()
                    sniffed = True
            hasher.update(chunk)
            out.write(chunk)
            received += len(chunk)
            if bar is not None:
                bar.update(len(chunk))
        if not sniffed:
            check_head()
        if expected_length is not None and received != expected_length:
            raise IncompleteDownloadError(
                f"download of {url} ended after {received} of {expected_length} bytes "
                "(the connection dropped or the server sent a short body); nothing was cached. "
                "Try again",
                url=url,
                received=received,
                expected=expected_length,
            )
        actual = hasher.hexdigest()
        for want in expected:
            if not actual.startswith(want):
                raise ChecksumMismatchError(
                    f"SHA-256 mismatch for {url}: expected a digest starting with {want}, got "
                    f"{actual}; nothing was cached. The file changed on the server or was "
                    "corrupted on the way: try again, or check the URL and the expected hash "
                    "(a file name ending in -<8+ hex digits>.ext is taken as a hash prefix; "
                    "pass check_hash=False if it is not one)",
                    url=url,
                    expected=want,
                    actual=actual,
                )
    return target


class _Retry(Exception):
    """A transient failure: `error` is raised if no attempt is left."""

    def __init__(self, error: DownloadError, retry_after: float | None = None) -> None:
        super().__init__(str(error))
        self.error = error
        self.retry_after = retry_after


def _retry_after(headers: Any) -> float | None:
    value = headers.get("Retry-After") if headers is not None else None
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def _http_error(url: str, err: urllib.error.HTTPError, attempts: int) -> BaseException:
    status = err.code
    if status in (404, 410):
        return RemoteNotFoundError(
            f"{url} was not found on the server (HTTP {status}); nothing was cached. Check the "
            "URL or model name",
            url=url,
            status=status,
        )
    if status in (401, 403):
        return RemoteAccessDenied(
            f"access to {url} was denied (HTTP {status}); nothing was cached. Check that the "
            "link has not expired and that you have access to it",
            url=url,
            status=status,
        )
    if status >= 500 or status in _RETRY_STATUSES:
        error = RemoteUnavailableError(
            f"{url} failed with HTTP {status} {err.reason} on all {attempts} attempts; nothing "
            "was cached. The server is overloaded or down: try again later",
            url=url,
            status=status,
        )
        return _Retry(error, _retry_after(err.headers))
    return DownloadError(
        f"{url} failed with HTTP {status} {err.reason}; nothing was cached. Check the URL",
        url=url,
        status=status,
    )


def _response_chunks(url: str, response: Any, length: int | None) -> Iterator[bytes]:
    received = 0
    while True:
        try:
            chunk = response.read1(CHUNK_SIZE)
        except (http.client.HTTPException, OSError) as err:
            raise _Retry(
                IncompleteDownloadError(
                    f"download of {url} broke off after {received} bytes "
                    f"({type(err).__name__}: {err}); nothing was cached. Try again",
                    url=url,
                    received=received,
                    expected=length,
                )
            ) from err
        if not chunk:
            return
        received += len(chunk)
        yield chunk


def _fetch_once(
    url: str,
    target: Path,
    *,
    expected: list[str],
    timeout_s: float,
    sniff: bool,
    progress: bool | None,
    attempts: int,
) -> None:
    request = urllib.request.Request(
        url, headers={"User-Agent": "ckptmap", "Accept-Encoding": "identity"}
    )
    try:
        response = urllib.request.urlopen(request, timeout=timeout_s)
    except urllib.error.HTTPError as err:
        err.close()
        mapped = _http_error(url, err, attempts)
        raise mapped from None
    except (urllib.error.URLError, http.client.HTTPException, OSError) as err:
        reason = getattr(err, "reason", err)
        raise _Retry(
            RemoteUnavailableError(
                f"the connection to {url} failed ({reason}) on all {attempts} attempts; "
                "nothing was cached. Check the host name and your network or proxy settings, "
                "or try again later",
                url=url,
            )
        ) from err
    with response:
        length_header = response.headers.get("Content-Length")
        try:
            length = int(length_header) if length_header is not None else None
        except ValueError:
            length = None
        try:
            write_verified(
                target,
                _response_chunks(url, response, length),
                url=url,
                expected_length=length,
                expected_sha256=expected,
                sniff=sniff,
                progress=progress,
            )
        except IncompleteDownloadError as err:
            raise _Retry(err) from err


def cached_download(
    url: str,
    *,
    model_dir: str | os.PathLike[str] | None = None,
    file_name: str | None = None,
    sha256: str | None = None,
    check_hash: bool = True,
    progress: bool | None = None,
    retries: int = 3,
    backoff_s: float = 0.5,
    max_backoff_s: float = 30.0,
    timeout_s: float = 60.0,
    sniff: bool = True,
    stale_temp_age_s: float = 3600.0,
) -> Path:
    """Returns the cached file for an http(s) URL, downloading it first if needed.

    Args:
        url: an ``http://`` or ``https://`` URL.
        model_dir: put the file directly in this directory (as torch.hub's `model_dir`)
            instead of the per-URL directory under `checkpoints_dir()`.
        file_name: the cached file's name; defaults to the URL's last path component.
        sha256: a SHA-256 hex digest, or a prefix of 8+ digits, the file must have. Also
            checked against an entry already in the cache.
        check_hash: check the hash in the file name (``name-<8+ hex digits>.ext``).
        progress: show a progress bar (None: only when stderr is a terminal).
        retries: how many times 5xx/429 answers, refused connections and dropped
            bodies are retried.
        backoff_s: the first wait between attempts; doubled each time, capped by
            `max_backoff_s` (a server's Retry-After is honoured up to that cap).
        timeout_s: socket timeout for connecting and for each read.
        sniff: refuse bodies that do not start like a checkpoint.
        stale_temp_age_s: temp files of other downloads older than this are removed.

    Returns:
        The path of the complete, verified file.

    Raises:
        ValueError: not an http(s) URL, or a malformed `sha256`.
        UnsafePathError: the file name would leave the cache directory.
        RemoteNotFoundError: HTTP 404/410 (a FileNotFoundError).
        RemoteAccessDenied: HTTP 401/403 (a PermissionError).
        RemoteUnavailableError: 5xx/429 or connection failures on every attempt.
        IncompleteDownloadError: the body was short on every attempt.
        ChecksumMismatchError: the content's SHA-256 does not match.
        UnexpectedContentError: the content is not a checkpoint.
        OSError: the cache could not be written (disk full, permissions); names the path.
    """
    scheme = urlsplit(url).scheme.lower()
    if scheme not in ("http", "https"):
        raise ValueError(f"cached_download needs an http:// or https:// URL, got {url!r}")
    name = file_name if file_name is not None else url_basename(url)
    directory = Path(model_dir).expanduser() if model_dir is not None else url_cache_dir(url)
    target = safe_join(directory, name, what="file name", allow_subdirs=False)
    wanted = _normalise_hash(sha256)
    expected = [h for h in (expected_hash_from_name(name) if check_hash else None, wanted) if h]

    if target.is_file():
        if wanted is not None:
            actual = _file_sha256(target)
            if not actual.startswith(wanted):
                raise ChecksumMismatchError(
                    f"the cached file {target} for {url} has SHA-256 {actual}, expected a digest "
                    f"starting with {wanted}: delete the file to download it again",
                    url=url,
                    expected=wanted,
                    actual=actual,
                )
        return target

    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(target.parent, older_than_s=stale_temp_age_s)
    attempts = max(0, retries) + 1
    logger.info("Downloading %s to %s", url, target)
    for attempt in range(attempts):
        try:
            _fetch_once(
                url,
                target,
                expected=expected,
                timeout_s=timeout_s,
                sniff=sniff,
                progress=progress,
                attempts=attempts,
            )
            return target
        except _Retry as transient:
            if attempt + 1 >= attempts:
                raise transient.error from transient.__cause__
            wait = min(max_backoff_s, backoff_s * (2**attempt))
            if transient.retry_after is not None:
                wait = min(max_backoff_s, max(wait, transient.retry_after))
            logger.warning(
                "Download of %s failed (%s); retrying in %.1f s", url, transient.error, wait
            )
            time.sleep(wait)
    raise AssertionError("unreachable")  # pragma: no cover
