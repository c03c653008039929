"""`ckptmap.transfer.copy_tensors` against `copy_` done pair by pair, in order.

Every case is a small "world": a few base tensors (in host memory or on the device), and a
list of (destination, source) pairs cut from them or made fresh: views of one base that
overlap, the same tensor twice (a tied weight), a tensor copied onto itself, a source that
another pair writes, transposed and expanded sources, casts between every batched dtype.
The world is built twice; torch copies one pair by pair, `copy_tensors` the other, and every
byte of both worlds must end equal.

On CPU the device is a `FakeDevice` (or a `DeferredDevice`, whose copies run only when waited
for) with a ring of a few hundred bytes, so that packing, chunking, several slots and reader
threads all happen with tiny tensors; with a GPU the same cases run on CUDA.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from devices import DEVICES, DeferredDevice, FakeDevice, small_cuda_engine
from hypothesis import given
from hypothesis import strategies as st

from ckptmap import transfer
from ckptmap.engines import HOST, OTHER, CudaEngine, HostEngine, current_engine, using_engine
from ckptmap.transfer import COPY_DTYPES, copy_tensors

DTYPES = sorted(COPY_DTYPES, key=str)
SHAPES = [(), (1,), (2,), (3,), (2, 2), (2, 3), (3, 2), (1, 4), (24,), (5, 7)]


def _values(numel: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Values every batched dtype holds exactly (k/8 for 0 <= k < 128), so every cast is
    defined and exact where it can be: the test compares copies, not rounding modes."""
    g = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 128, (numel,), generator=g).to(torch.float64) / 8
    return raw.to(dtype)


class World:
    """Tensors built from recipes, so that the same world can be built twice."""

    def __init__(self, bases: list[tuple[torch.dtype, int, bool]], device: str) -> None:
        self.device = device
        self.base_specs = bases
        self.fresh: list[tuple[torch.dtype, tuple[int, ...], bool, int, str]] = []
        self.recipes: list[tuple[Any, ...]] = []  # per tensor: how to build it

    def __repr__(self) -> str:
        return f"World(bases={self.base_specs}, fresh={self.fresh}, recipes={self.recipes})"

    def build(self) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """(every tensor of the recipes, the bases, the fresh tensors), on their places."""
        bases = [
            _values(n, dtype, seed=i).to(self.device if on_device else "cpu")
            for i, (dtype, n, on_device) in enumerate(self.base_specs)
        ]
        fresh = []
        for k, (dtype, shape, on_device, seed, form) in enumerate(self.fresh):
            place = self.device if on_device else "cpu"
            if form == "transposed":
                t = _values(shape[0] * shape[1], dtype, seed + 1000 * k).view(shape[1], shape[0])
                t = t.to(place).t()
            elif form == "expanded":
                t = _values(1, dtype, seed + 1000 * k).to(place).view((1,) * len(shape))
                t = t.expand(shape)
            else:
                n = 1
                for d in shape:
                    n *= d
                t = _values(n, dtype, seed + 1000 * k).view(shape).to(place)
            fresh.append(t)
        tensors: list[torch.Tensor] = []
        for recipe in self.recipes:
            if recipe[0] == "base":
                _, b, offset, shape = recipe
                n = 1
                for d in shape:
                    n *= d
                tensors.append(bases[b].view(-1)[offset : offset + n].view(shape))
            elif recipe[0] == "fresh":
                tensors.append(fresh[recipe[1]])
            else:  # "same": the very object of an earlier tensor
                tensors.append(tensors[recipe[1]])
        return tensors, bases, fresh


@st.composite
def worlds(draw: st.DrawFn, device: str) -> tuple[World, list[tuple[int, int]]]:
    """A world and its pairs, as indices into `World.build()`'s tensors."""
    bases = draw(
        st.lists(
            st.tuples(st.sampled_from(DTYPES), st.integers(1, 64), st.booleans()),
            min_size=1,
            max_size=4,
        ),
        label="bases",
    )
    world = World(bases, device)
    pairs: list[tuple[int, int]] = []

    def fresh(shape: tuple[int, ...], form: str = "plain") -> int:
        dtype = draw(st.sampled_from(DTYPES))
        world.fresh.append((dtype, shape, draw(st.booleans()), draw(st.integers(0, 99)), form))
        world.recipes.append(("fresh", len(world.fresh) - 1))
        return len(world.recipes) - 1

    def from_base(shape: tuple[int, ...]) -> int | None:
        n = 1
        for d in shape:
            n *= d
        fits = [b for b, (_, size, _) in enumerate(bases) if size >= n]
        if not fits:
            return None
        b = draw(st.sampled_from(fits))
        offset = draw(st.integers(0, bases[b][1] - n))
        world.recipes.append(("base", b, offset, shape))
        return len(world.recipes) - 1

    dsts: list[int] = []
    for _ in range(draw(st.integers(1, 10), label="pairs")):
        shape = draw(st.sampled_from(SHAPES))
        how = draw(st.sampled_from(["base", "base", "fresh", "repeat"]))
        dst: int | None = None
        if how == "repeat" and dsts:
            earlier = draw(st.sampled_from(dsts))
            world.recipes.append(("same", earlier))
            dst = len(world.recipes) - 1
            shape = tuple(world.build()[0][dst].shape)
        elif how == "base":
            dst = from_base(shape)
        if dst is None:
            dst = fresh(shape)
        dsts.append(dst)
        how = draw(st.sampled_from(["fresh", "fresh", "base", "self", "transposed", "expanded"]))
        src: int | None = None
        if how == "self":
            world.recipes.append(("same", dst))
            src = len(world.recipes) - 1
        elif how == "base":
            src = from_base(shape)
        elif how == "transposed" and len(shape) == 2:
            src = fresh(shape, "transposed")
        elif how == "expanded":
            src = fresh(shape, "expanded")
        if src is None:
            src = fresh(shape)
        pairs.append((dst, src))
    return world, pairs


