"""The central directory of a zip archive (a ``torch.save`` checkpoint), read without touching
its members.

`read_zip_directory` reads the end-of-central-directory record (and its zip64 twin) from the
file's tail and then the central directory itself: names, compression methods, sizes and
offsets of every member. No member is read or decompressed, so judging an archive costs a few
reads near its end, whatever its size; a zip bomb or a 100 GB checkpoint costs the same.

The archive must be the way ``torch.save`` (and Python's `zipfile`) write one: a single
disk, the central directory ending exactly where the end records begin, and the end records
ending exactly at the end of the file (after an optional comment). A file cut short by a
killed write has no end record where it must be, so it is reported as incomplete.
"""

from __future__ import annotations

import gc
import os
import struct
import zlib
from dataclasses import dataclass
from typing import BinaryIO, NamedTuple

from ckptmap.errors import ZipDirectoryError

__all__ = [
    "MAX_DIRECTORY_BYTES",
    "MAX_INFLATED_BYTES",
    "MAX_INFLATE_RATIO",
    "ZipDirectory",
    "ZipDirectoryError",
    "ZipEntry",
    "read_stored",
    "read_zip_directory",
]

#: A central directory larger than this is refused (a million members take about 80 MB).
MAX_DIRECTORY_BYTES = 512 * 1024 * 1024
#: A compressed member may always declare this many inflated bytes...
MAX_INFLATED_BYTES = 64 * 1024 * 1024
#: ...or this many times its compressed size, whichever is larger (``torch.save`` never
#: compresses; deflate can reach about 1000:1, which is how zip bombs are made).
MAX_INFLATE_RATIO = 16

_EOCD = struct.Struct(
    "<4s4H2LH"
)  # signature, disk, cd disk, entries here, entries, size, offset, comment
_LOCATOR = struct.Struct("<4sLQL")  # signature, disk of zip64 EOCD, its offset, disk count
_EOCD64 = struct.Struct("<4sQ2H2L4Q")  # signature, size, versions, disks, entries x2, size, offset
_ENTRY = struct.Struct("<4s6H3L5H2L")  # the fixed part of a central directory entry
_EOCD_SIG = b"PK\x05\x06"
_LOCATOR_SIG = b"PK\x06\x07"
_EOCD64_SIG = b"PK\x06\x06"
_ENTRY_SIG = b"PK\x01\x02"
_MAX_COMMENT = 0xFFFF
_ZIP64_EXTRA = 0x0001


class ZipEntry(NamedTuple):
    """One member as the central directory describes it.

    Attributes:
        name: the member's name (UTF-8; bytes that do not decode are escaped).
        method: the compression method (0 stored, 8 deflated, ...).
        crc: the CRC-32 of its uncompressed bytes.
        compressed_size: bytes the member takes in the archive.
        size: bytes it inflates to (as declared; a decompressor that trusts it is bounded).
        header_offset: where its local header starts.
    """

    name: str
    method: int
    crc: int
    compressed_size: int
    size: int
    header_offset: int

    @property
    def compressed(self) -> bool:
        """Whether reading the member means inflating it."""
        return self.method != 0

    @property
    def inflation_limit(self) -> int:
        """The most bytes this member may declare (see `MAX_INFLATED_BYTES`)."""
        return max(MAX_INFLATED_BYTES, MAX_INFLATE_RATIO * self.compressed_size)

    @property
    def too_inflated(self) -> bool:
        """Compressed, and declaring more than `inflation_limit` bytes: a zip bomb."""
        return self.compressed and self.size > self.inflation_limit


@dataclass(frozen=True)
class ZipDirectory:
    """What the central directory says.

    Attributes:
        entries: every member, in directory order.
        directory_offset: where the central directory starts (members lie before it).
        directory_size: its size in bytes.
        file_size: the archive's size.
    """

    entries: list[ZipEntry]
    directory_offset: int
    directory_size: int
    file_size: int


def _read_at(f: BinaryIO, offset: int, size: int) -> bytes:
    f.seek(offset)
    data = f.read(size)
    if len(data) != size:
        raise ZipDirectoryError(f"the file ends before byte {offset + size:,}")
    return data


def _find_end_record(tail: bytes, tail_start: int, file_size: int, strict: bool) -> int:
    """The offset of the last EOCD record; when `strict`, its comment must end the file."""
    position = len(tail) - _EOCD.size
    while position >= 0:
        position = tail.rfind(_EOCD_SIG, 0, position + len(_EOCD_SIG))
        if position < 0:
            break
        comment_len = struct.unpack_from("<H", tail, position + 20)[0]
        if not strict or tail_start + position + _EOCD.size + comment_len == file_size:
            return tail_start + position
        position -= 1
    raise ZipDirectoryError(
        "no end-of-central-directory record at the end of the file (cut short by an "
        "interrupted write, or not a zip archive)"
    )


