"""Local files: the fallback scheme, and the one place a file becomes a checkpoint."""

from __future__ import annotations

import os
from typing import Any

from ckptmap.schemes.registry import CheckpointLoader

__all__ = ["load_from_local", "read_checkpoint_file"]


def read_checkpoint_file(path: str | os.PathLike[str], map_location: Any = None) -> Any:
    """Reads a checkpoint file (local, or already downloaded into the cache).

    Every scheme ends here, so format sniffing and safe loading (`ckptmap.formats.load_file`)
    apply to downloads exactly as to local files; the ``allowed_globals`` of the enclosing
    `CheckpointLoader.load_checkpoint` call (`ckptmap.formats.allowlist.extended`) apply too.
    """
    from ckptmap.formats import allowlist, load_file

    return load_file(os.fspath(path), map_location, allowed_globals=allowlist.extended_globals())


@CheckpointLoader.register_scheme(prefixes="")
def load_from_local(filename: str | os.PathLike[str], map_location: Any = None) -> Any:
    """Loads a checkpoint from a local path (``~`` is expanded).

    Raises:
        CheckpointNotFoundError: no such file (`DanglingSymlinkError` for a broken symlink).
        CheckpointIsADirectoryError: a directory without a sharded-checkpoint index.
        CheckpointPermissionError: the file can not be read.
        CorruptCheckpointError: the file is not a (complete) checkpoint.
    """
    return read_checkpoint_file(os.path.expanduser(os.fspath(filename)), map_location)
