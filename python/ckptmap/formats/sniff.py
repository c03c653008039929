"""What is this file? Format sniffing by content (magic bytes), never by file name.

`sniff(path)` checks the path (missing, dangling symlink, directory, permission) and reads at
most the first 64 KiB plus, for zip archives, the central directory. It never unpickles
anything and never reads tensor data. A file that is no checkpoint (empty, truncated, an HTML
error page, a Git LFS pointer, ...) is reported as `Format.CORRUPT` with a description of what
it looks like; `ckptmap.formats.load_file` turns that into a `CorruptCheckpointError`.
"""

from __future__ import annotations

import enum
import json
import os
import struct
import zipfile
from dataclasses import dataclass

from ckptmap.errors import (
    CorruptCheckpointError,
)
from ckptmap.formats.index import MAX_INDEX_BYTES, find_index
from ckptmap.magic import JSON_WHITESPACE, safetensors_header_length
from ckptmap.paths import check_path, open_regular

__all__ = ["DCP_METADATA", "LEGACY_MAGIC", "Format", "Sniffed", "sniff"]

#: How much of the file sniffing reads (and how much of a JSON index it parses at most).
HEAD_BYTES = 64 * 1024
#: The file that makes a directory a torch.distributed.checkpoint (DCP) checkpoint.
DCP_METADATA = ".metadata"

#: `pickle.dumps(torch.serialization.MAGIC_NUMBER, protocol=N)` without its PROTO byte: the
#: first record of torch's legacy (pre-1.6, non-zip) format.
LEGACY_MAGIC = b"\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little") + b"."


class Format(str, enum.Enum):
    """A checkpoint format, as told by the file's content."""

    TORCH_ZIP = "torch-zip"
    """`torch.save` (1.6+): a zip archive with ``<archive>/data.pkl``."""
    TORCHSCRIPT = "torchscript"
    """`torch.jit.save`: a zip archive with ``constants.pkl`` and ``code/``."""
    TORCH_LEGACY = "torch-legacy"
    """`torch.save(_use_new_zipfile_serialization=False)`: pickles and raw storage bytes."""
    PICKLE = "pickle"
    """A plain Python pickle (not written by `torch.save`)."""
    SAFETENSORS = "safetensors"
    """An 8-byte little-endian header length, a JSON header, then tensor data."""
    SHARDED = "sharded"
    """A ``*.index.json`` with a ``weight_map`` (or a directory holding one)."""
    DCP = "dcp"
    """A `torch.distributed.checkpoint` directory: ``.metadata`` plus ``__*.distcp`` files."""
    CORRUPT = "corrupt"
    """Empty, truncated, damaged, or not a checkpoint at all."""


@dataclass(frozen=True)
class Sniffed:
    """The result of `sniff`.

    Attributes:
        path: the path as checked (``~`` expanded).
        format: the format the content shows.
        size: file size in bytes (for a directory, the size of its index file).
        looks_like: a short human description ("a torch.save zip checkpoint", "an HTML page").
        hint: for `Format.CORRUPT`, what to do about it (None: the generic re-download advice).
        index_path: for `Format.SHARDED`, the ``*.index.json`` file; for `Format.DCP`, the
            ``.metadata`` file (`path` is then the directory).
        pickle_protocol: for pickles, the protocol of the first record, when known.
    """

    path: str
    format: Format
    size: int
    looks_like: str
    hint: str | None = None
    index_path: str | None = None
    pickle_protocol: int | None = None

    def raise_if_corrupt(self) -> None:
        """Raises `CorruptCheckpointError` when the content is not a checkpoint."""
        if self.format is Format.CORRUPT:
            raise CorruptCheckpointError(self.path, self.size, self.looks_like, self.hint)


def sniff(path: str | os.PathLike[str]) -> Sniffed:
    """Tells the format of a checkpoint from its content.

    Args:
        path: a file, a directory holding a ``*.index.json``, or a `torch.distributed.checkpoint`
            directory (one with a ``.metadata`` file; it wins over an index in the same
            directory) or its ``.metadata``.

    Returns:
        What the content looks like. Unrecognised content is `Format.CORRUPT`, not an error.

    Raises:
        CheckpointNotFoundError / DanglingSymlinkError: nothing at `path`.
        CheckpointIsADirectoryError: a directory without an index file.
        AmbiguousIndexError: a directory with several index files and no rule to choose.
        CheckpointPermissionError: the file can not be read.
        NotARegularFileError: a FIFO, socket or device (checked before anything is opened).
    """
    path = check_path(path)
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, DCP_METADATA)):
            return _sniff_dcp(path)
        return _sniff_directory(path)
    if os.path.basename(path) == DCP_METADATA:
        return _sniff_dcp(os.path.dirname(os.path.abspath(path)))
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(HEAD_BYTES)
    return _sniff_content(path, head, size)


