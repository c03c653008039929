"""The download cache: remote checkpoints become local files that are never half-written.

Layout: ``<cache home>/checkpoints/<url key>/<file name>``, where the cache home is
``$CKPTMAP_HOME``, else ``$XDG_CACHE_HOME/ckptmap``, else ``~/.cache/ckptmap``, and the url key
is a digest of the URL without its query, so two URLs that end in the same file name never
share an entry.

Every download streams into a process-unique temp file beside the target (`atomic_write`)
and is renamed over the target only after these checks pass:

- the byte count equals Content-Length; a Content-Length that is negative, not a number, or
  given twice with different values is refused (`InvalidResponseError`), and a chunked body
  cut off before its last chunk is an `IncompleteDownloadError`;
- the file's structure is whole (`ckptmap.completeness`): a zip ends with its central
  directory, a safetensors file is exactly as long as its header says. This catches bodies
  sent without a Content-Length whose connection closed early;
- the SHA-256 starts with any hash the caller gives and, only when asked (``check_hash=True``,
  or ``CKPTMAP_CHECK_HASH=1`` for every download), with the hash in the file name
  (``resnet50-0676ba61.pth``: 8 to 64 lowercase hex digits after the last dash). As in
  mmengine, names are not taken as hashes by default: ``model-20240115.pth`` is a date;
- the first bytes look like a checkpoint (torch zip, pickle or safetensors), so an HTML login
  or error page is never cached.

Beside each entry the cache writes a SHA-256 manifest (``<entry>.sha256``, see
`ckptmap.checksum`) recording the digest, size, modification time and inode. Before an entry
is reused it is re-verified: when the manifest provably still describes it the recorded digest
is used, otherwise the entry is checked for completeness and hashed again. An entry that was
truncated or altered on disk is reported in a warning and downloaded again; one that is a
FIFO, socket or device is refused (`NotARegularFileError`).

Redirects are followed only to http(s) URLs, and never from https to plain http
(`UnsafeRedirectError`). Credentials in the URL (``https://user:password@host/...``) are sent
as HTTP basic authentication to that host only, and every message, log line and progress bar
masks them, as it masks presigned-URL signatures (`ckptmap.redact`).

Several processes fetching one URL at once each write their own temp file and the renames
race harmlessly: the entry is complete whichever wins. Temp files left by killed downloads
are removed by later downloads into the same directory once they are old enough.

This module does not import torch.
"""

from __future__ import annotations

import base64
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
from urllib.parse import unquote, urljoin, urlsplit, urlunsplit

from ckptmap.atomic import atomic_write, remove_stale_temps
from ckptmap.checksum import file_sha256, read_manifest, write_manifest
from ckptmap.completeness import incomplete_reason
from ckptmap.errors import (
    ChecksumMismatchError,
    DownloadError,
    IncompleteDownloadError,
    InvalidResponseError,
    RemoteAccessDenied,
    RemoteNotFoundError,
    RemoteUnavailableError,
    UnexpectedContentError,
    UnsafePathError,
    UnsafeRedirectError,
)
from ckptmap.magic import checkpoint_kind, only_whitespace_so_far
from ckptmap.paths import open_regular, reject_special, safe_join
from ckptmap.redact import redact_url

__all__ = [
    "ENV_CHECK_HASH",
    "ENV_CKPTMAP_HOME",
    "cache_home",
    "cached_download",
    "check_hash_default",
    "checkpoints_dir",
    "expected_hash_from_name",
    "open_url",
    "url_basename",
    "url_cache_dir",
    "write_verified",
]

logger = logging.getLogger("ckptmap")

ENV_CKPTMAP_HOME = "CKPTMAP_HOME"
ENV_XDG_CACHE_HOME = "XDG_CACHE_HOME"
#: ``1`` takes the hash in every downloaded file's name as a SHA-256 prefix (``check_hash``).
ENV_CHECK_HASH = "CKPTMAP_CHECK_HASH"

CHUNK_SIZE = 1 << 20
#: Bytes looked at to decide whether a body is a checkpoint...
SNIFF_SIZE = 16
#: ...unless they are a safetensors header length followed by whitespace only (which may
#: precede its JSON): then up to this many.
MAX_SNIFF_SIZE = 1 << 20

