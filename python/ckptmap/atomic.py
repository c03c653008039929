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
import errno
import os
import stat
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

TEMP_MARKER = ".ckptmap-tmp-"


# Room left in a 255-byte file name for the dot, the marker, the pid and the random part.
_MAX_TEMP_STEM_BYTES = 200


def temp_path_for(target: str | os.PathLike[str]) -> Path:
    """A process-unique temp path beside `target` (same directory, so the rename is atomic).

    A name too long to carry the temp suffix is cut (any name a file system takes can be
    written).
    """
    target = Path(target)
    stem = target.name
    stem = stem[:_MAX_TEMP_STEM_BYTES]
    while len(os.fsencode(stem)) > _MAX_TEMP_STEM_BYTES:
        stem = stem[:-1]
    return target.with_name(f".{stem}{TEMP_MARKER}{os.getpid()}-{uuid.uuid4().hex[:12]}")


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


def _copy_permissions(fd: int, like: os.stat_result) -> None:
    # Owner and group first (chown may clear set-id bits), then the mode. As a non-root user
    # only a group one belongs to can be set; the rest stays as the new file has it.
    with contextlib.suppress(OSError):
        uid = like.st_uid if os.geteuid() == 0 else -1
        os.fchown(fd, uid, like.st_gid)
    os.fchmod(fd, stat.S_IMODE(like.st_mode))


def _regular_file_stat(*paths: str | os.PathLike[str] | None) -> os.stat_result | None:
    for path in paths:
        if path is None:
            continue
        try:
            st = os.stat(path)
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode):
            return st
    return None


def _names_target(exc: OSError, temp: Path) -> bool:
    names = {str(n) for n in (exc.filename, exc.filename2) if n is not None}
    return bool(names) and str(temp) not in names


def _about_target(exc: OSError, target: Path) -> OSError:
    """`exc` said again about `target` (the temp file is an implementation detail)."""
    reason = exc.strerror or str(exc)
    if exc.errno is None:
        return type(exc)(f"{reason} while writing {target}")
    return type(exc)(exc.errno, f"{reason} while writing {target}")


@contextlib.contextmanager
def atomic_write(
    target: str | os.PathLike[str],
    mode: str = "wb",
    *,
    follow_symlinks: bool = False,
    keep_permissions: bool = False,
    permissions_from: str | os.PathLike[str] | None = None,
) -> Iterator[IO[Any]]:
    """Opens a temp file beside `target`; on success it replaces `target` atomically.

    Args:
        target: the final path. Its directory must exist.
        mode: "wb" (default) or "w" for UTF-8 text.
        follow_symlinks: when `target` is a symlink, replace the file it points to (the link
            stays); otherwise the link itself is replaced by the new file.
        keep_permissions: give the new file the mode (and, where allowed, owner and group) of
            the file it replaces, as writing in place would keep them; a new file gets
            ``0o666`` less the umask. The mode is set before any byte is written.
        permissions_from: with `keep_permissions`, a file to take them from when `target`
            does not exist yet (e.g. a checkpoint's index for its new shards).

    Yields:
        The open temp file. Write everything, then leave the block.

    Raises:
        OSError: the write, fsync or rename failed (disk full, permissions, ...); the message
            names the target, never the temp file. The temp file is gone and `target` is as it
            was.
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_write supports modes 'wb' and 'w', not {mode!r}")
    named = Path(target)
    target = named
    if follow_symlinks and os.path.islink(named):
        target = Path(os.path.realpath(named))
        if os.path.islink(target):  # realpath stops at a loop
            raise OSError(errno.ELOOP, f"{os.strerror(errno.ELOOP)}: {named}")
    like = _regular_file_stat(target, permissions_from) if keep_permissions else None
    temp = temp_path_for(target)
    try:
        # "x": never write through something planted at the temp name.
        with open(temp, "xb") if mode == "wb" else open(temp, "x", encoding="utf-8") as handle:
            if like is not None:
                _copy_permissions(handle.fileno(), like)
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, target)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        if isinstance(exc, OSError) and type(exc).__module__ == "builtins":
            if not _names_target(exc, temp):
                raise _about_target(exc, named) from exc
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
