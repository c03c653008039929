"""Was this checkpoint file written (or downloaded) to its end? Judged from its structure alone.

`incomplete_reason(f)` looks at the structure each format ends with, never at tensor data and
never decompressing anything, so the answer costs a few reads near the file's end:

- a torch zip: its end records must end the file, its central directory must be consistent
  with them, declare no zip bomb (`ckptmap.zipdir.ZipEntry.too_inflated`) and name one
  ``data.pkl`` (which is CRC-checked when it is stored uncompressed and
  small, as torch writes it);
- safetensors: the Rust reader validates the header and that the data ends exactly at the end
  of the file;
- anything else (legacy torch pickles, plain pickles): nothing cheap proves where they end,
  so they pass.

The work-dir scan (`ckptmap.latest`) and the download cache (`ckptmap.cache`, for bodies sent
without a Content-Length and for entries already on disk) both judge files this way. This
module does not import torch.
"""

from __future__ import annotations

from typing import BinaryIO

from ckptmap._core import SafetensorsHeader, SafetensorsHeaderError
from ckptmap.magic import only_whitespace_so_far, safetensors_header_length
from ckptmap.zipdir import ZipDirectoryError, read_stored, read_zip_directory

__all__ = ["MAX_CRC_CHECKED_PICKLE", "SNIFF_BYTES", "incomplete_reason", "read_head"]

#: Bytes read from the start to tell the format...
SNIFF_BYTES = 4096
#: ...or up to this many while they are a header length followed by whitespace only.
MAX_HEAD_BYTES = 1 << 20
#: A stored ``data.pkl`` up to this size has its CRC checked (torch's pickles take about 100
#: bytes per tensor); a larger or compressed one is judged by the central directory alone.
MAX_CRC_CHECKED_PICKLE = 16 * 1024 * 1024


def incomplete_reason(f: BinaryIO, path: str) -> str | None:
    """Why the checkpoint open as `f` is not complete, or None when its structure is whole.

    Args:
        f: the file, open for binary reading (seekable).
        path: its name, for messages.

    Returns:
        A short reason ("the zip archive has no end record ...") or None. Formats whose end
        can not be told cheaply (pickles) return None.
    """
    head = read_head(f)
    if not head:
        return "it is empty"
    if head.startswith(b"PK\x03\x04"):
        try:
            return _zip_reason(f)
        except ZipDirectoryError as err:
            return f"its zip structure is not whole ({err})"
    if safetensors_header_length(head) is not None:
        try:
            # Maps the header only, transiently; no tensor byte is read.
            SafetensorsHeader.from_fd(f.fileno(), path)
        except SafetensorsHeaderError as err:
            return f"its safetensors header does not match its size ({err.kind}: {err.detail})"
        return None
    return None


def read_head(f: BinaryIO) -> bytes:
    """The first bytes of `f`: enough to tell its format (see `SNIFF_BYTES`)."""
    f.seek(0)
    head = f.read(SNIFF_BYTES)
    while only_whitespace_so_far(head) and len(head) < MAX_HEAD_BYTES:
        more = f.read(min(len(head), MAX_HEAD_BYTES - len(head)))
        if not more:
            break
        head += more
    return head


def _zip_reason(f: BinaryIO) -> str | None:
    directory = read_zip_directory(f, strict=True)
    for entry in directory.entries:
        if entry.too_inflated:
            return f"its member {entry.name!r} would inflate to {entry.size:,} bytes (a zip bomb)"
    pickles = [e for e in directory.entries if e.name == "data.pkl" or e.name.endswith("/data.pkl")]
    if len(pickles) != 1:
        return f"the zip archive holds {len(pickles)} data.pkl members, not 1"
    pickle = pickles[0]
    if pickle.compressed or pickle.compressed_size > MAX_CRC_CHECKED_PICKLE:
        f.seek(pickle.header_offset)
        if f.read(4) != b"PK\x03\x04":
            return "the local header of data.pkl is damaged"
        return None
    # Small and stored as it is: its CRC catches zeros a crash left in its place.
    read_stored(f, pickle)
    return None