def _engine(kind: str, device: str, slot_bytes: int, slots: int, threads: int) -> Any:
    if device == "cuda":
        return small_cuda_engine(slot_bytes, slots, threads)
    cls = DeferredDevice if kind == "deferred" else FakeDevice
    return cls(slot_bytes=slot_bytes, slots=slots, threads=threads)


def _run(world: World, pairs, engine, device: str) -> None:
    theirs, their_bases, their_fresh = world.build()
    ours, our_bases, our_fresh = world.build()
    if device == "cpu":
        # The tensors of the recipes marked "on the device" become the fake device's.
        for (_, _, on_device), base in zip(world.base_specs, our_bases, strict=True):
            if on_device:
                engine.on_device(base)
        for (_, _, on_device, _, _), t in zip(world.fresh, our_fresh, strict=True):
            if on_device:
                engine.on_device(t)
        for recipe, t in zip(world.recipes, ours, strict=True):
            if recipe[0] == "base" and world.base_specs[recipe[1]][2]:
                engine.on_device(t)
    try:
        with torch.no_grad():
            for d, s in pairs:
                theirs[d].copy_(theirs[s])
    except RuntimeError as err:
        # A source that partly overlaps its own destination: torch refuses it, so must we.
        assert "refer to a single memory location" in str(err)
        with pytest.raises(RuntimeError, match="refer to a single memory location"):
            with using_engine(engine):
                copy_tensors([ours[d] for d, _ in pairs], [ours[s] for _, s in pairs])
        return
    with using_engine(engine):
        copy_tensors([ours[d] for d, _ in pairs], [ours[s] for _, s in pairs])
    if isinstance(engine, DeferredDevice):
        assert not engine.pending, "copy_tensors returned before its copies were done"
    for a, b in zip(our_bases + our_fresh, their_bases + their_fresh, strict=True):
        assert a.dtype == b.dtype and a.device == b.device
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
@given(
    data=st.data(),
    kind=st.sampled_from(["fake", "deferred"]),
    slot_bytes=st.sampled_from([256, 512, 4096, 1 << 20]),
    slots=st.integers(1, 4),
    threads=st.integers(1, 3),
)
def test_copies_equal_copy_in_order(device, data, kind, slot_bytes, slots, threads):
    world, pairs = data.draw(worlds(device))
    engine = _engine(kind, device, slot_bytes, slots, threads)
    _run(world, pairs, engine, device)


# --------------------------------------------------------------------------------------------
# The cases by name


def _pairs_on_fake_device(n: int, dtype: torch.dtype = torch.float32) -> tuple[list, list]:
    dst = [torch.zeros(3, dtype=dtype) for _ in range(n)]
    src = [_values(3, torch.float64, seed=i) for i in range(n)]
    return dst, src


def test_host_only_is_one_foreach(monkeypatch):
    calls: list[int] = []
    real = torch._foreach_copy_

    def spy(dst, src, **kwargs):
        calls.append(len(dst))
        return real(dst, src, **kwargs)

    monkeypatch.setattr(torch, "_foreach_copy_", spy)
    dst, src = _pairs_on_fake_device(5)
    copy_tensors(dst, src, host_only=True)
    assert calls == [5]
    assert all(torch.equal(d, s.float()) for d, s in zip(dst, src, strict=True))


def test_small_tensors_travel_in_one_piece():
    """Many small host tensors: one staging buffer, one delivery, one scatter per dtype pair."""
    engine = FakeDevice()
    dst, src = _pairs_on_fake_device(100)
    engine.on_device(*dst)
    with using_engine(engine):
        copy_tensors(dst, src)
    assert len(engine.buffers) == 1 and engine.buffers[0] == 100 * 3 * 4
    assert engine.issued == [0]
    assert all(torch.equal(d, s.float()) for d, s in zip(dst, src, strict=True))


