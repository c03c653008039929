"""Which checkpoint to resume from, the `last_checkpoint` pointer, and keeping the last N.

mmengine's runner writes the path of each new checkpoint into ``<work_dir>/last_checkpoint``
and `find_latest_checkpoint` reads it back. Here the pointer is trusted only when it names a
complete checkpoint; otherwise the newest complete one is chosen by this rule:

1. Candidates are the files directly in the directory whose names end in ``.pth``, ``.pt``,
   ``.bin``, ``.ckpt``, ``.safetensors`` or ``.index.json`` (a sharded checkpoint's index),
   except temp files of unfinished writes (`ckptmap.atomic.is_temp_file`) and shards
   (``...-00001-of-00004.pth``), which are parts, not checkpoints.
2. A candidate counts only if it is complete, judged without decompressing or reading it
   whole: a torch zip whose end records end the file and whose central directory is
   consistent with them and names one ``data.pkl``; a safetensors file whose header passes
   the Rust reader's checks, data ending exactly at the end of the file; an index whose every
   shard is there and complete; a legacy (pre-zip) torch pickle when it is not empty. FIFOs,
   sockets and devices (or symlinks to them) are skipped with a warning and never opened.
3. Names starting with ``epoch_<N>`` or ``iter_<N>`` rank above all others, by N; ties and the
   others go by modification time, then by name.

Writing the pointer (`write_last_checkpoint`) is atomic and refuses to name a file that is not
complete. `rotate_checkpoints` deletes old ones only once the newest is durable, and never the
one the pointer names.
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import os
import re
import stat
import sys
import time
import warnings
from collections.abc import Iterable
from pathlib import Path

from ckptmap._core import SafetensorsHeaderError
from ckptmap.atomic import atomic_write, fsync_directory, is_temp_file
from ckptmap.checksum import manifest_path
from ckptmap.completeness import incomplete_reason, read_head
from ckptmap.errors import (
    CheckpointNotFoundError,
    CheckpointPointerWarning,
    IncompleteCheckpointError,
    InvalidShardIndexError,
    SaveArgumentError,
)
from ckptmap.formats.index import read_index
from ckptmap.magic import checkpoint_kind
from ckptmap.paths import describe_file_type, open_regular
from ckptmap.save import INDEX_SUFFIX, is_shard_file
from ckptmap.zipdir import ZipDirectoryError

__all__ = [
    "CHECKPOINT_SUFFIXES",
    "LAST_CHECKPOINT",
    "find_latest_checkpoint",
    "is_complete_checkpoint",
    "list_checkpoints",
    "remove_orphan_shards",
    "rotate_checkpoints",
    "write_last_checkpoint",
]

logger = logging.getLogger("ckptmap")

PathLike = str | os.PathLike[str]

#: The pointer file's name inside a work dir (as mmengine's runner names it).
LAST_CHECKPOINT = "last_checkpoint"

#: Names that may be checkpoints when a directory is scanned.
CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors", INDEX_SUFFIX)

_STEP_RE = re.compile(r"^(?:epoch|iter)_(\d+)(?!\d)")


# --- is this file a whole checkpoint? ----------------------------------------------------------


def is_complete_checkpoint(path: PathLike) -> bool:
    """Whether `path` is a checkpoint that was written to the end (see the module docstring).

    Cheap whatever the file's size: a zip's end records and central directory, a safetensors
    header, an index and its shards' headers are read; no member is read or decompressed and
    no tensor data is touched. FIFOs, sockets and devices are never opened. Never raises for
    bad or missing files.
    """
    try:
        return _complete(Path(path), depth=0)
    except (OSError, ValueError, RecursionError, ZipDirectoryError, SafetensorsHeaderError):
        return False


def _complete(path: Path, depth: int) -> bool:
    if is_temp_file(path):
        return False
    if path.name.endswith(INDEX_SUFFIX):
        return depth == 0 and _index_complete(path)
    with open_regular(path) as f:
        if incomplete_reason(f, str(path)) is not None:
            return False
        head = read_head(f)
    # A zip's end records were checked above; nothing cheap proves a legacy pickle's end.
    return checkpoint_kind(head) is not None


def _shards_of(index: Path) -> list[Path] | None:
    """The shard files an index names (plain names in its directory), or None for a bad index."""
    try:
        weight_map, _ = read_index(str(index))
    except InvalidShardIndexError:
        return None
    shards = sorted(set(weight_map.values()))
    if any(Path(s).name != s or s in ("", ".", "..") for s in shards):
        return None  # only plain names beside the index
    return [index.parent / s for s in shards]


def _index_complete(index: Path) -> bool:
    shards = _shards_of(index)
    return shards is not None and all(_complete(s, depth=1) for s in shards)


# --- scanning ------------------------------------------------------------------------------------


def _is_candidate(name: str, pattern: str | None) -> bool:
    if name == LAST_CHECKPOINT or is_temp_file(name) or is_shard_file(name):
        return False
    if not name.endswith(CHECKPOINT_SUFFIXES):
        return False
    return pattern is None or fnmatch.fnmatchcase(name, pattern)


def _rank(path: Path) -> tuple[int, int, int, str]:
    match = _STEP_RE.match(path.name)
    step = int(match.group(1)) if match else -1
    return (match is not None, step, path.stat().st_mtime_ns, path.name)


def list_checkpoints(directory: PathLike, pattern: str | None = None) -> list[str]:
    """The complete checkpoints directly in `directory`, oldest first by the module's rule.

    Args:
        directory: the work dir.
        pattern: an `fnmatch` glob the names must also match (e.g. ``"epoch_*.pth"``).
    """
    ranked = []
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        for entry in os.scandir(directory):
            if not _is_candidate(entry.name, pattern):
                continue
            special = _special_kind(entry.path)
            if special is not None:
                logger.warning(
                    "Skipping %s: it is %s, not a regular file (never opened)", entry.path, special
                )
                continue
            if is_complete_checkpoint(entry.path):
                path = Path(entry.path)
                with contextlib.suppress(OSError):
                    ranked.append((_rank(path), entry.path))
    return [path for _, path in sorted(ranked)]


def _special_kind(path: str) -> str | None:
    """What `path` is when it is a FIFO, socket or device (or links to one), else None."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    return describe_file_type(mode)


