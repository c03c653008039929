"""safetensors files written byte by byte, for the header tests (tests/core/, no torch) and
the loader tests (tests/test_safetensors.py): the bad-header cases of RELIABILITY.md ("Safetensors
headers"), a few valid files, and the builders behind them. Every case is also a seed of the fuzz
target: `python tests/safetensors_cases.py fuzz/corpus/header` rewrites `fuzz/corpus/header/`,
and tests/core/test_safetensors_header.py checks that the committed corpus matches.
"""

from __future__ import annotations

import json
import struct
import sys
from collections.abc import Mapping
from pathlib import Path

CORPUS = Path(__file__).resolve().parent.parent / "fuzz" / "corpus" / "header"


def encode(
    tensors: Mapping[str, tuple[str, list[int], bytes]],
    *,
    layout: list[str] | None = None,
    pad: int = 0,
    metadata: dict[str, str] | None = None,
) -> bytes:
    """A safetensors file from `name -> (dtype, shape, raw bytes)`: header in `tensors` order,
    data in `layout` order, the header padded with `pad` spaces (which can misalign the data)."""
    offsets: dict[str, tuple[int, int]] = {}
    data = bytearray()
    for name in layout if layout is not None else list(tensors):
        b = tensors[name][2]
        offsets[name] = (len(data), len(data) + len(b))
        data += b
    header: dict[str, object] = {}
    if metadata is not None:
        header["__metadata__"] = metadata
    for name, (dtype, shape, _) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": list(offsets[name])}
    text = json.dumps(header).encode() + b" " * pad
    return struct.pack("<Q", len(text)) + text + bytes(data)


def raw(header: str | bytes, data: bytes = b"", length: int | None = None) -> bytes:
    """A file with exactly this header text and data (and optionally a lying length)."""
    text = header.encode() if isinstance(header, str) else header
    return struct.pack("<Q", len(text) if length is None else length) + text + data


def entry(dtype: str = "U8", shape: object = (4,), offsets: object = (0, 4)) -> str:
    return json.dumps(
        {"dtype": dtype, "shape": list(shape) if isinstance(shape, tuple) else shape}
        | {"data_offsets": list(offsets) if isinstance(offsets, tuple) else offsets}
    )


def one(**kw: object) -> str:
    return '{"t":' + entry(**kw) + "}"  # type: ignore[arg-type]


