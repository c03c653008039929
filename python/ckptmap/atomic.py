"""Atomic file replacement: a failed write never leaves a half-written file where a good one is
expected.

Every file ckptmap writes (saved checkpoints, downloads, pointers) goes to a process-unique
temp file in the target's directory, is flushed and fsynced, then `os.replace`d over the target,
and the directory is fsynced so the rename itself is durable. On any exception, including
KeyboardInterrupt, the temp file is removed and the target is untouched. Temp names start with
a dot and carry `TEMP_MARKER`, so loaders and `find_latest_checkpoint` can tell them apart.
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

TEMP_MARKER = ".ckptmap-tmp-"


def temp_path_for(target: str | os.PathLike[str]) -> Path:
    """A process-unique temp path beside `target` (same directory, so the rename is atomic)."""
    target = Path(target)
    return target.with_name(f".{target.name}{TEMP_MARKER}{os.getpid()}-{uuid.uuid4().hex[:12]}")


def is_temp_file(path: str | os.PathLike[str]) -> bool:
    """Whether `path` names one of our temp files (an unfinished or abandoned write)."""
    return TEMP_MARKER in Path(path).name


def fsync_directory(directory: str | os.PathLike[str]) -> None:
    """Makes a rename inside `directory` durable (a no-op where directories can't be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(target: str | os.PathLike[str], mode: str = "wb") -> Iterator[IO[Any]]:
    """Opens a temp file beside `target`; on success it replaces `target` atomically.

    Args:
        target: the final path. Its directory must exist.
        mode: "wb" (default) or "w" for text.

    Yields:
        The open temp file. Write everything, then leave the block.

    Raises:
        OSError: the write, fsync or rename failed (disk full, permissions, ...); the message
            names the target. The temp file is gone and `target` is as it was.
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_write supports modes 'wb' and 'w', not {mode!r}")
    target = Path(target)
    temp = temp_path_for(target)
    try:
        with open(temp, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, target)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        if isinstance(exc, OSError) and not getattr(exc, "filename", None):
            raise type(exc)(exc.errno, f"{exc.strerror or exc} while writing {target}") from exc
        raise
    fsync_directory(target.parent)


def remove_stale_temps(directory: str | os.PathLike[str], older_than_s: float = 3600.0) -> int:
    """Deletes our temp files in `directory` left by writers killed long enough ago.

    A temp younger than `older_than_s` may belong to a live writer and is kept.
    Returns how many files were removed.
    """
    removed = 0
    now = time.time()
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(directory):
            if not is_temp_file(entry.name) or not entry.is_file(follow_symlinks=False):
                continue
            with contextlib.suppress(FileNotFoundError):
                if now - entry.stat(follow_symlinks=False).st_mtime >= older_than_s:
                    os.unlink(entry.path)
                    removed += 1
    return removed
