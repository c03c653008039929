"""Byte ranges over S3: one ``get_object(Range=...)`` per request, through boto3.

The client and the error map are the object-store layer's (`ckptmap.objectstore`), as for
``s3://`` downloads and saves: the same endpoint (``$AWS_ENDPOINT_URL_S3`` /
``$AWS_ENDPOINT_URL``), retries and timeouts, and the same typed errors (NoSuchKey
`RemoteNotFoundError`, AccessDenied `RemoteAccessDenied`, ...).
botocore retries failed requests itself; `RangeReader` re-asks only for bodies that break off.
Once the object's ETag is known every request carries ``IfMatch``, so a replaced object answers
412 (`RemoteChangedError`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ckptmap.objectstore import parse_s3_uri, s3_client, store_error
from ckptmap.remote.reader import Answer, RangeReader, _NoRangeSupport
from ckptmap.schemes.s3 import s3_download

__all__ = ["S3RangeReader"]

# botocore's lower-case response headers, by our validator names.
_HEADERS = {"ETag": "etag", "Last-Modified": "last-modified"}


class _Body:
    """`readinto` over botocore's StreamingBody (which only has `read`)."""

    def __init__(self, body: Any) -> None:
        self._body = body

    def readinto(self, target: memoryview) -> int:
        chunk = self._body.read(len(target))
        target[: len(chunk)] = chunk
        return len(chunk)

    def close(self) -> None:
        self._body.close()


def _error_code(err: BaseException) -> str:
    response = getattr(err, "response", None)
    if not isinstance(response, dict):
        return ""
    return str(response.get("Error", {}).get("Code", ""))


class S3RangeReader(RangeReader):
    """An ``s3://bucket/key`` object read by byte range (see `RangeReader`).

    Args:
        uri: ``s3://bucket/key`` (a ``cluster:`` prefix is ignored, as by the boto3 backend).
        client: a boto3 S3 client to share between readers (default: `s3_client()`).
    """

    # botocore already retries each request (standard mode); this bounds re-reads of bodies.
    attempts = 3

    def __init__(self, uri: str, client: Any = None) -> None:
        super().__init__(uri)
        _, self.bucket, self.key = parse_s3_uri(uri)
        self.client = client if client is not None else s3_client()

    def download(self) -> Path:
        """The whole object through the S3 cache (`ckptmap.schemes.s3.s3_download`)."""
        return s3_download(self.uri, client=self.client)

    def _request(self, first: int, last: int, *, probe: bool) -> Answer:
        extra = {}
        etag = self._strong_etag()
        if etag is not None and not probe:
            extra["IfMatch"] = etag
        try:
            response = self.client.get_object(
                Bucket=self.bucket, Key=self.key, Range=f"bytes={first}-{last}", **extra
            )
        except Exception as err:
            code = _error_code(err)
            if code in ("PreconditionFailed", "412"):
                raise self.changed("If-Match", f"the ETag is no longer {etag}") from None
            if code in ("InvalidRange", "416"):
                if probe:
                    raise _NoRangeSupport("it has no bytes to serve (InvalidRange)") from None
                raise self.changed("size", f"bytes {first}-{last} are no longer in it") from None
            mapped = store_error(err, self.uri, writing=False)
            if mapped is err:
                raise
            raise mapped from err
        meta = response.get("ResponseMetadata", {})
        headers = meta.get("HTTPHeaders", {})
        return Answer(
            status=int(meta.get("HTTPStatusCode", 0)),
            content_range=response.get("ContentRange"),
            content_length=response.get("ContentLength"),
            validators={n: str(headers[h]) for n, h in _HEADERS.items() if headers.get(h)},
            content_encoding=response.get("ContentEncoding"),
            body=_Body(response["Body"]),
        )
