"""Reading one remote file by byte range, pinned to the version the first answer showed.

`RangeReader` holds what every transport shares: the first request (`probe`) learns the file's
size and validators (ETag, Last-Modified); every later answer must be a 206 for exactly the
range asked, of the same size and with the same validators, its body exactly as long as the
range, or the read is refused (`RemoteChangedError` when the file changed, `DownloadError` when
the server broke the protocol). Bodies are read straight into the destinations' memory.
_Transient failures (5xx, 429, dropped connections, short bodies) are retried a bounded number of
times with backoff; everything else is raised at once. `fetch_all` runs requests on a bounded
pool of threads and stops the others at the first failure.

The transports (`ckptmap.remote.web_ranges` for http(s), `ckptmap.remote.s3_ranges` for S3)
only send a request and describe its answer (`Answer`).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

from ckptmap.errors import DownloadError, IncompleteDownloadError, RemoteChangedError
from ckptmap.remote.spans import Part, RangeRequest

__all__ = ["Answer", "RangeReader", "fetch_all"]

logger = logging.getLogger("ckptmap")

#: Bytes read from the body per call: the granularity at which a failed sibling stops a read.
READ_CHUNK = 1 << 20
#: The validators a file keeps while it does not change.
VALIDATORS = ("ETag", "Last-Modified")

_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)", re.IGNORECASE)


class _NoRangeSupport(Exception):
    """The server answered the first ranged request with the whole file (or refused ranges):
    the caller falls back to a full download. `reason` says what it did."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _Transient(Exception):
    """A failure worth retrying; `error` is raised once no attempt is left."""

    def __init__(self, error: DownloadError, retry_after: float | None = None) -> None:
        super().__init__(str(error))
        self.error = error
        self.retry_after = retry_after


class _Cancelled(Exception):
    """Another request of the same fetch failed: this one stops."""


@dataclass
class Answer:
    """A transport's answer to one ranged request, its body not yet read.

    Attributes:
        status: the HTTP status.
        content_range: the Content-Range header, if any.
        content_length: the body's announced length, if any.
        validators: the ETag / Last-Modified values it carried (names as in `VALIDATORS`).
        content_encoding: the Content-Encoding, if any.
        body: an object with ``readinto(memoryview) -> int`` (0 at the end) and ``close()``.
    """

    status: int
    content_range: str | None
    content_length: int | None
    validators: dict[str, str] = field(default_factory=dict)
    content_encoding: str | None = None
    body: Any = None

    def close(self) -> None:
        if self.body is not None:
            self.body.close()


