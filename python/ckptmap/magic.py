"""Magic bytes: what the first bytes of a file say about its format (no torch).

Shared by the file sniffer (`ckptmap.formats.sniff`), the download-body sniffer
(`ckptmap.cache`) and the work-dir scan (`ckptmap.latest`), so the three agree on what a
checkpoint looks like.
"""

from __future__ import annotations

from ckptmap._core import MAX_SAFETENSORS_HEADER_LEN

__all__ = [
    "JSON_WHITESPACE",
    "MAX_SAFETENSORS_HEADER",
    "checkpoint_kind",
    "only_whitespace_so_far",
    "safetensors_header_length",
]

#: The safetensors reference implementation's cap on the JSON header (the Rust reader's).
MAX_SAFETENSORS_HEADER = MAX_SAFETENSORS_HEADER_LEN
#: The bytes JSON allows around values (RFC 8259): a header may start with them.
JSON_WHITESPACE = b" \t\n\r"


def safetensors_header_length(head: bytes) -> int | None:
    """The header length if `head` (a file's first bytes) starts like a safetensors file.

    A safetensors file starts with a little-endian u64 header length (at least 2, at most
    `MAX_SAFETENSORS_HEADER`) and a JSON object; the JSON may start with whitespace, which
    the safetensors readers accept. Returns None when `head` does not start that way, or
    when it holds only whitespace after the length (too little to tell).
    """
    if len(head) < 9:
        return None
    header_len = int.from_bytes(head[:8], "little")
    if not 2 <= header_len <= MAX_SAFETENSORS_HEADER:
        return None
    json_start = head[8 : 8 + header_len].lstrip(JSON_WHITESPACE)
    return header_len if json_start[:1] == b"{" else None


def only_whitespace_so_far(head: bytes) -> bool:
    """Whether `head` is a plausible header length followed by nothing but whitespace: more
    bytes are needed to tell whether it is a safetensors file."""
    if len(head) < 9 or head[8:].lstrip(JSON_WHITESPACE):
        return False
    return 2 <= int.from_bytes(head[:8], "little") <= MAX_SAFETENSORS_HEADER


def checkpoint_kind(head: bytes) -> str | None:
    """What kind of checkpoint a file's first bytes belong to: "safetensors", "zip" (what
    torch.save writes), "pickle" (torch.save's legacy format: protocol 2 or later) or None.

    safetensors is tried first: its first byte is the low byte of the header length, which may
    be 0x80 or "P" (a 640-byte header starts ``80 02``, like a pickle), and the JSON object that
    must follow makes the test specific.
    """
    if safetensors_header_length(head) is not None:
        return "safetensors"
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "pickle"
    return None
