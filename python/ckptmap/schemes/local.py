"""Local files: the fallback scheme, ``file://`` URIs, and the one place a file becomes a
checkpoint."""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import unquote, urlsplit
from urllib.request import url2pathname

from ckptmap.checksum import verify_checkpoint
from ckptmap.formats import allowlist, load_file
from ckptmap.paths import check_path
from ckptmap.schemes.registry import CheckpointLoader

__all__ = ["file_uri_path", "load_from_file_uri", "load_from_local", "read_checkpoint_file"]


def read_checkpoint_file(path: str | os.PathLike[str], map_location: Any = None) -> Any:
    """Reads a checkpoint file (local, or already downloaded into the cache).

    Every scheme ends here, so format sniffing and safe loading (`ckptmap.formats.load_file`)
    apply to downloads exactly as to local files; the ``allowed_globals`` of the enclosing
    `CheckpointLoader.load_checkpoint` call (`ckptmap.formats.allowlist.extended`) apply too.
    """

    return load_file(os.fspath(path), map_location, allowed_globals=allowlist.extended_globals())


@CheckpointLoader.register_scheme(prefixes="")
def load_from_local(filename: str | os.PathLike[str], map_location: Any = None) -> Any:
    """Loads a checkpoint from a local path (``~`` is expanded).

    When the checkpoint has a ``<file>.sha256`` manifest (``save_checkpoint(...,
    checksum=True)``), the file is hashed and checked against it first; ``CKPTMAP_CHECKSUM``
    says when (`ckptmap.checksum`: ``auto``, the default, ``require`` or ``off``).

    Raises:
        CheckpointNotFoundError: no such file (`DanglingSymlinkError` for a broken symlink).
        CheckpointIsADirectoryError: a directory without a sharded-checkpoint index.
        CheckpointPermissionError: the file can not be read.
        NotARegularFileError: a FIFO, socket or device.
        CorruptCheckpointError: the file is not a (complete) checkpoint.
        ManifestMismatchError: the file does not match its manifest.
        MissingManifestError: ``CKPTMAP_CHECKSUM=require`` and the file has no manifest.
    """

    path = check_path(filename)
    verify_checkpoint(path)
    return read_checkpoint_file(path, map_location)


def file_uri_path(uri: str) -> str:
    """The local path of a ``file://`` URI (``file:///abs/path``, ``file://localhost/...``).

    Raises:
        ValueError: a ``file://`` URI naming another host.
    """
    parts = urlsplit(uri)
    if parts.netloc not in ("", "localhost"):
        raise ValueError(
            f"{uri!r} names a file on the host {parts.netloc!r}: file:// URIs load local files "
            "only (file:///path/to/ckpt.pth); mount the file or use its http(s):// URL"
        )
    return url2pathname(unquote(parts.path))


@CheckpointLoader.register_scheme(prefixes="file://")
def load_from_file_uri(filename: str, map_location: Any = None) -> Any:
    """Loads a ``file://`` URI as the local file it names (see `load_from_local`)."""
    return load_from_local(file_uri_path(filename), map_location)