def read_zip_directory(
    f: BinaryIO, *, strict: bool = True, max_directory_bytes: int = MAX_DIRECTORY_BYTES
) -> ZipDirectory:
    """Reads the end records and the central directory of the zip archive open as `f`.

    Args:
        f: the archive, opened for binary reading (seekable).
        strict: the end record (and its comment) must end the file, as it does in an archive
            written to the end. False accepts trailing bytes after it, as zip readers
            (torch's included) do.
        max_directory_bytes: refuse a central directory larger than this.

    Returns:
        The directory. Members are not read.

    Raises:
        ZipDirectoryError: no end record at the end of the file, a multi-disk archive, or a
            directory that is inconsistent with the end records or the file size.
    """
    file_size = os.fstat(f.fileno()).st_size
    tail_len = min(file_size, _EOCD.size + _MAX_COMMENT + _LOCATOR.size)
    tail_start = file_size - tail_len
    tail = _read_at(f, tail_start, tail_len)
    eocd = _find_end_record(tail, tail_start, file_size, strict)
    _, disk, cd_disk, here, count, cd_size, cd_offset, _ = _EOCD.unpack_from(
        tail, eocd - tail_start
    )
    directory_end = eocd
    locator_at = eocd - _LOCATOR.size
    has_locator = (
        locator_at >= tail_start
        and tail[locator_at - tail_start : locator_at - tail_start + 4] == _LOCATOR_SIG
    )
    if has_locator:  # zip64 end records (torch.save always writes them)
        _, _, eocd64, _ = _LOCATOR.unpack_from(tail, locator_at - tail_start)
        if eocd64 + _EOCD64.size > locator_at:
            raise ZipDirectoryError("a zip64 archive whose zip64 end-record locator is damaged")
        fields = _EOCD64.unpack(_read_at(f, eocd64, _EOCD64.size))
        signature, _, _, _, disk, cd_disk, here, count, cd_size, cd_offset = fields
        if signature != _EOCD64_SIG:
            raise ZipDirectoryError("a zip64 archive whose zip64 end record is missing")
        directory_end = eocd64
    elif 0xFFFF in (disk, cd_disk, here, count) or 0xFFFFFFFF in (cd_size, cd_offset):
        raise ZipDirectoryError("a zip64 archive without its zip64 end-record locator")
    if disk != 0 or cd_disk != 0 or here != count:
        raise ZipDirectoryError("a multi-disk (split) zip archive")
    if cd_offset + cd_size != directory_end:
        raise ZipDirectoryError(
            f"the central directory ({cd_size:,} bytes at {cd_offset:,}) does not end where the "
            f"end record begins ({directory_end:,}): the file was cut or rewritten"
        )
    if cd_size > max_directory_bytes:
        raise ZipDirectoryError(f"a central directory of {cd_size:,} bytes (too large)")
    data = _read_at(f, cd_offset, cd_size)
    # One small object per member: the collector would rescan them all again and again.
    collecting = gc.isenabled()
    gc.disable()
    try:
        entries = _parse_entries(data, count, cd_offset)
    finally:
        if collecting:
            gc.enable()
    return ZipDirectory(entries, cd_offset, cd_size, file_size)


def _parse_entries(data: bytes, count: int, cd_offset: int) -> list[ZipEntry]:
    entries: list[ZipEntry] = []
    position = 0
    unpack = _ENTRY.unpack_from
    fixed = _ENTRY.size
    for _ in range(count):
        if position + fixed > len(data):
            raise ZipDirectoryError("the central directory ends before its last entry")
        (sig, _, _, _, method, _, _, crc, csize, usize, name_len, extra_len, comment_len, _, _, _,
         offset) = unpack(data, position)  # fmt: skip
        if sig != _ENTRY_SIG:
            raise ZipDirectoryError(f"a damaged central directory entry at byte {position:,}")
        start = position + fixed
        end = start + name_len + extra_len + comment_len
        if end > len(data):
            raise ZipDirectoryError("the central directory ends inside an entry")
        name = data[start : start + name_len].decode("utf-8", "backslashreplace")
        if 0xFFFFFFFF in (csize, usize, offset):
            extra = data[start + name_len : start + name_len + extra_len]
            usize, csize, offset = _zip64_sizes(extra, usize, csize, offset)
        if offset + csize > cd_offset:
            raise ZipDirectoryError(
                f"member {name!r} claims bytes past the start of the central directory"
            )
        entries.append(ZipEntry(name, method, crc, csize, usize, offset))
        position = end
    if position != len(data):
        raise ZipDirectoryError("the central directory holds more entries than the end record says")
    return entries


def read_stored(f: BinaryIO, entry: ZipEntry) -> bytes:
    """The bytes of a stored (uncompressed) member, checked against its CRC-32.

    Raises:
        ZipDirectoryError: the member is compressed, its local header is damaged, or its
            bytes do not match the CRC (e.g. zeros left by a crash).
    """
    if entry.compressed:
        raise ZipDirectoryError(f"member {entry.name!r} is compressed; it is not inflated here")
    header = _read_at(f, entry.header_offset, 30)
    if header[:4] != b"PK\x03\x04":
        raise ZipDirectoryError(f"the local header of member {entry.name!r} is damaged")
    name_len, extra_len = struct.unpack_from("<2H", header, 26)
    data = _read_at(f, entry.header_offset + 30 + name_len + extra_len, entry.compressed_size)
    if zlib.crc32(data) != entry.crc:
        raise ZipDirectoryError(f"member {entry.name!r} does not match its CRC-32 (damaged)")
    return data


def _zip64_sizes(extra: bytes, usize: int, csize: int, offset: int) -> tuple[int, int, int]:
    position = 0
    while position + 4 <= len(extra):
        tag, size = struct.unpack_from("<2H", extra, position)
        body = extra[position + 4 : position + 4 + size]
        if tag == _ZIP64_EXTRA:
            values = [v[0] for v in struct.iter_unpack("<Q", body[: len(body) // 8 * 8])]
            out = []
            for field in (usize, csize, offset):
                if field == 0xFFFFFFFF:
                    if not values:
                        raise ZipDirectoryError("a zip64 entry without its 64-bit sizes")
                    field = values.pop(0)
                out.append(field)
            return out[0], out[1], out[2]
        position += 4 + size
    raise ZipDirectoryError("a zip64 entry without its 64-bit sizes")