# Like torch.hub's names (`resnet50-0676ba61.pth`), but fewer than 8 digits are not a hash:
# torch.hub treats `name-.pth` as an empty hash that every file matches.
_HASH_IN_NAME = re.compile(r"-([0-9a-f]{8,64})\.")
_HEX = re.compile(r"[0-9a-fA-F]{8,64}")
_DIGITS = re.compile(r"[0-9]+")

_RETRY_STATUSES = frozenset({408, 425, 429})


def cache_home() -> Path:
    """The root of ckptmap's cache (created on first use by the functions that write to it).

    ``$CKPTMAP_HOME``, else ``$XDG_CACHE_HOME/ckptmap``, else ``~/.cache/ckptmap``; empty
    variables count as unset. The same rule on every platform (on Windows ``~`` is
    ``%USERPROFILE%``), as torch.hub's ``~/.cache/torch`` and Hugging Face's caches use, so
    downloaded checkpoints sit beside theirs.
    """
    home = os.environ.get(ENV_CKPTMAP_HOME)
    if not home:
        xdg = os.environ.get(ENV_XDG_CACHE_HOME) or os.path.join("~", ".cache")
        home = os.path.join(xdg, "ckptmap")
    return Path(os.path.expanduser(home))


def checkpoints_dir() -> Path:
    """Where downloaded checkpoints live: ``<cache home>/checkpoints``."""
    return cache_home() / "checkpoints"


def check_hash_default() -> bool:
    """``CKPTMAP_CHECK_HASH``: whether downloads check the hash in their file name by default.

    Unset, ``0``, ``false`` or ``no``: no (mmengine's default); ``1``, ``true``, ``yes``: yes.
    """
    value = os.environ.get(ENV_CHECK_HASH, "").strip().lower()
    if value in ("", "0", "false", "no", "off"):
        return False
    if value in ("1", "true", "yes", "on"):
        return True
    raise ValueError(f"{ENV_CHECK_HASH}={os.environ[ENV_CHECK_HASH]!r}: use 1 or 0")


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


def _describe(head: bytes) -> str:
    if not head:
        return "an empty body"
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    if text[:1] == b"<":
        return f"an HTML/XML page (starts with {head[:16]!r})"
    if text[:1] in (b"{", b"["):
        return f"JSON (starts with {head[:16]!r})"
    if head.startswith(b"\x1f\x8b"):
        return "gzip data"
    return f"unrecognised bytes {head[:16]!r}"


