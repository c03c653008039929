"""Planning ranged requests (`ckptmap.remote.spans`): hypothesis over random layouts, checked by
running the plan against a random file."""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ckptmap.remote.spans import plan_requests


@st.composite
def layouts(draw: st.DrawFn) -> tuple[bytes, list[tuple[int, int]], int, int]:
    """A file, some non-overlapping `(start, length)` ranges in it (zero-length included), a
    gap threshold and a request size."""
    sizes = draw(st.lists(st.integers(0, 40), min_size=1, max_size=30))
    chosen = draw(st.lists(st.booleans(), min_size=len(sizes), max_size=len(sizes)))
    seed = draw(st.integers(0, 2**32 - 1))
    ranges, at = [], draw(st.integers(0, 10))
    for size, keep in zip(sizes, chosen, strict=True):
        if keep:
            ranges.append((at, size))
        at += size
    data = random.Random(seed).randbytes(at + 5)
    random.Random(seed).shuffle(ranges)
    return data, ranges, draw(st.integers(0, 50)), draw(st.integers(1, 64))


@given(layouts())
def test_the_plan_fills_every_destination_and_respects_its_bounds(layout):
    data, ranges, gap, size = layout
    # A list, not a dict by start: an empty tensor may share its offset with the next one.
    dests = [(start, bytearray(length)) for start, length in ranges]
    requests = plan_requests(
        [(start, memoryview(d)) for start, d in dests], gap_bytes=gap, request_bytes=size
    )
    previous_end = 0
    for request in requests:
        assert request.start >= previous_end  # in file order, never overlapping
        previous_end = request.end
        assert 0 < request.nbytes <= size
        parts = request.parts
        assert parts[0].start == request.start and parts[0].dest is not None
        assert parts[-1].dest is not None
        assert parts[-1].start + parts[-1].length == request.end
        for a, b in itertools.pairwise(parts):
            assert a.start + a.length == b.start
        for part in parts:
            assert part.length > 0
            if part.dest is None:
                assert part.length <= gap
            else:
                assert part.dest.nbytes == part.length
                # What a server sends for these bytes, written where the plan says.
                part.dest[:] = data[part.start : part.start + part.length]
    for start, dest in dests:
        assert bytes(dest) == data[start : start + len(dest)]
    useful = sum(length for _, length in ranges)
    assert sum(r.useful_bytes for r in requests) == useful


def test_close_ranges_share_a_request_and_far_ones_do_not():
    a, b, c = bytearray(10), bytearray(10), bytearray(10)
    targets = [(100, memoryview(a)), (115, memoryview(b)), (200, memoryview(c))]
    requests = plan_requests(targets, gap_bytes=5, request_bytes=1000)
    assert [(r.start, r.end) for r in requests] == [(100, 125), (200, 210)]
    assert [p.dest is None for p in requests[0].parts] == [False, True, False]
    assert requests[0].nbytes == 25 and requests[0].useful_bytes == 20
    requests = plan_requests(targets, gap_bytes=4, request_bytes=1000)
    assert [(r.start, r.end) for r in requests] == [(100, 110), (115, 125), (200, 210)]


def test_large_runs_are_cut_and_gaps_never_start_or_end_a_request():
    a, b = bytearray(10), bytearray(10)
    requests = plan_requests(
        [(0, memoryview(a)), (14, memoryview(b))], gap_bytes=8, request_bytes=12
    )
    # [0, 10) + gap [10, 14) + [14, 24): cut at 12 leaves [10, 12) of gap at the end of the
    # first request (dropped) and [12, 14) at the start of the second (dropped).
    assert [(r.start, r.end) for r in requests] == [(0, 10), (14, 24)]


def test_overlapping_destinations_and_bad_sizes_are_refused():
    a, b = bytearray(10), bytearray(10)
    with pytest.raises(ValueError, match="overlap"):
        plan_requests([(0, memoryview(a)), (5, memoryview(b))], gap_bytes=0, request_bytes=8)
    with pytest.raises(ValueError, match="request_bytes"):
        plan_requests([(0, memoryview(a))], gap_bytes=0, request_bytes=0)
    assert plan_requests([(3, memoryview(bytearray()))], gap_bytes=0, request_bytes=1) == []