class RangeReader(ABC):
    """One remote file, read by byte range (see the module docstring).

    Attributes:
        uri: the file's URL or URI, as messages show it.
        size: the file's size, known after `probe`.
        validators: the ETag / Last-Modified of the first answer.
    """

    #: Attempts per request for transient failures (the first included).
    attempts = 4
    #: The first wait between attempts, doubled each time up to `max_backoff_s`.
    backoff_s = 0.5
    max_backoff_s = 30.0

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.size: int | None = None
        self.validators: dict[str, str] = {}

    # --- what a transport provides ---

    @abstractmethod
    def _request(self, first: int, last: int, *, probe: bool) -> Answer:
        """Asks for bytes ``first..last`` (inclusive) and returns the answer, body unread.

        Raises:
            _NoRangeSupport: (probe only) the server refuses ranges in a way that is not an error.
            _Transient: a failure worth retrying.
            DownloadError (or a subclass): any other failure, mapped to ckptmap's errors.
        """

    def _strong_etag(self) -> str | None:
        """The pinned ETag when it is a strong one (If-Match compares strongly)."""
        etag = self.validators.get("ETag")
        return etag if etag and not etag.startswith("W/") else None

    # --- the protocol ---

    def probe(self, length: int) -> bytes:
        """Reads the first `length` bytes (fewer when the file is smaller), learning its size
        and validators.

        Raises:
            _NoRangeSupport: the server does not serve byte ranges (or the file is empty).
            DownloadError and subclasses: see `_request`.
        """
        buffer = bytearray(length)
        got = self._with_retries(lambda: self._probe_once(buffer))
        return bytes(buffer[:got])

    def _probe_once(self, buffer: bytearray) -> int:
        answer = self._request(0, len(buffer) - 1, probe=True)
        try:
            if answer.status == 200:
                # Not read: the body is the whole file.
                raise _NoRangeSupport("it answered a ranged request with the whole file (HTTP 200)")
            _, last, total = self._check_range(answer, 0, len(buffer) - 1, probe=True)
            self.size = total
            self.validators = dict(answer.validators)
            view = memoryview(buffer)[: last + 1]
            self._read_body(answer, (Part(0, last + 1, view),), None)
            return last + 1
        finally:
            answer.close()

    def read_small(self, limit: int) -> bytes:
        """The whole file when it has at most `limit` bytes (a shard index), else its first
        ``limit + 1`` bytes: one request, which a server without range support may answer
        with the whole file (only ``limit + 1`` bytes of it are read)."""
        try:
            return self._with_retries(lambda: self._read_small_once(limit))
        except _NoRangeSupport:  # nothing to serve: an empty file
            self.size = 0
            return b""

    def _read_small_once(self, limit: int) -> bytes:
        answer = self._request(0, limit, probe=True)
        try:
            self.validators = dict(answer.validators)
            if answer.status == 200:
                if answer.content_encoding not in (None, "", "identity"):
                    raise DownloadError(
                        f"{self.uri} was sent with Content-Encoding "
                        f"{answer.content_encoding!r}; serve it without compression",
                        url=self.uri,
                        status=200,
                    )
                data = self._read_up_to(answer, limit + 1)
                if len(data) <= limit and answer.content_length not in (None, len(data)):
                    raise _Transient(
                        IncompleteDownloadError(
                            f"{self.uri} sent {len(data)} of {answer.content_length} bytes; "
                            "try again",
                            url=self.uri,
                            received=len(data),
                            expected=answer.content_length,
                        )
                    )
                self.size = len(data) if len(data) <= limit else answer.content_length
                return data
            _, last, total = self._check_range(answer, 0, limit, probe=True)
            self.size = total
            buffer = bytearray(last + 1)
            self._read_body(answer, (Part(0, last + 1, memoryview(buffer)),), None)
            return bytes(buffer)
        finally:
            answer.close()

    def _read_up_to(self, answer: Answer, limit: int) -> bytes:
        buffer = bytearray(min(limit, answer.content_length or READ_CHUNK))
        got = 0
        while got < limit:
            if got == len(buffer):
                buffer.extend(bytes(min(len(buffer), limit - got)))
            n = self._readinto(answer, memoryview(buffer)[got:], got)
            if n == 0:
                break
            got += n
        return bytes(buffer[:got])

    def download(self) -> Any:
        """Downloads the whole file through the scheme's cache; returns the local path."""
        raise NotImplementedError

    def read(self, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` of the file (after `probe`)."""
        buffer = bytearray(end - start)
        if buffer:
            view = memoryview(buffer)
            self.fetch(RangeRequest(start, end, (Part(start, end - start, view),)))
        return bytes(buffer)

    def fetch(self, request: RangeRequest, cancel: threading.Event | None = None) -> None:
        """Fills the destinations of `request` (after `probe`), retrying transient failures."""
        self._with_retries(lambda: self._fetch_once(request, cancel), cancel)

    def _fetch_once(self, request: RangeRequest, cancel: threading.Event | None) -> None:
        if cancel is not None and cancel.is_set():
            raise _Cancelled
        last = request.end - 1
        answer = self._request(request.start, last, probe=False)
        try:
            if answer.status == 200:
                raise DownloadError(
                    f"{self.uri} answered a ranged request with the whole file (HTTP 200) after "
                    "serving ranges before; nothing was read from it. Try again, or check the "
                    "server or proxy in between",
                    url=self.uri,
                    status=200,
                )
            self._check_range(answer, request.start, last, probe=False)
            self._read_body(answer, request.parts, cancel)
        finally:
            answer.close()

    def _with_retries(self, attempt: Any, cancel: threading.Event | None = None) -> Any:
        attempts = max(1, self.attempts)
        for n in range(attempts):
            try:
                return attempt()
            except _Transient as transient:
                if n + 1 >= attempts or (cancel is not None and cancel.is_set()):
                    raise transient.error from transient.__cause__
                wait_s = min(self.max_backoff_s, self.backoff_s * (2**n))
                if transient.retry_after is not None:
                    wait_s = min(self.max_backoff_s, max(wait_s, transient.retry_after))
                logger.warning(
                    "Reading %s failed (%s); retrying in %.1f s", self.uri, transient.error, wait_s
                )
                time.sleep(wait_s)
        raise AssertionError("unreachable")  # pragma: no cover

    # --- checks ---

    def _check_range(
        self, answer: Answer, first: int, last: int, *, probe: bool
    ) -> tuple[int, int, int]:
        """Checks a 206 answer against the request and the pinned file; returns its range."""
        uri = self.uri
        if answer.status != 206:
            raise DownloadError(
                f"{uri} answered a ranged request with HTTP {answer.status}, not 206 Partial "
                "Content; nothing was read from it",
                url=uri,
                status=answer.status,
            )
        if answer.content_encoding not in (None, "", "identity"):
            raise DownloadError(
                f"{uri} sent a byte range with Content-Encoding {answer.content_encoding!r}: "
                "ranges of an encoded body are not ranges of the file. Serve it without "
                "compression",
                url=uri,
                status=answer.status,
            )
        match = _CONTENT_RANGE.fullmatch((answer.content_range or "").strip())
        if match is None or match.group(3) == "*":
            raise DownloadError(
                f"{uri} answered a ranged request without a usable Content-Range "
                f"({answer.content_range!r}); nothing was read from it",
                url=uri,
                status=answer.status,
            )
        got_first, got_last, total = int(match.group(1)), int(match.group(2)), int(match.group(3))
        if not probe:
            self._check_same_file(answer, total)
        # A probe may get less than it asked for: the file is smaller than the request.
        expected_last = min(last, total - 1) if probe else last
        if (got_first, got_last) != (first, expected_last) or got_last >= total:
            raise DownloadError(
                f"{uri} answered bytes {got_first}-{got_last}/{total} to a request for bytes "
                f"{first}-{last}; nothing was read from it. The server does not honour byte "
                "ranges correctly",
                url=uri,
                status=answer.status,
            )
        length = got_last - got_first + 1
        if answer.content_length is not None and answer.content_length != length:
            raise DownloadError(
                f"{uri} announced {answer.content_length} bytes for the {length}-byte range "
                f"{got_first}-{got_last}; nothing was read from it",
                url=uri,
                status=answer.status,
            )
        return got_first, got_last, total

    def _check_same_file(self, answer: Answer, total: int) -> None:
        if total != self.size:
            raise self.changed("size", f"{self.size} bytes, now {total}")
        for name in VALIDATORS:
            before = self.validators.get(name)
            if before is not None and answer.validators.get(name) != before:
                raise self.changed(name, f"{before}, now {answer.validators.get(name)}")

    def changed(self, what: str, detail: str) -> RemoteChangedError:
        """The error for a file that changed between two requests."""
        return RemoteChangedError(
            f"{self.uri} changed while it was being read by byte range ({what}: {detail}); "
            "nothing read from it was used. Load it again once it is no longer being replaced",
            url=self.uri,
            what=what,
        )

    def _read_body(
        self, answer: Answer, parts: Sequence[Part], cancel: threading.Event | None
    ) -> None:
        """Reads the body into the parts' destinations (dropped parts into scratch memory)."""
        gaps = [p.length for p in parts if p.dest is None]
        scratch = memoryview(bytearray(min(READ_CHUNK, max(gaps)))) if gaps else None
        received = 0
        for part in parts:
            done = 0
            while done < part.length:
                if cancel is not None and cancel.is_set():
                    raise _Cancelled
                want = min(READ_CHUNK, part.length - done)
                if part.dest is not None:
                    target = part.dest[done : done + want]
                else:
                    assert scratch is not None
                    target = scratch[:want]
                n = self._readinto(answer, target, received)
                if n == 0:
                    total = sum(p.length for p in parts)
                    raise _Transient(
                        IncompleteDownloadError(
                            f"{self.uri} sent {received} of the {total} bytes of a range "
                            "(the connection dropped or the server sent a short body); nothing "
                            "read from it was used. Try again",
                            url=self.uri,
                            received=received,
                            expected=total,
                        )
                    )
                done += n
                received += n

    def _readinto(self, answer: Answer, target: memoryview, received: int) -> int:
        """One read from the body; transport errors become `_Transient` short reads."""
        try:
            return int(answer.body.readinto(target))
        except (_Transient, DownloadError):
            raise
        except Exception as err:  # a dropped connection, a reset, a timeout
            raise _Transient(
                IncompleteDownloadError(
                    f"reading {self.uri} broke off after {received} bytes of a range "
                    f"({type(err).__name__}: {err}); nothing read from it was used. Try again",
                    url=self.uri,
                    received=received,
                )
            ) from err


def fetch_all(work: Sequence[tuple[RangeReader, RangeRequest]], *, workers: int) -> None:
    """Runs every request, on at most `workers` threads; the first failure stops the rest
    and is raised (the destinations are then partly filled and must not be used)."""
    if not work:
        return
    if workers <= 1 or len(work) == 1:
        for reader, request in work:
            reader.fetch(request)
        return
    cancel = threading.Event()
    with ThreadPoolExecutor(
        max_workers=min(workers, len(work)), thread_name_prefix="ckptmap-range"
    ) as pool:
        futures = [pool.submit(reader.fetch, request, cancel) for reader, request in work]
        _, pending = wait(futures, return_when=FIRST_EXCEPTION)
        failed = next((f for f in futures if f.done() and f.exception() is not None), None)
        if failed is None:
            return
        cancel.set()
        for future in pending:
            future.cancel()
        wait(futures)
        error = failed.exception()
        assert error is not None
        raise error