def _normalise_hash(sha256: str | None) -> str | None:
    if sha256 is None:
        return None
    if not isinstance(sha256, str) or not _HEX.fullmatch(sha256):
        raise ValueError(
            f"sha256 must be 8 to 64 hex digits (a SHA-256 digest or a prefix of one), "
            f"got {sha256!r}"
        )
    return sha256.lower()


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
    manifest: bool = False,
) -> Path:
    """Streams `chunks` into `target` atomically, after checking length, hashes and content.

    Args:
        target: the final path; its directory must exist.
        chunks: the body, in pieces. Errors the iterator raises propagate unchanged.
        url: where the bytes come from, for messages (secrets are masked).
        expected_length: the announced size; a different byte count is an error.
        expected_sha256: hex digests or prefixes (lowercase) the SHA-256 must start with.
        sniff: reject bodies whose first bytes are not a checkpoint.
        progress: show a tqdm bar (None: only when stderr is a terminal).
        manifest: write ``<target>.sha256`` (`ckptmap.checksum`) once `target` is in place,
            so that later reuse can be verified without hashing the file again.

    Returns:
        `target`, now complete.

    Raises:
        IncompleteDownloadError: fewer or more bytes than `expected_length`, or a zip or
            safetensors body whose structure ends early (a body without a length that was
            cut off).
        ChecksumMismatchError: the SHA-256 does not match; names both digests.
        UnexpectedContentError: the body is not a checkpoint.
        OSError: writing failed (disk full, ...); the message names the target.
        In every case the temp file is removed and `target` is as it was.
    """
    target = Path(target)
    shown = redact_url(url)
    expected = [h for h in expected_sha256 if h]
    hasher = hashlib.sha256()
    received = 0
    head = b""
    sniffed = not sniff

    def check_head() -> None:
        if checkpoint_kind(head) is None:
            raise UnexpectedContentError(
                f"{shown} did not return a checkpoint but {_describe(head)}; nothing was "
                "cached. Check the URL (a login, error or redirect page?) or that the file is "
                "a torch or safetensors checkpoint",
                url=url,
                head=head[:16],
            )

    with (
        atomic_write(target) as out,
        _progress_bar(expected_length, target.name, progress) as bar,
    ):
        for chunk in chunks:
            if not chunk:
                continue
            if not sniffed:
                head += chunk[: MAX_SNIFF_SIZE - len(head)]
                if len(head) >= MAX_SNIFF_SIZE or (
                    len(head) >= SNIFF_SIZE and not only_whitespace_so_far(head)
                ):
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
                f"download of {shown} ended after {received} of {expected_length} bytes "
                "(the connection dropped or the server sent a short body); nothing was cached. "
                "Try again",
                url=url,
                received=received,
                expected=expected_length,
            )
        out.flush()
        with open_regular(out.name) as written:
            reason = incomplete_reason(written, str(target))
        if reason is not None:
            raise IncompleteDownloadError(
                f"download of {shown} is not a whole checkpoint after {received} bytes: "
                f"{reason} (the connection closed early?); nothing was cached. Try again",
                url=url,
                received=received,
                expected=expected_length,
            )
        actual = hasher.hexdigest()
        for want in expected:
            if not actual.startswith(want):
                raise ChecksumMismatchError(
                    f"SHA-256 mismatch for {shown}: expected a digest starting with {want}, got "
                    f"{actual}; nothing was cached. The file changed on the server or was "
                    "corrupted on the way: try again, or check the URL and the expected hash "
                    "(with check_hash=True a file name ending in -<8+ hex digits>.ext is taken "
                    "as a hash prefix; pass check_hash=False if it is not one)",
                    url=url,
                    expected=want,
                    actual=actual,
                )
    if manifest:
        _record(target, hasher.hexdigest())
    return target


def _record(target: Path, digest: str) -> None:
    """Writes the entry's manifest; a failure only costs a re-hash on the next reuse."""
    try:
        write_manifest(target, digest)
    except OSError as err:
        logger.info("Could not write the checksum manifest of %s (%s)", target, err)


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


class _SafeRedirects(urllib.request.HTTPRedirectHandler):
    """Follows redirects to http(s) only, never from https down to http, and never carries
    the caller's credentials to another host."""

    def http_error_302(
        self, req: urllib.request.Request, fp: Any, code: int, msg: str, headers: Any
    ) -> Any:
        location = headers.get("location") or headers.get("uri")
        if location:
            self._check(req, fp, code, urljoin(req.full_url, location))
        return super().http_error_302(req, fp, code, msg, headers)

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302

    @staticmethod
    def _check(req: urllib.request.Request, fp: Any, code: int, newurl: str) -> None:
        old = urlsplit(req.full_url)
        scheme = urlsplit(newurl).scheme.lower()
        problem = None
        if scheme not in ("http", "https"):
            problem = f"to a {scheme}: URL, which is not http(s)"
        elif old.scheme.lower() == "https" and scheme == "http":
            problem = "from https down to plain http, which anyone on the way could read or alter"
        if problem is None:
            return
        fp.close()
        shown = redact_url(newurl)
        raise UnsafeRedirectError(
            f"refusing the redirect of {redact_url(req.full_url)} (HTTP {code}) to {shown}: "
            f"{problem}; nothing was cached. Use the final https URL directly if you trust it",
            url=req.full_url,
            status=code,
            location=shown,
        )

    def redirect_request(
        self, req: urllib.request.Request, fp: Any, code: int, msg: str, headers: Any, newurl: str
    ) -> urllib.request.Request | None:
        self._check(req, fp, code, newurl)
        redirected = super().redirect_request(req, fp, code, msg, headers, newurl)
        if redirected is not None and (
            urlsplit(newurl).netloc.lower() != urlsplit(req.full_url).netloc.lower()
        ):
            redirected.remove_header("Authorization")
        return redirected