def _sniff_dcp(directory: str) -> Sniffed:
    metadata = os.path.join(directory, DCP_METADATA)
    with open_regular(metadata, what="DCP metadata") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(2)
    if head[:1] != b"\x80":
        return Sniffed(
            directory,
            Format.CORRUPT,
            size,
            f"a torch.distributed.checkpoint directory whose {DCP_METADATA} is not a pickle "
            f"({'empty' if size == 0 else f'{size:,} bytes'})",
            hint="copy the whole directory again (its .metadata and every __*.distcp file)",
        )
    return Sniffed(
        directory,
        Format.DCP,
        size,
        "a torch.distributed.checkpoint (DCP) directory",
        index_path=metadata,
    )


def _sniff_directory(path: str) -> Sniffed:
    # The sharded loader's rule decides which index a directory means (and raises when it
    # holds none, or several equally good ones).
    index_path = find_index(path)
    index = os.path.basename(index_path)
    sniffed = sniff(index_path)
    if sniffed.format is not Format.SHARDED:
        return sniffed
    return Sniffed(
        path,
        Format.SHARDED,
        sniffed.size,
        f"a directory of checkpoint shards indexed by {index!r}",
        index_path=index_path,
    )


def _sniff_content(path: str, head: bytes, size: int) -> Sniffed:
    def corrupt(looks_like: str, hint: str | None = None) -> Sniffed:
        return Sniffed(path, Format.CORRUPT, size, looks_like, hint)

    if size == 0:
        return corrupt("an empty file (0 bytes)")
    # safetensors first: its first byte is the low byte of the header length, which can be
    # anything (0x80, "P", "{"); the length must also be plausible.
    header_len = safetensors_header_length(head)
    if header_len is not None:
        return _sniff_safetensors(path, header_len, size)
    if head.startswith(b"PK\x03\x04"):
        return _sniff_zip(path, size)
    if head.startswith(b"PK\x05\x06"):
        return corrupt("an empty zip archive")
    if head[:1] == b"\x80" and len(head) >= 2:
        return _sniff_pickle(path, head, size)
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if text.startswith((b"<!doctype html", b"<html", b"<head", b"<body")):
        return corrupt(
            "an HTML page (often a login or error page saved in place of the checkpoint)",
            hint="check the URL or credentials it was downloaded with, then download it again "
            "(and delete that download cache entry)",
        )
    if text.startswith(b"<?xml") or text.startswith(b"<error"):
        return corrupt(
            "an XML document (often an S3 or HTTP error response saved as the checkpoint)",
            hint="check the URL, bucket, key and credentials, then download it again (and "
            "delete that download cache entry)",
        )
    if text.startswith(b"version https://git-lfs"):
        return corrupt(
            "a Git LFS pointer file, not the checkpoint it points to",
            hint="fetch the real file with `git lfs pull` (or download it directly)",
        )
    if text.startswith(b"{"):
        return _sniff_json(path, size)
    if len(head) >= 9 and head[8:].lstrip(JSON_WHITESPACE)[:1] == b"{":
        length = struct.unpack("<Q", head[:8])[0]
        return corrupt(
            f"a damaged safetensors file (its header length field says {length:,} bytes)"
        )
    if head.startswith(b"\x1f\x8b"):
        return corrupt("gzip-compressed data", hint="decompress it (gunzip) and load the result")
    if len(head) >= 262 and head[257:262] == b"ustar":
        # torch.save before 0.4 wrote a tar archive; torch.load still reads it.
        return Sniffed(path, Format.TORCH_LEGACY, size, "a legacy (tar) torch checkpoint")
    if head[:1] in b"(}]" and size <= HEAD_BYTES and _is_whole_pickle(head):
        return Sniffed(
            path, Format.PICKLE, size, "a plain Python pickle (protocol 0/1)", pickle_protocol=0
        )
    if len(head) < 9 and len(head) >= 1:
        return corrupt(f"a {size}-byte fragment (too short for any checkpoint format)")
    return corrupt(f"unrecognised data (first bytes {head[:16]!r})")


