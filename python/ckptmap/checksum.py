"""SHA-256 manifests: ``<file>.sha256`` beside a checkpoint, written after it, checked on load.

A manifest is what ``sha256sum`` writes and ``sha256sum -c`` reads, plus one comment line
(which ``sha256sum`` skips) recording the file's size, modification time and inode when the
digest was taken::

    9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08  epoch_3.pth
    # ckptmap size=1234 mtime_ns=1700000000000000000 ino=42 recorded_ns=1700000005000000000

Where manifests come from:

- ``save_checkpoint(..., checksum=True)`` writes one for the saved file (and one per shard of
  a sharded checkpoint), atomically, after the checkpoint itself is durable;
- `write_manifest(path)` writes one for any file;
- the download cache writes one beside every entry it downloads.

What is checked, and when:

- Local files (``load_checkpoint(model, path)`` and ``CheckpointLoader`` for local paths) are
  hashed in full and compared with their manifest when one is present; ``CKPTMAP_CHECKSUM``
  selects ``auto`` (the default: check when present), ``require`` (a missing manifest is a
  `MissingManifestError`) or ``off``. The cost is one sequential read of the file.
- Cache entries are re-verified before reuse (see `ckptmap.cache`): when the recorded size,
  modification time and inode still match and the entry was already older than the
  manifest when the digest was taken (git's rule against "racily clean" files), the recorded
  digest is trusted without reading the file; otherwise the file is hashed again.

A mismatch is `ManifestMismatchError` (a `CorruptCheckpointError`) naming both digests.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from ckptmap.atomic import atomic_write
from ckptmap.errors import (
    CheckpointIsADirectoryError,
    ManifestMismatchError,
    MissingManifestError,
    UnsupportedSaveTargetError,
)
from ckptmap.formats.index import find_index, read_index, shard_path
from ckptmap.paths import open_regular

__all__ = [
    "ENV_CHECKSUM",
    "MANIFEST_SUFFIX",
    "Manifest",
    "checksum_mode",
    "file_sha256",
    "manifest_path",
    "read_manifest",
    "verified_digest",
    "verify_checkpoint",
    "verify_file",
    "with_checksum_option",
    "write_manifest",
    "write_manifests",
]

#: A manifest's name is the file's name plus this suffix.
MANIFEST_SUFFIX = ".sha256"
#: ``auto`` (default), ``require`` or ``off``: when local files are checked against manifests.
ENV_CHECKSUM = "CKPTMAP_CHECKSUM"

CHUNK_SIZE = 1 << 20
#: A file modified less than this before its digest was recorded may have changed within the
#: same timestamp tick; its recorded digest is not trusted without hashing again.
RACY_WINDOW_NS = 2_000_000_000
_MAX_MANIFEST_BYTES = 64 * 1024
_LINE = re.compile(r"^(?P<sha>[0-9a-fA-F]{64}) [ *](?P<name>.+)$")
_FIELD = re.compile(r"(\w+)=(\d+)")
_INDEX_SUFFIX = ".index.json"

_F = TypeVar("_F", bound=Callable[..., Any])


@dataclass(frozen=True)
class Manifest:
    """A parsed manifest.

    Attributes:
        sha256: the recorded digest (lowercase hex).
        name: the file name it was recorded for.
        size, mtime_ns, ino: the file's size, modification time and inode then (None when
            the manifest has no ckptmap comment line, e.g. one written by ``sha256sum``).
        recorded_ns: when the digest was recorded (None likewise).
    """

    sha256: str
    name: str
    size: int | None = None
    mtime_ns: int | None = None
    ino: int | None = None
    recorded_ns: int | None = None

    def fresh_for(self, st: os.stat_result) -> bool:
        """Whether `st` (the file's `stat` now) proves the file unchanged since the digest.

        True when size, modification time and inode are as recorded and the file had not
        been modified within `RACY_WINDOW_NS` of the recording (a change in that window
        could have kept the same timestamp).
        """
        if None in (self.size, self.mtime_ns, self.ino, self.recorded_ns):
            return False
        same = (st.st_size, st.st_mtime_ns, st.st_ino) == (self.size, self.mtime_ns, self.ino)
        return same and st.st_mtime_ns + RACY_WINDOW_NS <= (self.recorded_ns or 0)


def manifest_path(path: str | os.PathLike[str]) -> Path:
    """Where the manifest of `path` lives: ``<path>.sha256``."""
    path = Path(path)
    return path.with_name(path.name + MANIFEST_SUFFIX)


def checksum_mode() -> str:
    """``CKPTMAP_CHECKSUM``: ``"auto"`` (default), ``"require"`` or ``"off"``.

    Raises:
        ValueError: any other value.
    """
    value = os.environ.get(ENV_CHECKSUM, "").strip().lower() or "auto"
    aliases = {"0": "off", "false": "off", "no": "off", "1": "require", "true": "require"}
    value = aliases.get(value, value)
    if value not in ("auto", "require", "off"):
        raise ValueError(
            f"{ENV_CHECKSUM}={os.environ[ENV_CHECKSUM]!r}: use auto (check a <file>.sha256 "
            "manifest when present), require (every local checkpoint must have one) or off"
        )
    return value


def file_sha256(path: str | os.PathLike[str]) -> str:
    """The SHA-256 of a regular file, read in chunks (FIFOs and devices are refused)."""
    digest = hashlib.sha256()
    with open_regular(path) as handle:
        for block in iter(lambda: handle.read(CHUNK_SIZE), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(path: str | os.PathLike[str]) -> Manifest | None:
    """The manifest of `path`, or None when there is none or it can not be parsed.

    Only the line naming `path`'s file is used (a ``sha256sum`` file may list several).
    """
    where = manifest_path(path)
    try:
        with open_regular(where, what="checksum manifest") as handle:
            text = handle.read(_MAX_MANIFEST_BYTES).decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    name = Path(path).name
    found: Manifest | None = None
    for line in text.splitlines():
        match = _LINE.match(line.strip())
        if match and match["name"].removeprefix("./") == name:
            found = Manifest(match["sha"].lower(), name)
        elif line.startswith("# ckptmap ") and found is not None:
            fields = {k: int(v) for k, v in _FIELD.findall(line)}
            found = Manifest(
                found.sha256,
                found.name,
                fields.get("size"),
                fields.get("mtime_ns"),
                fields.get("ino"),
                fields.get("recorded_ns"),
            )
    return found


def write_manifest(path: str | os.PathLike[str], sha256: str | None = None) -> Path:
    """Writes ``<path>.sha256`` atomically (temp file, fsync, rename) and returns its path.

    Args:
        path: the file.
        sha256: its digest when already known (e.g. computed while downloading it); else the
            file is hashed now.
    """
    path = Path(path)
    st = os.stat(path)
    digest = (sha256 or file_sha256(path)).lower()
    target = manifest_path(path)
    with atomic_write(target, "w") as out:
        out.write(f"{digest}  {path.name}\n")
        out.write(
            f"# ckptmap size={st.st_size} mtime_ns={st.st_mtime_ns} ino={st.st_ino} "
            f"recorded_ns={time.time_ns()}\n"
        )
    return target


def verified_digest(path: str | os.PathLike[str]) -> tuple[str, bool]:
    """The SHA-256 of `path`, from its manifest when that is provably current.

    Returns:
        `(digest, from_manifest)`: the manifest's digest when `Manifest.fresh_for` holds, else
        the file's digest computed now (compare it with the manifest yourself).
    """
    manifest = read_manifest(path)
    if manifest is not None and manifest.fresh_for(os.stat(path)):
        return manifest.sha256, True
    return file_sha256(path), False


def verify_file(path: str | os.PathLike[str], *, required: bool = False) -> bool:
    """Hashes `path` and compares it with its manifest.

    Args:
        path: the file.
        required: a missing manifest is an error (else it is not checked).

    Returns:
        Whether a manifest was there (and matched).

    Raises:
        ManifestMismatchError: the digests differ (both are named).
        MissingManifestError: `required` and no manifest.
    """
    manifest = read_manifest(path)
    if manifest is None:
        if required:
            raise MissingManifestError(os.fspath(path), str(manifest_path(path)))
        return False
    actual = file_sha256(path)
    if actual != manifest.sha256:
        raise ManifestMismatchError(
            os.fspath(path),
            os.stat(path).st_size,
            str(manifest_path(path)),
            manifest.sha256,
            actual,
        )
    return True


def _shards(index: Path) -> list[Path]:

    weight_map, _ = read_index(str(index))
    directory = index.parent.resolve()
    return [shard_path(str(index), directory, s) for s in dict.fromkeys(weight_map.values())]


def _files_of(path: Path) -> list[Path]:
    """The files a checkpoint consists of: itself, plus its shards when it is an index."""
    if path.name.endswith(_INDEX_SUFFIX):
        return [path, *_shards(path)]
    return [path]


def verify_checkpoint(path: str | os.PathLike[str], *, mode: str | None = None) -> int:
    """Checks a local checkpoint (and, for a shard index, each shard) against its manifests.

    Args:
        path: a checkpoint file, a ``*.index.json``, or a directory holding an index or a
            DCP checkpoint (``.metadata`` and ``*.distcp`` files).
        mode: ``"auto"``, ``"require"`` or ``"off"``; default `checksum_mode()`.

    Returns:
        How many files were checked.

    Raises:
        ManifestMismatchError, MissingManifestError: see `verify_file`.
    """
    mode = mode or checksum_mode()
    if mode == "off":
        return 0
    target = Path(path)
    files = _directory_files(target) if target.is_dir() else _files_of(target)
    return sum(verify_file(f, required=mode == "require") for f in files)


def _directory_files(directory: Path) -> list[Path]:
    """The files of a checkpoint directory: a shard index and its shards, or a DCP
    checkpoint's ``.metadata`` and ``*.distcp`` files."""

    if (directory / ".metadata").is_file():
        return [directory / ".metadata", *sorted(directory.glob("*.distcp"))]
    try:
        return _files_of(Path(find_index(directory)))
    except CheckpointIsADirectoryError:
        return []  # not a checkpoint directory: the loader says so


def write_manifests(path: str | os.PathLike[str]) -> list[Path]:
    """Writes the manifest of a saved checkpoint, and of each shard when it is an index."""
    return [write_manifest(f) for f in _files_of(Path(path))]


def with_checksum_option(save: _F) -> _F:
    """Adds ``checksum: bool = False`` to a save function returning the path it wrote.

    With ``checksum=True`` the target must be a local path (checked before anything is
    saved); once the save has returned, `write_manifests` writes ``<file>.sha256`` for the
    file (and its shards), after the checkpoint itself is complete.
    """

    @functools.wraps(save)
    def wrapper(*args: Any, checksum: bool = False, **kwargs: Any) -> Any:
        if checksum:
            target = kwargs.get("filename", args[1] if len(args) > 1 else None)
            if "://" in os.fspath(target or ""):
                raise UnsupportedSaveTargetError(
                    f"checksum=True writes a <file>.sha256 manifest beside a local file; "
                    f"{target} is not a local path: save without checksum=True"
                )
        written = save(*args, **kwargs)
        if checksum:
            write_manifests(written)
        return written

    signature = inspect.signature(save)
    extra = inspect.Parameter("checksum", inspect.Parameter.KEYWORD_ONLY, default=False)
    params = list(signature.parameters.values())
    at = next((i for i, p in enumerate(params) if p.kind is p.VAR_KEYWORD), len(params))
    wrapper.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=[*params[:at], extra, *params[at:]]
    )
    return wrapper  # type: ignore[return-value]
