"""``http://`` and ``https://``: download into the cache (once per machine), then load."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ckptmap.cache import cached_download
from ckptmap.redact import redact_url
from ckptmap.schemes.local import read_checkpoint_file
from ckptmap.schemes.ranks import fetch_on_local_leader
from ckptmap.schemes.registry import CheckpointLoader

__all__ = ["load_cached_file", "load_from_http"]


def load_cached_file(path: Path, source: str, map_location: Any = None) -> Any:
    """Reads a file from the cache; a failure says which cache entry to delete."""
    try:
        return read_checkpoint_file(path, map_location)
    except Exception as err:
        if hasattr(err, "add_note"):
            err.add_note(
                f"(cached copy of {redact_url(source)}: delete {path} to download it again)"
            )
        raise


@CheckpointLoader.register_scheme(prefixes=("http://", "https://"))
def load_from_http(
    filename: str,
    map_location: Any = None,
    model_dir: str | os.PathLike[str] | None = None,
    progress: bool | None = None,
    *,
    sha256: str | None = None,
    check_hash: bool | None = None,
) -> Any:
    """Loads a checkpoint from an http(s) URL through the download cache.

    In a distributed job each machine's local rank 0 downloads while the other ranks wait,
    then every rank reads the cached file; if the download fails, every rank raises.

    Args:
        filename: the URL.
        map_location: as for `torch.load`.
        model_dir: download into this directory instead of the cache (as torch.hub).
        progress: show a progress bar (None: only when stderr is a terminal).
        sha256: a SHA-256 digest (or 8+ digit prefix) the file must have.
        check_hash: take the hash in the file name (``resnet50-0676ba61.pth``) as a SHA-256
            prefix the file must have. None (the default): only when ``CKPTMAP_CHECK_HASH=1``
            (mmengine does not check; ``model-20240115.pth`` ends in a date, not a hash).

    Returns:
        The checkpoint.

    Raises:
        See `ckptmap.cache.cached_download`.
    """

    def fetch() -> Path:
        return cached_download(
            filename,
            model_dir=model_dir,
            sha256=sha256,
            check_hash=check_hash,
            progress=progress,
        )

    path = fetch_on_local_leader(fetch, filename)
    return load_cached_file(path, filename, map_location)
