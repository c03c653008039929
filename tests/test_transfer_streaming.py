"""The staging ring (`ckptmap.streaming`): order, bounded memory, read-ahead, errors, files.

`run_ring` is driven with pieces that record what happens, through a `DeferredDevice` whose
deliveries run only when the ring waits for them (as a GPU's copies complete later): a slot
refilled before the copies out of it ran would deliver the wrong bytes. `read_tensors` reads
real files written by `safetensors.torch.save_file` and must give what safetensors gives,
whatever the slot size (tensors split across slots, many tensors merged into one read).
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from devices import DEVICES, DeferredDevice, FakeDevice, small_cuda_engine
from hypothesis import given
from hypothesis import strategies as st
from probes import mapped_from
from safetensors.torch import load_file as st_load_file
from safetensors.torch import save_file

from ckptmap import streaming
from ckptmap.engines import using_engine
from ckptmap.errors import CheckpointNotFoundError, CorruptCheckpointError
from ckptmap.formats.safetensors import SafetensorsFile, load_file
from ckptmap.formats.sharded import load_sharded
from ckptmap.streaming import (
    Piece,
    ReadItem,
    SourceFile,
    read_tensors,
    run_ring,
)

# --------------------------------------------------------------------------------------------
# The ring, with pieces that record


class Recorder:
    """Pieces whose bytes are a pattern of their index; deliveries copy them out in order."""

    def __init__(self, sizes: list[int], engine: DeferredDevice, fail_at: int | None = None):
        self.sizes = sizes
        self.engine = engine
        self.fail_at = fail_at
        self.out: list[torch.Tensor | None] = [None] * len(sizes)
        self.delivered: list[int] = []
        self.reads: list[tuple[int, int]] = []  # (piece, deliveries run when it was read)
        self.lock = threading.Lock()

    @staticmethod
    def pattern(k: int, n: int) -> torch.Tensor:
        return ((torch.arange(n) * 7 + k * 13) % 251).to(torch.uint8)

    def pieces(self) -> list[Piece]:
        return [Piece(n, self._read(k), self._deliver(k)) for k, n in enumerate(self.sizes)]

    def _read(self, k: int):
        def read(region: torch.Tensor) -> None:
            if k == self.fail_at:
                raise OSError(f"disk gone at piece {k}")
            with self.lock:
                self.reads.append((k, self.engine.ran))
            region.copy_(self.pattern(k, region.numel()))

        return read

    def _deliver(self, k: int):
        def deliver(region: torch.Tensor) -> None:
            self.out[k] = region.clone()
            self.delivered.append(k)

        return deliver


@given(
    sizes=st.lists(st.integers(1, 300), min_size=1, max_size=40),
    slot_bytes=st.sampled_from([300, 512, 1000]),
    slots=st.integers(1, 4),
    threads=st.integers(1, 4),
)
def test_ring_delivers_every_piece_in_order_with_bounded_memory(sizes, slot_bytes, slots, threads):
    engine = DeferredDevice(default=0, slot_bytes=slot_bytes, slots=slots, threads=threads)
    rec = Recorder(sizes, engine)
    run_ring(rec.pieces(), 0, engine=engine)
    assert not engine.pending  # every copy done on return
    assert rec.delivered == list(range(len(sizes)))
    for k, n in enumerate(sizes):
        assert torch.equal(rec.out[k], Recorder.pattern(k, n)), k
    # Bounded: at most `slots` buffers, none larger than a slot.
    assert len(engine.buffers) <= slots and max(engine.buffers) <= slot_bytes
    # Backpressure: a fill is read only once the fill that last used its slot was delivered.
    fills = streaming._plan_fills(rec.pieces(), slot_bytes)
    fill_of = {}
    for f, fill in enumerate(fills):
        for _ in fill:
            fill_of[len(fill_of)] = f
    used_slots = min(slots, len(fills))
    for k, delivered_before in rec.reads:
        assert delivered_before >= fill_of[k] - used_slots + 1, (k, fill_of[k], delivered_before)


def test_ring_reads_ahead_while_copies_are_pending():
    """With several slots, later fills are read before earlier copies have run."""
    engine = DeferredDevice(default=0, slot_bytes=100, slots=4, threads=1)
    rec = Recorder([100] * 8, engine)
    run_ring(rec.pieces(), 0, engine=engine)
    assert rec.reads[:4] == [(0, 0), (1, 0), (2, 0), (3, 0)]
    assert rec.delivered == list(range(8))


def test_pieces_share_a_slot_at_aligned_offsets():
    fills = streaming._plan_fills(
        [Piece(n, lambda r: None, lambda r: None) for n in (10, 10, 200, 1)], 512
    )
    assert [[off for _, off in fill] for fill in fills] == [[0, 256], [0, 256]]
    with pytest.raises(ValueError, match="does not fit"):
        streaming._plan_fills([Piece(513, lambda r: None, lambda r: None)], 512)


@pytest.mark.parametrize("threads", [1, 3])
def test_a_reader_error_stops_the_ring_and_is_raised(threads):
    engine = DeferredDevice(default=0, slot_bytes=100, slots=2, threads=threads)
    rec = Recorder([100] * 10, engine, fail_at=5)
    with pytest.raises(OSError, match="disk gone at piece 5"):
        run_ring(rec.pieces(), 0, engine=engine)
    assert rec.delivered == list(range(5))  # in order, up to the failure, and waited for
    assert not engine.pending
    assert not [t for t in threading.enumerate() if t.name.startswith("ckptmap-read")]


def test_a_delivery_error_is_raised():
    engine = FakeDevice(default=0, slot_bytes=100, slots=2, threads=2)

    def deliver(region: torch.Tensor) -> None:
        raise RuntimeError("device lost")

    pieces = [Piece(100, lambda r: None, deliver) for _ in range(4)]
    with pytest.raises(RuntimeError, match="device lost"):
        run_ring(pieces, 0, engine=engine)
    assert engine.finished == [[0]]


# --------------------------------------------------------------------------------------------
# Files


def _tensors(seed: int = 0) -> OrderedDict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    out["scalar"] = torch.tensor(3.5)
    out["empty"] = torch.zeros(0, 4)
    out["mask"] = torch.rand(7, generator=g) > 0.5
    out["bytes"] = torch.randint(0, 255, (13,), generator=g, dtype=torch.uint8)
    out["i8"] = torch.randint(-100, 100, (5, 3), generator=g, dtype=torch.int8)
    out["i64"] = torch.randint(-(2**40), 2**40, (9,), generator=g)
    out["f16"] = torch.randn(33, generator=g).half()
    out["bf16"] = torch.randn(4, 17, generator=g).bfloat16()
    out["f64"] = torch.randn(6, generator=g, dtype=torch.float64)
    for k in range(20):
        out[f"layers.{k}.w"] = torch.randn(3, 5, generator=g)
    out["big"] = torch.randn(3000, generator=g)
    out["big16"] = torch.randn(2000, generator=g).half()
    return out


@pytest.fixture(scope="module")
def st_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ring") / "model.safetensors"
    save_file(_tensors(), str(path))
    return path


def _items(path: Path, target) -> list[ReadItem]:
    with SafetensorsFile(path) as f:
        return f.read_plan(f.names, target)


@given(
    slot_bytes=st.sampled_from([256, 1000, 4096, 1 << 20]),
    slots=st.integers(1, 3),
    threads=st.integers(1, 3),
    deferred=st.booleans(),
)
def test_read_tensors_gives_what_safetensors_gives(st_file, slot_bytes, slots, threads, deferred):
    cls = DeferredDevice if deferred else FakeDevice
    engine = cls(default=0, slot_bytes=slot_bytes, slots=slots, threads=threads)
    items = _items(st_file, torch.device("cpu"))
    got = read_tensors(items, engine=engine)
    want = st_load_file(str(st_file))
    assert [i.shape for i in items] == [tuple(t.shape) for t in got]
    for (name, expected), tensor in zip(want.items(), got, strict=True):
        assert tensor.dtype == expected.dtype and torch.equal(tensor, expected), name
    assert max(engine.buffers) <= slot_bytes and len(engine.buffers) <= slots


def test_read_tensors_fills_existing_targets(st_file):
    engine = FakeDevice(default=0, slot_bytes=512, slots=2, threads=2)
    want = st_load_file(str(st_file))
    targets = {name: torch.empty_like(t) for name, t in want.items()}
    with SafetensorsFile(st_file) as f:
        items = [
            item._replace(target=targets[name])
            for name, item in zip(f.names, f.read_plan(f.names, torch.device("cpu")), strict=True)
        ]
    got = read_tensors(items, engine=engine)
    assert all(g is targets[name] for g, name in zip(got, want, strict=True))
    assert all(torch.equal(targets[name], t) for name, t in want.items())


def test_neighbouring_ranges_are_one_read(st_file, monkeypatch):
    """Small tensors next to each other in the file, and a large one's chunks, in one slot:
    one preadv per fill, scattered into many buffers."""
    calls: list[int] = []
    real = streaming._OpenFile.pread

    def counting(self, views, offset):
        calls.append(len(views))
        return real(self, views, offset)

    monkeypatch.setattr(streaming._OpenFile, "pread", counting)
    engine = FakeDevice(default=0, slot_bytes=1 << 20, slots=2)
    read_tensors(_items(st_file, torch.device("cpu")), engine=engine)
    assert len(calls) == 1 and calls[0] >= 2
    calls.clear()
    # A slot smaller than the large tensors: they are split, each chunk its own fill.
    engine = FakeDevice(default=0, slot_bytes=1024, slots=2)
    read_tensors(_items(st_file, torch.device("cpu")), engine=engine)
    assert len(calls) == len(engine.issued)


def test_a_file_shortened_after_the_plan(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({"a": torch.randn(100), "b": torch.randn(100)}, str(path))
    items = _items(path, torch.device("cpu"))
    os.truncate(path, path.stat().st_size - 10)
    engine = FakeDevice(default=0)
    with pytest.raises(
        CorruptCheckpointError, match=r"of \d+ bytes, \d+ when its header was read"
    ) as info:
        read_tensors(items, engine=engine)
    assert isinstance(info.value, RuntimeError) and str(path) in str(info.value)
    # Without the identity check, the short read itself is caught.
    unchecked = [i._replace(file=SourceFile(str(path))) for i in items]
    with pytest.raises(CorruptCheckpointError, match="ends at byte"):
        read_tensors(unchecked, engine=engine)


def test_a_file_replaced_or_removed_after_the_plan(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({"a": torch.randn(100)}, str(path))
    items = _items(path, torch.device("cpu"))
    other = tmp_path / "other.safetensors"
    save_file({"a": torch.randn(100)}, str(other))
    os.replace(other, path)
    engine = FakeDevice(default=0)
    with pytest.raises(
        CorruptCheckpointError, match="another file than the one whose header was read"
    ):
        read_tensors(items, engine=engine)
    path.unlink()
    with pytest.raises(CheckpointNotFoundError, match="removed while it was being loaded"):
        read_tensors(items, engine=engine)


def test_read_plan_errors(st_file):
    with SafetensorsFile(st_file) as f:
        (item,) = f.read_plan(["big16"], torch.device("cpu"))
    engine = FakeDevice(default=0)
    with pytest.raises(ValueError, match="do not hold"):
        read_tensors([item._replace(end=item.end - 1)], engine=engine)
    wrong = r"read target of torch\.float32 \(2000,\) for bytes of torch\.float16"
    with pytest.raises(ValueError, match=wrong):
        read_tensors([item._replace(target=torch.empty(2000))], engine=engine)
    with pytest.raises(ValueError, match="contiguous"):
        target = torch.empty(2, 2000, dtype=torch.float16)[0]
        read_tensors([item._replace(target=target[::1].as_strided((2000,), (2,)))], engine=engine)
    with pytest.raises(TypeError, match=r"tensor or a torch\.device"):
        read_tensors([item._replace(target="cuda")], engine=engine)


def test_named_device_and_engine_for():
    assert streaming.named_device("cuda:1") == torch.device("cuda", 1)
    assert streaming.named_device({"cpu": "cpu"}) == torch.device("cpu")
    assert streaming.named_device(None) is None
    assert streaming.named_device(lambda s, loc: s) is None
    assert streaming.named_device({"cuda:0": "cpu"}) is None
    # A plain CPU load never streams (zero-copy views), whatever engine is the default.
    assert streaming.engine_for(torch.device("cpu")) is None
    engine = FakeDevice()
    with using_engine(engine):
        assert streaming.engine_for(torch.device("cpu")) is engine
        assert streaming.engine_for(torch.device("meta")) is None


# --------------------------------------------------------------------------------------------
# The readers that use the ring


def test_safetensors_map_location_streams(st_file):
    """A map location the engine streams to: new tensors, read through the ring."""
    want = st_load_file(str(st_file))
    engine = FakeDevice(default=0, slot_bytes=4096, slots=2, threads=2)
    with using_engine(engine):
        got = load_file(st_file, map_location="cpu")
        part = SafetensorsFile(st_file, map_location={"cpu": "cpu"}).load(prefix="layers")
    assert list(got) == list(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert not any(mapped_from(t, st_file.resolve()) for t in got.values() if t.numel())
    assert engine.issued and max(engine.buffers) <= 4096
    assert list(part) == [k for k in want if k.startswith("layers.")]
    # Without a streaming engine the same call gives views of the map, as before.
    views = load_file(st_file, map_location="cpu")
    assert mapped_from(views["big"], st_file.resolve())


def test_sharded_map_location_streams_every_shard_in_one_ring(tmp_path):
    import json

    want = _tensors(1)
    names = list(want)
    shards = {"a.safetensors": names[::2], "b.safetensors": names[1::2]}
    for shard, shard_names in shards.items():
        save_file({n: want[n] for n in shard_names}, str(tmp_path / shard))
    weight_map = {n: s for s, ns in shards.items() for n in ns}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    engine = FakeDevice(default=0, slot_bytes=2048, slots=3, threads=2)
    with using_engine(engine):
        got = load_sharded(tmp_path, map_location="cpu")
    assert list(got) == list(weight_map)
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert engine.finished and all(f == [0] for f in engine.finished)


@pytest.mark.parametrize("device", DEVICES)
def test_map_location_on_the_device(st_file, device):
    """The real thing where there is a GPU (CPU here: the fake device)."""
    want = st_load_file(str(st_file))
    if device == "cuda":
        engine = small_cuda_engine(4096, 3, 2)
        target = "cuda"
    else:
        engine = FakeDevice(default=0, slot_bytes=4096, slots=3, threads=2)
        target = "cpu"
    with using_engine(engine):
        got = load_file(st_file, map_location=target)
    for k, t in want.items():
        assert got[k].device.type == device and torch.equal(got[k].cpu(), t), k