# (id, file bytes, expected kind)
BAD_FILES: list[tuple[str, bytes, str]] = [
    ("empty_file", b"", "file_too_small"),
    ("seven_bytes", b"\x08\x00\x00\x00\x00\x00\x00", "file_too_small"),
    ("header_len_zero", raw(b"", b"{}"), "empty_header"),
    ("header_len_zero_only", struct.pack("<Q", 0), "empty_header"),
    ("header_len_u64_max", raw("{}", length=2**64 - 1), "header_too_large"),
    ("header_len_over_cap", raw("{}", length=100_000_001), "header_too_large"),
    ("header_len_past_eof", raw("{}", length=3), "header_past_eof"),
    ("header_len_just_under_cap_past_eof", raw("{}", length=100_000_000), "header_past_eof"),
    ("not_utf8", raw(b'{"\xff\xfe":1}'), "not_utf8"),
    ("not_json", raw("{not json"), "not_json"),
    ("json_trailing_text", raw("{} {}"), "not_json"),
    ("json_list", raw("[]"), "not_an_object"),
    ("json_number", raw("42"), "not_an_object"),
    ("json_string", raw('"x"'), "not_an_object"),
    ("metadata_int_value", raw('{"__metadata__":{"a":1}}'), "invalid_metadata"),
    ("metadata_nested_value", raw('{"__metadata__":{"a":{"b":"c"}}}'), "invalid_metadata"),
    ("metadata_list", raw('{"__metadata__":["a"]}'), "invalid_metadata"),
    ("unknown_dtype", raw(one(dtype="F128")), "unknown_dtype"),
    ("lowercase_dtype", raw(one(dtype="f32", shape=(1,)), bytes(4)), "unknown_dtype"),
    ("missing_dtype", raw('{"t":{"shape":[1],"data_offsets":[0,1]}}', b"\0"), "missing_field"),
    ("missing_shape", raw('{"t":{"dtype":"U8","data_offsets":[0,1]}}', b"\0"), "missing_field"),
    ("missing_offsets", raw('{"t":{"dtype":"U8","shape":[1]}}', b"\0"), "missing_field"),
    ("entry_not_object", raw('{"t":[1,2]}'), "invalid_entry"),
    ("offsets_length_1", raw(one(offsets=[0]), bytes(4)), "invalid_offsets"),
    ("offsets_length_3", raw(one(offsets=[0, 4, 8]), bytes(4)), "invalid_offsets"),
    ("offsets_negative", raw(one(offsets=[-4, 0]), bytes(4)), "invalid_offsets"),
    ("offsets_float", raw(one(offsets=[0, 4.0]), bytes(4)), "invalid_offsets"),
    ("offsets_huge", raw(one(offsets=[0, 2**64]), bytes(4)), "invalid_offsets"),
    ("offsets_string", raw(one(offsets=["0", "4"]), bytes(4)), "invalid_offsets"),
    ("shape_negative", raw(one(shape=[-4]), bytes(4)), "invalid_shape"),
    ("shape_float", raw(one(shape=[4.0]), bytes(4)), "invalid_shape"),
    ("shape_huge", raw(one(shape=[2**64]), bytes(4)), "invalid_shape"),
    ("shape_overflow", raw(one(shape=[2**32, 2**32], offsets=[0, 4])), "size_overflow"),
    ("shape_times_dtype_overflow", raw(one(dtype="F64", shape=[2**61])), "size_overflow"),
    ("end_before_begin", raw(one(shape=[0], offsets=[4, 0]), bytes(4)), "offsets_reversed"),
    ("size_mismatch", raw(one(dtype="F32", shape=[2], offsets=[0, 4]), bytes(4)), "size_mismatch"),
    (
        "overlap",
        raw('{"a":' + entry() + ',"b":' + entry(offsets=(2, 6)) + "}", bytes(6)),
        "overlap",
    ),
    (
        "same_bytes_twice",
        raw('{"a":' + entry() + ',"b":' + entry() + "}", bytes(4)),
        "overlap",
    ),
    ("hole", raw('{"a":' + entry() + ',"b":' + entry(offsets=(8, 12)) + "}", bytes(12)), "hole"),
    ("hole_at_start", raw(one(offsets=(2, 6)), bytes(6)), "hole"),
    ("data_truncated", raw(one(), bytes(3)), "data_truncated"),
    ("data_missing", raw(one()), "data_truncated"),
    ("trailing_bytes", raw(one(), bytes(5)), "trailing_bytes"),
    ("trailing_bytes_no_tensors", raw("{}", b"junk"), "trailing_bytes"),
    (
        "duplicate_name",
        raw('{"t":' + entry() + ',"t":' + entry() + "}", bytes(4)),
        "duplicate_name",
    ),
    (
        "duplicate_name_escaped",
        raw('{"t":' + entry() + ',"\\u0074":' + entry() + "}", bytes(4)),
        "duplicate_name",
    ),
    ("duplicate_metadata", raw('{"__metadata__":{},"__metadata__":{}}'), "duplicate_name"),
    ("deep_nesting", raw("[" * 10_000 + "]" * 10_000), "not_an_object"),
]

# Valid files that are also seeds: the fuzzer mutates these into near misses.
GOOD_SEEDS: list[tuple[str, bytes]] = [
    ("good_empty", raw("{}")),
    (
        "good_two_dtypes",
        encode(
            {
                "w": ("F32", [2, 2], struct.pack("<4f", 1, 1, 1, 1)),
                "b": ("BF16", [3], bytes(6)),
            },
            pad=5,
        ),
    ),
    ("good_metadata", encode({"x": ("I8", [3], bytes([0, 1, 2]))}, metadata={"format": "pt"})),
    (
        "good_scalar_and_empty",
        encode({"s": ("F32", [], struct.pack("<f", 1.5)), "e": ("F32", [0, 3], b"")}),
    ),
]


def corpus_files() -> dict[str, bytes]:
    """The fuzz seed corpus: one file per case above."""
    cases = [(name, data) for name, data, _ in BAD_FILES] + GOOD_SEEDS
    return {f"{name}.safetensors": data for name, data in cases}


if __name__ == "__main__":
    # Rewrites the fuzz seed corpus: python tests/safetensors_cases.py fuzz/corpus/header
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.iterdir():
        stale.unlink()
    for name, data in corpus_files().items():
        (out / name).write_bytes(data)
