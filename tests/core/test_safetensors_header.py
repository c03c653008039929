"""The safetensors header reader of the Rust core (`ckptmap._core.SafetensorsHeader`), without
torch: every bad-header case of RELIABILITY.md gets its kind, from bytes and from a file; no
input panics; every accepted header keeps the fuzz target's invariants. What the Python layer
makes of these errors (typed errors, messages, tensors) is in tests/test_safetensors.py.
"""

from __future__ import annotations

import itertools
import os
import pickle
import resource
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from probes import ran_meanwhile
from safetensors_cases import BAD_FILES, CORPUS, GOOD_SEEDS, corpus_files, entry, raw

import ckptmap._core
from ckptmap._core import SafetensorsHeader, SafetensorsHeaderError

# Bits per element of every dtype the core knows (sub-byte floats pack several per byte).
BITS = {
    "BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8,
    "F8_E4M3": 8, "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16,
    "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "C64": 64, "F64": 64, "I64": 64,
    "U64": 64,
}  # fmt: skip


def write(tmp_path: Path, data: bytes, name: str = "model.safetensors") -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


def check_invariants(header: SafetensorsHeader) -> None:
    """The fuzz target's: each range has the size its shape and dtype imply, lies inside the
    file's data section, and overlaps no other."""
    for dtype, shape, (start, end) in zip(
        header.safetensors_dtypes, header.shapes, header.byte_ranges, strict=True
    ):
        numel = 1
        for d in shape:
            numel *= d
        assert (end - start) * 8 == numel * BITS[dtype]
        assert header.data_offset <= start <= end <= header.file_size
    ranges = sorted(header.byte_ranges)
    for (_, end), (start, _) in itertools.pairwise(ranges):
        assert end <= start


@pytest.mark.parametrize(("case", "data", "kind"), BAD_FILES, ids=[c[0] for c in BAD_FILES])
def test_bad_header_kind_from_bytes_and_from_a_file(
    tmp_path: Path, case: str, data: bytes, kind: str
) -> None:
    with pytest.raises(SafetensorsHeaderError) as info:
        SafetensorsHeader.parse(data, "x.safetensors")
    assert (info.value.kind, info.value.path) == (kind, "x.safetensors")
    assert isinstance(info.value, ValueError)
    path = write(tmp_path, data)
    with pytest.raises(SafetensorsHeaderError) as info:
        SafetensorsHeader.open(path)
    assert (info.value.kind, info.value.path) == (kind, path)
    assert path in str(info.value) and info.value.detail in str(info.value)
    # Nothing created, nothing changed.
    assert os.listdir(tmp_path) == ["model.safetensors"]
    assert Path(path).read_bytes() == data


def test_every_kind_the_core_knows_is_covered() -> None:
    kinds = {kind for _, _, kind in BAD_FILES}
    core = set(ckptmap._core.SAFETENSORS_HEADER_ERROR_KINDS)
    assert len(core) == 21
    assert kinds == core


def test_fuzz_seed_corpus_matches_the_cases() -> None:
    """`python tests/safetensors_cases.py fuzz/corpus/header` rewrites the corpus."""
    found = {p.name: p.read_bytes() for p in CORPUS.iterdir() if not p.name.startswith(".")}
    assert found == corpus_files()


@pytest.mark.parametrize(("case", "data"), GOOD_SEEDS, ids=[c[0] for c in GOOD_SEEDS])
def test_good_seeds_parse(tmp_path: Path, case: str, data: bytes) -> None:
    header = SafetensorsHeader.open(write(tmp_path, data))
    assert header.file_size == len(data)
    check_invariants(header)


def test_columns_of_a_parsed_header() -> None:
    text = (
        '{"__metadata__":{"format":"pt"},"w":{"dtype":"BF16","shape":[2,1],"data_offsets":[0,4]},'
        '"f4":{"dtype":"F4","shape":[4],"data_offsets":[4,6]}}'
    )
    header = SafetensorsHeader.parse(raw(text, bytes(6)), "m.safetensors")
    assert header.names == ["w", "f4"]
    assert header.dtypes == ["bfloat16", "float4_e2m1fn"]
    assert header.safetensors_dtypes == ["BF16", "F4"]
    assert header.shapes == [(2, 1), (4,)]
    start = 8 + len(text)
    assert header.data_offset == start and header.header_len == len(text)
    assert header.byte_ranges == [(start, start + 4), (start + 4, start + 6)]
    assert header.metadata == {"format": "pt"}
    assert (len(header), header.path, header.file_size) == (2, "m.safetensors", start + 6)


@pytest.mark.parametrize("length", [2**64 - 1, 100_000_001, 100_000_000, 2**63])
def test_huge_header_length_is_rejected_before_allocating(tmp_path: Path, length: int) -> None:
    path = write(tmp_path, raw("{}", length=length))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    with pytest.raises(SafetensorsHeaderError):
        SafetensorsHeader.open(path)
    assert time.perf_counter() - start < 0.5
    # ru_maxrss is in KiB: far less than the 100 MB a trusted length would allocate.
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 20_000


def test_duplicate_names_are_rejected() -> None:
    # The safetensors package silently keeps one of the two; the core refuses to guess.
    data = raw('{"t":' + entry() + ',"\\u0074":' + entry() + "}", bytes(4))
    with pytest.raises(SafetensorsHeaderError, match=r"tensor \"t\" appears more than once"):
        SafetensorsHeader.parse(data)


def test_header_errors_survive_pickling() -> None:
    with pytest.raises(SafetensorsHeaderError) as info:
        SafetensorsHeader.parse(raw("[]"), "x")
    again = pickle.loads(pickle.dumps(info.value))
    assert type(again) is SafetensorsHeaderError and str(again) == str(info.value)


@given(data=st.binary(max_size=96))
def test_arbitrary_bytes_never_panic(data: bytes) -> None:
    try:
        header = SafetensorsHeader.parse(data)
    except SafetensorsHeaderError:
        return
    check_invariants(header)


GOOD = GOOD_SEEDS[1][1]


@given(
    edits=st.lists(st.tuples(st.integers(0, len(GOOD) - 1), st.integers(0, 255)), max_size=4),
    cut=st.integers(0, 16),
)
def test_mangled_files_never_panic(edits: list[tuple[int, int]], cut: int) -> None:
    data = bytearray(GOOD)
    for at, value in edits:
        data[at] = value
    try:
        header = SafetensorsHeader.parse(bytes(data[: len(data) - cut]))
    except SafetensorsHeaderError:
        return
    check_invariants(header)


def test_header_parsing_releases_the_gil() -> None:
    n = 200_000
    header = {f"layers.{i}.weight": entry(offsets=(4 * i, 4 * i + 4)) for i in range(n)}
    text = "{" + ",".join(f'"{k}":{v}' for k, v in header.items()) + "}"
    data = raw(text, bytes(4 * n))
    parsed = SafetensorsHeader.parse(data)
    assert len(parsed) == n
    assert ran_meanwhile(lambda: SafetensorsHeader.parse(data))
