"""Byte ranges over http(s): one GET with a ``Range`` header per request, through urllib.

Errors map as the download cache maps them (`ckptmap.cache`): 404/410 `RemoteNotFoundError`,
401/403 `RemoteAccessDenied`, 5xx/429/408 and failed connections retried, then
`RemoteUnavailableError`. Once the file's strong ETag is known, every request carries
``If-Match``, so a server that has replaced the file answers 412 (`RemoteChangedError`)
instead of bytes of the new version.
"""

from __future__ import annotations

import http.client
import urllib.error
import urllib.request
from pathlib import Path

from ckptmap.cache import _http_error, _Retry, cached_download, open_url
from ckptmap.errors import DownloadError, RemoteUnavailableError
from ckptmap.remote.reader import VALIDATORS, Answer, RangeReader, _NoRangeSupport, _Transient

__all__ = ["HttpRangeReader"]


class HttpRangeReader(RangeReader):
    """An http(s) URL read by byte range (see `ckptmap.remote.reader.RangeReader`)."""

    #: Socket timeout for connecting and for each read.
    timeout_s = 60.0

    def download(self) -> Path:
        """The whole file through the download cache (`ckptmap.cache.cached_download`)."""
        return cached_download(self.uri)

    def _request(self, first: int, last: int, *, probe: bool) -> Answer:
        headers = {
            "User-Agent": "ckptmap",
            "Accept-Encoding": "identity",
            "Range": f"bytes={first}-{last}",
        }
        etag = self._strong_etag()
        if etag is not None and not probe:
            headers["If-Match"] = etag
        try:
            # The cache's opener: credentials as basic auth, no unsafe redirect.
            response = open_url(self.uri, headers, self.timeout_s)
        except DownloadError:
            raise  # a refused redirect
        except urllib.error.HTTPError as err:
            err.close()
            if err.code == 412:
                raise self.changed("If-Match", f"the ETag is no longer {etag}") from None
            if err.code == 416:
                if probe:
                    raise _NoRangeSupport("it has no bytes to serve (HTTP 416)") from None
                raise self.changed("size", f"bytes {first}-{last} are no longer in it") from None
            mapped = _http_error(self.uri, err, self.attempts)
            if isinstance(mapped, _Retry):
                raise _Transient(mapped.error, mapped.retry_after) from None
            raise mapped from None
        except (urllib.error.URLError, http.client.HTTPException, OSError) as err:
            reason = getattr(err, "reason", err)
            raise _Transient(
                RemoteUnavailableError(
                    f"the connection to {self.uri} failed ({reason}) on all {self.attempts} "
                    "attempts; nothing was cached. Check the host name and your network or "
                    "proxy settings, or try again later",
                    url=self.uri,
                )
            ) from err
        found = response.headers
        length = found.get("Content-Length")
        return Answer(
            status=response.status,
            content_range=found.get("Content-Range"),
            content_length=int(length) if length is not None and length.isdigit() else None,
            validators={n: found[n] for n in VALIDATORS if found.get(n)},
            content_encoding=found.get("Content-Encoding"),
            body=response,
        )
