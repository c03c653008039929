"""Local paths: checking a checkpoint path, opening it without ever blocking, and joining
untrusted names onto a directory without ever leaving it.

`check_path` is the one place a local checkpoint path is checked, and `open_regular` the one
way ckptmap opens a file it reads: both `stat` the path first and refuse FIFOs, sockets and
devices (and symlinks to them) with `NotARegularFileError` before anything is opened, since
opening a FIFO for reading blocks until a writer appears and a device such as ``/dev/zero``
never ends. `open_regular` also opens with ``O_NONBLOCK`` and checks the opened file again
(`fstat`), so a path swapped for a FIFO between the two checks cannot block either.

URL basenames, model-zoo names and the values of zoo JSON tables, S3 keys and pavi model names
all end up as paths under a cache or model root. `safe_join` rejects anything that could point
elsewhere (``..``, absolute paths, drive letters, backslashes, NUL and other control
characters, empty names or components) before any file is written, then resolves the result,
symlinks included, and checks that it is still inside the root.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from pathlib import Path
from typing import BinaryIO

from ckptmap.atomic import is_temp_file
from ckptmap.errors import (
    CheckpointIsADirectoryError,
    CheckpointNotFoundError,
    CheckpointPermissionError,
    DanglingSymlinkError,
    NotARegularFileError,
    UnsafePathError,
)

__all__ = [
    "check_path",
    "check_relative_name",
    "describe_file_type",
    "open_regular",
    "reject_special",
    "safe_join",
]

_DRIVE = re.compile(r"^[A-Za-z]:")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _reject(what: str, name: object, root: str, reason: str) -> UnsafePathError:
    where = f" under {root}" if root else ""
    return UnsafePathError(
        f"refusing to use {what} {name!r}{where}: {reason}. Names joined onto a cache or model "
        "directory must be relative paths made of plain components; rename the file or entry",
        name=name,
        root=root,
        reason=reason,
    )


def check_relative_name(
    name: str, *, what: str = "name", allow_subdirs: bool = True, root: str = ""
) -> tuple[str, ...]:
    """Checks that `name` is a plain relative path and returns its components.

    Args:
        name: the untrusted name (``/`` separates components).
        what: what the name is, for the message ("URL file name", "S3 key", ...).
        allow_subdirs: whether `name` may have more than one component.
        root: the directory it is meant for, for the message only.

    Raises:
        UnsafePathError: the name is empty, absolute, has a drive letter, a backslash, a control
            character (NUL included), an empty, ``.`` or ``..`` component, or names one of
            ckptmap's own temp files.
    """
    if not isinstance(name, str):
        raise _reject(what, name, root, f"expected a str, got {type(name).__name__}")
    if not name.strip():
        raise _reject(what, name, root, "it is empty")
    if _CONTROL.search(name):
        raise _reject(what, name, root, "it contains a control character (NUL or similar)")
    if "\\" in name:
        raise _reject(what, name, root, "it contains a backslash (a Windows path separator)")
    if name.startswith("/"):
        raise _reject(what, name, root, "it is an absolute path")
    if "://" in name:
        raise _reject(what, name, root, "it is a URI, not a relative path")
    parts = tuple(name.split("/"))
    if not allow_subdirs and len(parts) > 1:
        raise _reject(what, name, root, "it has a directory part")
    for part in parts:
        if part in ("", ".", ".."):
            shown = "an empty" if part == "" else f"a {part!r}"
            raise _reject(what, name, root, f"it has {shown} path component")
        if _DRIVE.match(part):
            raise _reject(what, name, root, "it has a drive letter")
    if is_temp_file(parts[-1]):
        raise _reject(what, name, root, "it looks like one of ckptmap's temp files")
    return parts


def safe_join(
    root: str | os.PathLike[str],
    name: str,
    *,
    what: str = "name",
    allow_subdirs: bool = True,
) -> Path:
    """Joins the untrusted `name` onto `root` and proves the result stays inside it.

    Args:
        root: the trusted directory (it need not exist yet).
        name: the untrusted relative name, ``/``-separated.
        what: what the name is, for the message.
        allow_subdirs: whether `name` may contain directories.

    Returns:
        ``root / name`` with `root` made absolute (symlinks in `root` itself resolved).

    Raises:
        UnsafePathError: `name` is not a plain relative path, or it resolves (through a
            symlink) to somewhere outside `root`.
    """
    base = Path(root).expanduser().resolve()
    parts = check_relative_name(name, what=what, allow_subdirs=allow_subdirs, root=str(base))
    joined = base.joinpath(*parts)
    resolved = joined.resolve()
    if resolved != base and not resolved.is_relative_to(base):
        raise _reject(what, name, str(base), f"it resolves to {resolved}, outside the directory")
    return joined


def describe_file_type(mode: int) -> str:
    """What a `stat` mode is, in words ("a FIFO (named pipe)", "a socket", ...)."""
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISREG(mode):
        return "a regular file"
    return "a special file"


def _special(path: str, mode: int, what: str, named_by: str | None = None) -> NotARegularFileError:
    kind = describe_file_type(mode)
    if os.path.islink(path):
        kind = f"a symlink to {os.path.realpath(path)!r}, {kind}"
    return NotARegularFileError(path, kind, what, named_by)


def _stat(path: str) -> os.stat_result:
    try:
        return os.stat(path)
    except PermissionError as err:  # a directory on the way can not be searched
        raise CheckpointPermissionError(path) from err
    except OSError:  # ENOENT, ENOTDIR, ELOOP, ENAMETOOLONG
        if os.path.islink(path):
            raise DanglingSymlinkError(path, os.readlink(path)) from None
        raise CheckpointNotFoundError(path) from None


def reject_special(
    path: str | os.PathLike[str], *, what: str = "checkpoint path", named_by: str | None = None
) -> None:
    """Raises `NotARegularFileError` when `path` is a FIFO, socket or device (or links to one).

    A missing path, a regular file or a directory pass: this only keeps special files out.

    Args:
        path: the path.
        what: what it is, for the message ("shard", "cache entry").
        named_by: the file that named it (an index), for the message.
    """
    path = os.fspath(path)
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise _special(path, mode, what, named_by)


def check_path(path: str | os.PathLike[str], *, what: str = "checkpoint path") -> str:
    """Expands ``~`` and checks that `path` names a regular file or a directory.

    Only `stat` is called: nothing is opened.

    Args:
        path: the local path.
        what: what the path is, for the message of `NotARegularFileError`.

    Returns:
        The expanded path. It may be a regular file or a directory; the caller decides.

    Raises:
        DanglingSymlinkError: a symlink whose target does not exist (or a symlink loop).
        CheckpointNotFoundError: nothing at that path.
        CheckpointPermissionError: a directory on the path can not be searched.
        NotARegularFileError: a FIFO, socket or device, or a symlink to one.
    """
    path = os.path.expanduser(os.fspath(path))
    mode = _stat(path).st_mode
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise _special(path, mode, what)
    return path


def open_regular(path: str | os.PathLike[str], *, what: str = "checkpoint path") -> BinaryIO:
    """Opens a regular file for binary reading, refusing anything that could block or not end.

    The path is checked with `stat` before the open, opened with ``O_NONBLOCK`` (a FIFO
    swapped in meanwhile can not block the open), and checked again with `fstat`.

    Args:
        path: the local path (``~`` is expanded).
        what: what the path is, for messages.

    Returns:
        The open file (``"rb"``); the caller closes it.

    Raises:
        CheckpointNotFoundError / DanglingSymlinkError: nothing at `path`.
        CheckpointIsADirectoryError: a directory.
        CheckpointPermissionError: the file can not be read.
        NotARegularFileError: a FIFO, socket or device, or a symlink to one.
    """
    path = check_path(path, what=what)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    flags |= getattr(os, "O_NOCTTY", 0)
    try:
        fd = os.open(path, flags)
    except PermissionError as err:
        raise CheckpointPermissionError(path) from err
    except FileNotFoundError:  # removed since the check
        _stat(path)
        raise CheckpointNotFoundError(path) from None
    except OSError as err:
        if err.errno == errno.ENXIO:  # a socket (swapped in since the check)
            raise _special(path, os.stat(path).st_mode, what) from None
        raise
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise CheckpointIsADirectoryError(path)
        if not stat.S_ISREG(mode):
            raise _special(path, mode, what)
        if flags & getattr(os, "O_NONBLOCK", 0):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
