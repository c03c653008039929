"""What the Rust engine's exact form of a key rule asks of this interpreter's `re`.

A native rule's fast form is exact on ASCII keys; for other keys it runs an exact form whose
character classes are spelled out as the code points *this* interpreter's `re` matches (so
Python's Unicode version and its definitions of `\\w`, `\\d`, `\\s` and case-insensitive
matching decide, not the `regex` crate's tables). The Rust side calls these functions the
first time a rule meets a key that needs them, and caches the answers for the process.

Ranges are inclusive `(first, last)` code points, sorted.
"""

from __future__ import annotations

import array
import functools
import re
import sys
import warnings

_CATEGORIES = {"word": r"\w", "digit": r"\d", "space": r"\s"}
_CHUNK = 512


@functools.cache
def _every_char() -> str:
    """Every code point, in order (the index of a character is its code point)."""
    # UTF-32-LE, one plane at a time: the BMP's bytes with the plane number as third byte
    # (a million Python ints would take a tenth of a second).
    bmp = array.array("I", range(0x10000))
    if sys.byteorder == "big":
        bmp.byteswap()
    plane = bytearray(bmp.tobytes())
    planes = []
    for number in range(17):
        plane[2::4] = bytes([number]) * 0x10000
        planes.append(bytes(plane))
    return b"".join(planes).decode("utf-32-le", "surrogatepass")


def _runs(pattern: re.Pattern[str], text: str) -> list[tuple[int, int]]:
    return [(m.start(), m.end() - 1) for m in pattern.finditer(text)]


def category(name: str) -> list[tuple[int, int]]:
    """The code points `re` matches with `\\w`, `\\d` or `\\s` (Unicode), by one scan."""
    return _runs(re.compile(f"(?:{_CATEGORIES[name]})+"), _every_char())


@functools.cache
def _cased() -> tuple[int, ...]:
    every = _every_char()
    out: list[int] = []
    for start in range(0, len(every), _CHUNK):
        chunk = every[start : start + _CHUNK]
        if chunk.lower() == chunk and chunk.upper() == chunk and chunk.casefold() == chunk:
            continue
        out += [ord(c) for c in chunk if c.lower() != c or c.upper() != c or c.casefold() != c]
    return tuple(out)


def cased() -> list[tuple[int, int]]:
    """The code points whose case mapping (full or simple) is not themselves: every character
    that `re.IGNORECASE` can relate to another one is among them."""
    return [(c, c) for c in _cased()]


def icase(source: str, ascii: bool) -> list[tuple[int, int]]:
    """Among `cased()`, the code points `re` matches with the one-character pattern `source`
    (a literal or a class, as written) under `re.IGNORECASE` (and `re.ASCII`)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # FutureWarning for `[[` and friends in classes
        pattern = re.compile(("(?ai)" if ascii else "(?i)") + "(?:" + source + ")")
    return [(c, c) for c in _cased() if pattern.fullmatch(chr(c))]