def test_large_tensors_are_chunked_through_the_ring():
    engine = FakeDevice(slot_bytes=1024, slots=2, threads=2)
    dst = [torch.zeros(1000), torch.zeros(700, dtype=torch.float16)]
    src = [_values(1000, torch.float32, 1), _values(700, torch.float32, 2)]
    engine.on_device(*dst)
    with using_engine(engine):
        copy_tensors(dst, src)
    assert torch.equal(dst[0], src[0]) and torch.equal(dst[1], src[1].half())
    assert len(engine.buffers) == 2 and max(engine.buffers) <= 1024
    # Chunks of 1024, 1024, 1024, 928 bytes, then 1024 and 376: one fill and delivery each.
    assert len(engine.issued) == 6


def test_tied_destination_takes_the_later_source():
    engine = DeferredDevice()
    tied = torch.zeros(4)
    engine.on_device(tied)
    first, later = torch.full((4,), 1.0), torch.full((4,), 2.0)
    with using_engine(engine):
        copy_tensors([tied, tied], [first, later])
    assert torch.equal(tied, later)


def test_overlapping_destinations_are_copied_in_order():
    engine = FakeDevice()
    base = torch.zeros(6)
    a, b = base[0:4], base[2:6]  # overlap on 2 elements: the order decides
    engine.on_device(a, b)
    with using_engine(engine):
        copy_tensors([a, b], [torch.full((4,), 1.0), torch.full((4,), 2.0)])
    assert base.tolist() == [1, 1, 2, 2, 2, 2]
    assert engine.issued == []  # nothing batched: torch's copy_, pair by pair


def test_source_written_by_an_earlier_pair_reads_the_new_value():
    engine = FakeDevice()
    x, y = torch.zeros(3), torch.zeros(3)
    engine.on_device(x, y)
    with using_engine(engine):
        copy_tensors([x, y], [torch.ones(3), x])  # y gets x's new value, as in order
    assert torch.equal(y, torch.ones(3))


class _Placed:
    """An engine stand-in that places the destinations and the sources as told."""

    def __init__(self, dst_places: list[int], src_places: list[int]) -> None:
        self.answers = [dst_places, src_places]

    def places(self, tensors: list[torch.Tensor]) -> list[int]:
        return self.answers.pop(0)


def _independent(dst, src, pd, ps) -> list[int] | None:
    keep = transfer._independent(transfer._Pairs(dst, src, _Placed(pd, ps)))
    return None if keep is None else keep.tolist()


def test_copy_onto_itself_is_dropped():
    x = torch.arange(4.0)
    assert _independent([x, x], [x, torch.zeros(4)], [0, 0], [0, 0]) == [1]
    assert _independent([x], [x], [0], [0]) == []


def test_independence_checks():
    base = torch.zeros(8)
    a, b, c = base[0:4], base[4:8], base[2:6]
    fresh = torch.ones(4)
    assert _independent([a, b], [fresh, fresh], [0, 0], [0, 0]) == [0, 1]
    assert _independent([a, c], [fresh, fresh], [0, 0], [0, 0]) is None
    assert _independent([a, b], [fresh, c], [0, 0], [0, 0]) is None
    # The same addresses in host memory and on a device are different memory.
    assert _independent([a], [a.view(4)], [0], [-1]) == [0]
    # Empty tensors touch nothing (an empty copy may be dropped: it does nothing).
    empty = base[3:3]
    assert _independent([a, empty], [fresh, base[0:0]], [0, 0], [0, 0]) in ([0], [0, 1])
    assert _independent([empty, a], [a[1:1], fresh], [0, 0], [0, 0]) in ([1], [0, 1])


def test_device_to_host_and_empty_pairs_use_copy_one_by_one():
    engine = FakeDevice()
    on_device = _values(3, torch.float32, 5)
    engine.on_device(on_device)
    host = torch.zeros(3, dtype=torch.float64)
    empty_dst, empty_src = torch.zeros(0, 3), torch.zeros(0, 3)
    engine.on_device(empty_dst)
    with using_engine(engine):
        copy_tensors([host, empty_dst], [on_device, empty_src])
    assert torch.equal(host, on_device.double())
    assert engine.issued == []


def test_default_engine_is_the_machines():
    expected = CudaEngine if torch.cuda.is_available() else HostEngine
    assert isinstance(current_engine(), expected)


def test_length_mismatch_is_an_error():
    with pytest.raises(ValueError, match="2 destinations for 1 sources"):
        copy_tensors([torch.zeros(1), torch.zeros(1)], [torch.zeros(1)])


def test_cuda_engine_places_without_touching_a_device():
    """What the CUDA engine decides from tensors alone (it runs here without a GPU)."""
    engine = CudaEngine()
    cpu = [torch.zeros(2), torch.zeros(0), torch.zeros(())]
    assert torch.zeros(1).get_device() == HOST  # `places` relies on it
    assert engine.places(cpu) == [HOST, HOST, HOST]
    assert [engine.place(t) for t in cpu] == [HOST, HOST, HOST]
    assert engine.place(torch.zeros(2, device="meta")) == OTHER
    assert engine.can_stream_to(torch.device("cuda", 1))
    assert not engine.can_stream_to(torch.device("cpu"))
