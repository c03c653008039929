"""Which remote URIs are shard indexes, and where an index's shards live."""

from __future__ import annotations

from urllib.parse import quote, urlsplit, urlunsplit

from ckptmap.formats.index import INDEX_SUFFIX

__all__ = ["is_index_uri", "sibling_uri"]


def _is_http(uri: str) -> bool:
    return urlsplit(uri).scheme.lower() in ("http", "https")


def is_index_uri(uri: str) -> bool:
    """Whether `uri` names a shard index (its path ends in ``.index.json``)."""
    path = urlsplit(uri).path if _is_http(uri) else uri
    return path.endswith(INDEX_SUFFIX)


def sibling_uri(index_uri: str, name: str) -> str:
    """The URI of `name` (a checked relative path) beside `index_uri`.

    For http(s) the name is percent-encoded into the index URL's directory, and the index
    URL's query and fragment are not carried over (a signed query is for the index alone).
    For ``s3://`` (with or without a ``cluster:`` prefix) the key's directory is kept.
    """
    if _is_http(index_uri):
        parts = urlsplit(index_uri)
        directory = parts.path.rsplit("/", 1)[0]
        return urlunsplit(
            (parts.scheme, parts.netloc, f"{directory}/{quote(name, safe='/')}", "", "")
        )
    return f"{index_uri.rsplit('/', 1)[0]}/{name}"