def _read_pointer(pointer: str) -> str:
    """The pointer file's text, stripped (never blocks on a FIFO or device pointer)."""
    with open_regular(pointer, what=f"{LAST_CHECKPOINT} pointer") as f:
        return f.read(1 << 20).decode("utf-8").strip()


# --- the pointer -------------------------------------------------------------------------------


def _resolve(directory: str, named: str) -> str:
    """A relative name is taken as mmengine does (from the cwd), else from the work dir."""
    if os.path.isabs(named) or os.path.exists(named):
        return named
    return os.path.join(directory, named)


def find_latest_checkpoint(path: PathLike) -> str | None:
    """The checkpoint to resume from in the work dir `path`.

    Returns what ``<path>/last_checkpoint`` names when that is a complete checkpoint (a remote
    URI there is returned unchecked). When the pointer names a missing, unreadable or
    incomplete file, or is empty or unreadable itself, a `CheckpointPointerWarning` says so
    and the newest complete checkpoint in `path` (see the module docstring) is returned, or
    None if there is none. Without a pointer file the answer is None, as in mmengine: a
    directory that never had a checkpoint committed is not resumed from.
    """
    directory = os.fspath(path)
    pointer = os.path.join(directory, LAST_CHECKPOINT)
    try:
        named = _read_pointer(pointer)
    except FileNotFoundError:
        logger.info("Did not find last_checkpoint to be resumed.")
        return None
    except (OSError, UnicodeDecodeError) as err:
        named, problem = "", f"can not be read ({err})"
    else:
        problem = "is empty"
    if named:
        if "://" in named:
            return named
        resolved = _resolve(directory, named)
        special = _special_kind(resolved)
        if special is None and is_complete_checkpoint(resolved):
            return resolved
        if special is not None:
            what = f"is {special}, not a regular file (it was not opened)"
        else:
            what = "is incomplete or not a checkpoint" if os.path.exists(resolved) else "is missing"
        problem = f"names {named!r}, which {what}"
    found = list_checkpoints(directory)
    choice = found[-1] if found else None
    instead = f"resuming from {choice} instead" if choice else "and no other complete one is there"
    warnings.warn(
        f"{pointer} {problem}; {instead} (the newest complete checkpoint: highest epoch_N / "
        "iter_N, then modification time)",
        CheckpointPointerWarning,
        stacklevel=2,
    )
    return choice


def _fsync_file(path: str) -> None:
    if sys.platform == "win32":
        # Windows flushes only handles open for writing (FlushFileBuffers needs GENERIC_WRITE).
        fd = os.open(path, os.O_RDWR | os.O_BINARY)
    else:
        fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _make_durable(path: str) -> None:
    """fsync a checkpoint (and its shards) and its directory, in case another tool wrote it."""
    files = [path]
    if path.endswith(INDEX_SUFFIX):
        files += [str(s) for s in _shards_of(Path(path)) or []]
    for name in files:
        _fsync_file(name)
    fsync_directory(os.path.dirname(os.path.abspath(path)))


