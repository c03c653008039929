"""Local paths: checking a checkpoint path, and joining untrusted names onto a directory
without ever leaving it.

URL basenames, model-zoo names and the values of zoo JSON tables, S3 keys and pavi model names
all end up as paths under a cache or model root. `safe_join` rejects anything that could point
elsewhere (``..``, absolute paths, drive letters, backslashes, NUL and other control
characters, empty names or components) before any file is written, then resolves the result,
symlinks included, and checks that it is still inside the root.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ckptmap.atomic import is_temp_file
from ckptmap.errors import (
    CheckpointNotFoundError,
    CheckpointPermissionError,
    DanglingSymlinkError,
    UnsafePathError,
)

__all__ = ["check_path", "check_relative_name", "safe_join"]

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


def check_path(path: str | os.PathLike[str]) -> str:
    """Expands ``~`` and checks that `path` names something that exists.

    Returns:
        The expanded path. It may be a regular file or a directory; the caller decides.

    Raises:
        DanglingSymlinkError: a symlink whose target does not exist (or a symlink loop).
        CheckpointNotFoundError: nothing at that path.
        CheckpointPermissionError: a directory on the path can not be searched.
    """
    path = os.path.expanduser(os.fspath(path))
    try:
        os.stat(path)
    except PermissionError as err:  # a directory on the way can not be searched
        raise CheckpointPermissionError(path) from err
    except OSError:  # ENOENT, ENOTDIR, ELOOP, ENAMETOOLONG
        if os.path.islink(path):
            raise DanglingSymlinkError(path, os.readlink(path)) from None
        raise CheckpointNotFoundError(path) from None
    return path