def _opener() -> urllib.request.OpenerDirector:
    return urllib.request.build_opener(_SafeRedirects())


def _split_credentials(url: str) -> tuple[str, str | None]:
    """`url` without ``user:password@``, and the basic-auth header value for them (or None)."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url, None
    userinfo, _, host = parts.netloc.rpartition("@")
    user, _, password = userinfo.partition(":")
    token = base64.b64encode(f"{unquote(user)}:{unquote(password)}".encode()).decode("ascii")
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment)), (
        f"Basic {token}"
    )


def open_url(url: str, headers: dict[str, str], timeout_s: float) -> Any:
    """Opens an http(s) URL as every download does: ``user:password@`` sent as basic
    authentication (to that host only), redirects followed only to http(s) and never from
    https down to http.

    Args:
        url: the URL (credentials in it are never sent in clear text in a message).
        headers: request headers (a ``User-Agent`` is added).
        timeout_s: socket timeout for connecting and for each read.

    Returns:
        The response, as `urllib.request.urlopen` returns it.

    Raises:
        UnsafeRedirectError: a refused redirect.
        urllib.error.HTTPError, urllib.error.URLError, OSError: as `urlopen` raises them.
    """
    address, authorization = _split_credentials(url)
    request = urllib.request.Request(address, headers={"User-Agent": "ckptmap", **headers})
    if authorization is not None:
        request.add_header("Authorization", authorization)
    return _opener().open(request, timeout=timeout_s)


def _content_length(url: str, headers: Any) -> int | None:
    """The announced body size, or None when there is none (or the body is chunked).

    Raises:
        InvalidResponseError: a value that is not a non-negative decimal, or several values
            that differ (RFC 9110: such a message can not be trusted).
    """
    if "chunked" in (headers.get("Transfer-Encoding") or "").lower():
        return None  # the chunked framing marks the end; a Content-Length must be ignored
    values = [v.strip() for raw in headers.get_all("Content-Length") or [] for v in raw.split(",")]
    if not values:
        return None
    if not all(_DIGITS.fullmatch(v) for v in values) or len({int(v) for v in values}) != 1:
        raise InvalidResponseError(
            f"{redact_url(url)} answered with an unusable Content-Length "
            f"{', '.join(repr(v) for v in values)} (negative, not a number, or several that "
            "differ), so a complete body can not be told from a cut one; nothing was cached. "
            "Check the server or proxy",
            url=url,
            content_length=values,
        )
    return int(values[0])


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
    shown = redact_url(url)
    try:
        response = open_url(url, {"Accept-Encoding": "identity"}, timeout_s)
    except DownloadError:
        raise  # a refused redirect
    except urllib.error.HTTPError as err:
        err.close()
        mapped = _http_error(url, err, attempts)
        raise mapped from None
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as err:
        reason = getattr(err, "reason", err)
        raise _Retry(
            RemoteUnavailableError(
                f"the connection to {shown} failed ({reason}) on all {attempts} attempts; "
                "nothing was cached. Check the host name and your network or proxy settings, "
                "or try again later",
                url=url,
            )
        ) from None
    with response:
        length = _content_length(url, response.headers)
        try:
            write_verified(
                target,
                _response_chunks(url, response, length),
                url=url,
                expected_length=length,
                expected_sha256=expected,
                sniff=sniff,
                progress=progress,
                manifest=True,
            )
        except IncompleteDownloadError as err:
            raise _Retry(err) from err


def _reusable(target: Path, url: str, wanted: list[str]) -> str | None:
    """Re-verifies a cache entry before it is reused: None when it is good, else why not.

    The manifest's digest is used when it provably still describes the file; otherwise the
    entry's structure is checked and it is hashed again (and the manifest refreshed).

    Raises:
        ChecksumMismatchError: an intact entry whose digest does not match a wanted hash.
    """
    manifest = read_manifest(target)
    st = target.stat()
    if manifest is not None and manifest.fresh_for(st):
        digest = manifest.sha256
    else:
        with open_regular(target, what="cache entry") as f:
            reason = incomplete_reason(f, str(target))
        if reason is not None:
            return f"is not a whole checkpoint ({reason})"

        digest = file_sha256(target)
        if manifest is not None and digest != manifest.sha256:
            return f"changed after it was downloaded (SHA-256 {digest}, recorded {manifest.sha256})"
        _record(target, digest)
    for want in wanted:
        if not digest.startswith(want):
            raise ChecksumMismatchError(
                f"the cached file {target} for {redact_url(url)} has SHA-256 {digest}, expected "
                f"a digest starting with {want}: delete the file to download it again",
                url=url,
                expected=want,
                actual=digest,
            )
    return None


def cached_download(
    url: str,
    *,
    model_dir: str | os.PathLike[str] | None = None,
    file_name: str | None = None,
    sha256: str | None = None,
    check_hash: bool | None = None,
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
        url: an ``http://`` or ``https://`` URL (``user:password@`` is sent as basic auth).
        model_dir: put the file directly in this directory (as torch.hub's `model_dir`)
            instead of the per-URL directory under `checkpoints_dir()`.
        file_name: the cached file's name; defaults to the URL's last path component.
        sha256: a SHA-256 hex digest, or a prefix of 8+ digits, the file must have. Also
            checked against an entry already in the cache.
        check_hash: take the hash in the file name (``name-<8+ hex digits>.ext``) as a
            SHA-256 prefix the file must have. None: ``CKPTMAP_CHECK_HASH`` (default no, as in
            mmengine: ``model-20240115.pth`` ends in a date, not a hash).
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
        UnsafePathError: the URL names no file (it ends in ``/``) or its file name would
            leave the cache directory; the message names the URL.
        NotARegularFileError: the cache entry is a FIFO, socket or device.
        RemoteNotFoundError: HTTP 404/410 (a FileNotFoundError).
        RemoteAccessDenied: HTTP 401/403 (a PermissionError).
        UnsafeRedirectError: a redirect to a non-http(s) URL or from https to http.
        RemoteUnavailableError: 5xx/429 or connection failures on every attempt.
        IncompleteDownloadError: the body was short on every attempt.
        InvalidResponseError: a malformed or contradictory Content-Length.
        ChecksumMismatchError: the content's SHA-256 does not match.
        UnexpectedContentError: the content is not a checkpoint.
        OSError: the cache could not be written (disk full, permissions); names the path.
    """
    shown = redact_url(url)
    scheme = urlsplit(url).scheme.lower()
    if scheme not in ("http", "https"):
        raise ValueError(f"cached_download needs an http:// or https:// URL, got {shown!r}")
    name = file_name if file_name is not None else url_basename(url)
    directory = Path(model_dir).expanduser() if model_dir is not None else url_cache_dir(url)
    try:
        target = safe_join(directory, name, what="file name", allow_subdirs=False)
    except UnsafePathError as err:
        what = "names no file (its path ends in '/')" if not name else f"ends in {name!r}"
        raise UnsafePathError(
            f"can not cache {shown}: the URL {what}, and {err.reason}. Pass the URL of the "
            "file itself, or file_name=... to name the cached copy",
            name=name,
            root=str(directory),
            reason=err.reason,
            url=url,
        ) from None
    wanted = _normalise_hash(sha256)
    if check_hash is None:
        check_hash = check_hash_default()
    expected = [h for h in (expected_hash_from_name(name) if check_hash else None, wanted) if h]

    reject_special(target, what="cache entry")
    if target.is_file():
        problem = _reusable(target, url, expected)
        if problem is None:
            return target
        logger.warning("The cached file %s %s; downloading it again", target, problem)

    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(target.parent, older_than_s=stale_temp_age_s)
    attempts = max(0, retries) + 1
    logger.info("Downloading %s to %s", shown, target)
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
                "Download of %s failed (%s); retrying in %.1f s", shown, transient.error, wait
            )
            time.sleep(wait)
    raise AssertionError("unreachable")  # pragma: no cover