def write_last_checkpoint(work_dir: PathLike, checkpoint: PathLike) -> str:
    """Points ``<work_dir>/last_checkpoint`` at `checkpoint`, atomically.

    The checkpoint is checked to be complete and made durable (fsynced) first, so the pointer
    never names a missing or partial file. A remote URI (``s3://...``) is written unchecked.

    Args:
        work_dir: the directory holding the pointer (created if needed).
        checkpoint: the path written into the pointer, as given (mmengine writes the full
            path); a relative one is looked up from the cwd, else from `work_dir`.

    Returns:
        The pointer's path.

    Raises:
        CheckpointNotFoundError: `checkpoint` does not exist.
        IncompleteCheckpointError: it exists but is not a complete checkpoint.
    """
    directory = os.fspath(work_dir)
    named = os.fspath(checkpoint)
    if "://" not in named:
        resolved = _resolve(directory, named)
        if not os.path.exists(resolved):
            raise CheckpointNotFoundError(
                resolved,
                f"refusing to point {LAST_CHECKPOINT} at {resolved!r}: no such file; save the "
                "checkpoint first",
            )
        if not is_complete_checkpoint(resolved):
            raise IncompleteCheckpointError(
                f"refusing to point {LAST_CHECKPOINT} at {resolved!r}: it is incomplete or not "
                "a checkpoint; save it again"
            )
        _make_durable(resolved)
    os.makedirs(directory, exist_ok=True)
    pointer = os.path.join(directory, LAST_CHECKPOINT)
    with atomic_write(pointer, "w") as f:
        f.write(named)
    return pointer


# --- rotation ----------------------------------------------------------------------------------


def _remove_checkpoint(path: str, keep_shards: set[str]) -> list[str]:
    shards = None
    if path.endswith(INDEX_SUFFIX):
        with contextlib.suppress(OSError, ValueError):
            shards = _shards_of(Path(path))
    removed = []
    # The index goes first: once it is gone, no one loads the shards through it. Each file's
    # SHA-256 manifest (`ckptmap.checksum`) goes after it.
    for name in (path, str(manifest_path(path))):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name)
            removed.append(name)
    for shard in shards or []:
        if os.path.realpath(shard) not in keep_shards:
            for name in (str(shard), str(manifest_path(shard))):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(name)
                    removed.append(name)
    return removed


def _protected_shards(checkpoints: Iterable[str]) -> set[str]:
    keep: set[str] = set()
    for path in checkpoints:
        if path.endswith(INDEX_SUFFIX):
            keep.update(os.path.realpath(s) for s in _shards_of(Path(path)) or [])
    return keep


def rotate_checkpoints(
    directory: PathLike, keep_last: int, pattern: str | None = None
) -> list[str]:
    """Deletes all but the newest `keep_last` checkpoints in `directory`.

    Only complete checkpoints whose names start with ``epoch_<N>`` / ``iter_<N>`` take part
    (or, with `pattern`, those matching that glob), ranked as in the module docstring, so
    ``best_*`` and hand-named files are left alone, as are incomplete files. Before anything is
    deleted the newest checkpoint is fsynced (with its directory), and the file the
    `last_checkpoint` pointer names is never deleted. A sharded checkpoint goes with its
    shards (those no kept index shares).

    Args:
        directory: the work dir.
        keep_last: how many to keep (at least 1).
        pattern: an `fnmatch` glob selecting the names to rotate (e.g. ``"iter_*.pth"``).

    Returns:
        The paths deleted.
    """
    if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1:
        raise SaveArgumentError(
            f"rotate_checkpoints(keep_last={keep_last!r}): keep_last must be an int >= 1 (the "
            f"newest checkpoint in {os.fspath(directory)!r} is always kept)"
        )
    directory = os.fspath(directory)
    found = list_checkpoints(directory, pattern)
    if pattern is None:
        found = [p for p in found if _STEP_RE.match(os.path.basename(p))]
    if len(found) <= keep_last:
        return []
    keep, old = found[-keep_last:], found[:-keep_last]
    _make_durable(keep[-1])
    protected = {os.path.realpath(p) for p in keep}
    pointed = _pointer_target(directory)
    if pointed is not None:
        protected.add(os.path.realpath(pointed))
    keep_shards = _protected_shards(p for p in found if os.path.realpath(p) in protected)
    removed = []
    for path in old:
        if os.path.realpath(path) not in protected:
            removed += _remove_checkpoint(path, keep_shards)
    if removed:
        fsync_directory(directory)
    return removed


def _pointer_target(directory: str) -> str | None:
    try:
        named = _read_pointer(os.path.join(directory, LAST_CHECKPOINT))
    except (OSError, UnicodeDecodeError):
        return None
    return _resolve(directory, named) if named and "://" not in named else None


def remove_orphan_shards(directory: PathLike, older_than_s: float = 3600.0) -> list[str]:
    """Deletes shard files no index in `directory` names, left by sharded saves killed midway.

    A shard younger than `older_than_s` may belong to a save still running and is kept.

    Returns:
        The paths deleted.
    """
    directory = os.fspath(directory)
    named: set[str] = set()
    shards = []
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(directory):
            if entry.name.endswith(INDEX_SUFFIX) and not is_temp_file(entry.name):
                with contextlib.suppress(OSError, ValueError):
                    named.update(os.path.realpath(s) for s in _shards_of(Path(entry.path)) or [])
            elif is_shard_file(entry.name) and not is_temp_file(entry.name):
                shards.append(entry)
    now = time.time()
    removed = []
    for entry in shards:
        if os.path.realpath(entry.path) in named:
            continue
        with contextlib.suppress(FileNotFoundError):
            if now - entry.stat(follow_symlinks=False).st_mtime >= older_than_s:
                os.unlink(entry.path)
                removed.append(entry.path)
    return removed