def _sniff_zip(path: str, size: int) -> Sniffed:
    import torch

    from ckptmap._core import PthFormatError, PthReader

    try:
        # ckptmap's zip reader: the same list as torch's, without building torch's reader.
        records: list[str] | None = PthReader.records(path)
    except PthFormatError:
        records = None
    if records is None or "data.pkl" not in records:
        # torch's reader decides what other archives look like.
        try:
            reader = torch._C.PyTorchFileReader(path)
            records = reader.get_all_records()
            del reader
        except (RuntimeError, UnicodeDecodeError):  # a member name that is not UTF-8
            return _sniff_foreign_zip(path, size)
    if "constants.pkl" in records or any(r.startswith("code/") for r in records):
        return Sniffed(path, Format.TORCHSCRIPT, size, "a TorchScript archive (torch.jit.save)")
    if "data.pkl" in records:
        return Sniffed(path, Format.TORCH_ZIP, size, "a torch.save zip checkpoint")
    return Sniffed(
        path,
        Format.CORRUPT,
        size,
        "a zip archive without data.pkl (not written by torch.save)",
        hint="check that this is the checkpoint file you meant",
    )


def _sniff_foreign_zip(path: str, size: int) -> Sniffed:
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        return Sniffed(
            path,
            Format.CORRUPT,
            size,
            "a truncated or damaged zip archive (the format torch.save writes): its central "
            "directory can not be read",
        )
    shown = ", ".join(repr(n) for n in names[:5]) + (", ..." if len(names) > 5 else "")
    return Sniffed(
        path,
        Format.CORRUPT,
        size,
        f"a zip archive that torch.save did not write (it holds {shown or 'nothing'})",
        hint="unpack it and load the checkpoint inside, or check that this is the file you meant",
    )


def _sniff_pickle(path: str, head: bytes, size: int) -> Sniffed:
    protocol = head[1]
    if protocol > 5:
        return Sniffed(path, Format.CORRUPT, size, f"unrecognised data (first bytes {head[:16]!r})")
    body = head[2:]
    if body.startswith(LEGACY_MAGIC):
        return Sniffed(
            path,
            Format.TORCH_LEGACY,
            size,
            "a legacy (non-zip) torch.save checkpoint",
            pickle_protocol=protocol,
        )
    if size < 2 + len(LEGACY_MAGIC) and LEGACY_MAGIC.startswith(body):
        return Sniffed(
            path,
            Format.CORRUPT,
            size,
            "a truncated legacy torch checkpoint",
            pickle_protocol=protocol,
        )
    return Sniffed(
        path,
        Format.PICKLE,
        size,
        f"a plain Python pickle (protocol {protocol}), not written by torch.save",
        pickle_protocol=protocol,
    )


def _sniff_safetensors(path: str, header_len: int, size: int) -> Sniffed:
    if 8 + header_len > size:
        return Sniffed(
            path,
            Format.CORRUPT,
            size,
            f"a truncated safetensors file (its header alone needs {8 + header_len:,} bytes)",
        )
    return Sniffed(path, Format.SAFETENSORS, size, "a safetensors file")


def _sniff_json(path: str, size: int) -> Sniffed:
    # A classifier, not the index reader: a JSON object with a "weight_map" object is a shard
    # index here; `ckptmap.formats.index` checks the rest (and raises InvalidShardIndexError).
    def corrupt(looks_like: str) -> Sniffed:
        return Sniffed(
            path,
            Format.CORRUPT,
            size,
            looks_like,
            hint="pass a checkpoint, or the *.index.json of a sharded checkpoint",
        )

    if size > MAX_INDEX_BYTES:
        return corrupt(f"a JSON document of {size:,} bytes, too large for a shard index")
    try:
        with open_regular(path) as f:
            doc = json.loads(f.read())
    except RecursionError:
        return Sniffed(path, Format.CORRUPT, size, "a JSON document nested too deeply to read")
    except (ValueError, UnicodeDecodeError):
        return Sniffed(path, Format.CORRUPT, size, "a truncated or malformed JSON document")
    if isinstance(doc, dict) and isinstance(doc.get("weight_map"), dict):
        return Sniffed(path, Format.SHARDED, size, "a shard index (*.index.json)", index_path=path)
    return corrupt("a JSON document without a 'weight_map' (not a shard index)")


def _is_whole_pickle(data: bytes) -> bool:
    import pickletools

    try:
        for opcode, _arg, _pos in pickletools.genops(data):
            if opcode.name == "STOP":
                return True
    except Exception:
        return False
    return False
