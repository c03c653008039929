"""A safetensors header validated from its bytes and the file size alone (what a remote read has):
`SafetensorsHeader.header_length` and `from_header` against `SafetensorsHeader.parse` of the
whole file, on files safetensors writes and on the fuzz corpus of broken ones."""

from __future__ import annotations

from pathlib import Path

import pytest
import safetensors.torch
import torch
from hypothesis import given
from hypothesis import strategies as st

from ckptmap._core import MAX_SAFETENSORS_HEADER_LEN, SafetensorsHeader, SafetensorsHeaderError

CORPUS = Path(__file__).parent.parent / "fuzz" / "corpus" / "header"
COLUMNS = (
    "names",
    "dtypes",
    "shapes",
    "byte_ranges",
    "metadata",
    "data_offset",
    "header_len",
    "file_size",
)


def in_pieces(data: bytes) -> SafetensorsHeader:
    """What a reader by byte range does: the 8-byte length, then the header, and the size."""
    n = SafetensorsHeader.header_length(data[:8], len(data), "remote")
    return SafetensorsHeader.from_header(data[8 : 8 + n], len(data), "remote")


def outcome(parse, data: bytes):
    try:
        header = parse(data)
    except SafetensorsHeaderError as err:
        return ("error", err.kind, err.detail)
    return ("ok", *(getattr(header, c) for c in COLUMNS))


@pytest.mark.parametrize("name", sorted(p.name for p in CORPUS.iterdir()))
def test_broken_and_good_files_give_the_same_answer_either_way(name):
    data = (CORPUS / name).read_bytes()
    if len(data) < 8:
        with pytest.raises(ValueError, match="8 bytes"):
            SafetensorsHeader.header_length(data, len(data))
        with pytest.raises(SafetensorsHeaderError) as info:
            SafetensorsHeader.header_length(data.ljust(8, b"\0"), len(data))
        assert info.value.kind == "file_too_small"
        return
    assert outcome(in_pieces, data) == outcome(SafetensorsHeader.parse, data)


dtypes = st.sampled_from([torch.float32, torch.bfloat16, torch.int64, torch.uint8, torch.bool])


@given(
    st.dictionaries(
        st.text("abc.é", min_size=1, max_size=6).filter(lambda s: s != "__metadata__"),
        st.tuples(dtypes, st.lists(st.integers(0, 3), max_size=3)),
        max_size=8,
    ),
    st.dictionaries(st.text(max_size=4), st.text(max_size=4), max_size=3),
)
def test_files_safetensors_writes_parse_the_same_in_pieces(spec, metadata):
    state = {name: torch.zeros(shape, dtype=dtype) for name, (dtype, shape) in spec.items()}
    data = safetensors.torch.save(state, metadata=metadata or None)
    assert outcome(in_pieces, data) == outcome(SafetensorsHeader.parse, data)
    header = in_pieces(data)
    assert header.path == "remote" and header.file_size == len(data)


def test_the_size_decides_truncation_and_trailing_bytes():
    data = safetensors.torch.save({"a": torch.arange(4, dtype=torch.float32)})
    n = SafetensorsHeader.header_length(data[:8], len(data))
    header = data[8 : 8 + n]
    for size, kind in (
        (len(data) - 1, "data_truncated"),
        (len(data) + 1, "trailing_bytes"),
        (8 + n - 1, "header_past_eof"),
    ):
        with pytest.raises(SafetensorsHeaderError) as info:
            SafetensorsHeader.from_header(header, size, "https://host/m.safetensors")
        assert info.value.kind == kind
        assert info.value.path == "https://host/m.safetensors"
    with pytest.raises(SafetensorsHeaderError) as info:
        SafetensorsHeader.header_length(data[:8], 8 + n - 1)
    assert info.value.kind == "header_past_eof"
    too_large = (MAX_SAFETENSORS_HEADER_LEN + 1).to_bytes(8, "little")
    with pytest.raises(SafetensorsHeaderError) as info:
        SafetensorsHeader.header_length(too_large, 2**62)
    assert info.value.kind == "header_too_large"
    with pytest.raises(OverflowError):
        SafetensorsHeader.from_header(header, -1)
