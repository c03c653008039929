"""`.pth` checkpoints streamed to a device through the staging ring (`ckptmap.streaming`).

When `map_location` names one device the copy engine streams to, the Rust reader's table
gives each tensor's byte range and `PthFile.load` reads them through the ring into new
tensors there, instead of building CPU tensors and moving each storage. On CPU the device is
`FakeDevice` (every CPU tensor counts as device 0's, so the ring runs, with a ring as small
as a test wants); on a GPU machine the ``cuda`` cases run the real thing. Every file is
written by `torch.save` and every result compared with `torch.load`'s: values, dtypes,
shapes, strides, Parameters and requires_grad; tensors that share a storage, and
non-contiguous ones, go the usual way (sharing kept).
"""

from __future__ import annotations

import logging
import os
import types
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch
from devices import DEVICES, DeferredDevice, FakeDevice, small_cuda_engine
from probes import mapped_from
from torch import nn

import ckptmap
from ckptmap import open_checkpoint
from ckptmap.engines import using_engine
from ckptmap.errors import CorruptCheckpointError
from ckptmap.formats import load_file
from ckptmap.formats import pth as pth_module
from ckptmap.formats.pth import PthFile


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8, 700), nn.LayerNorm(700)
    )


def _dtypes() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "bf16": torch.randn(5, 7, generator=g).bfloat16(),
        "f16": torch.randn(33, generator=g).half(),
        "f64": torch.randn(3, generator=g, dtype=torch.float64),
        "i8": torch.randint(-128, 127, (17,), generator=g, dtype=torch.int8),
        "u8": torch.randint(0, 255, (9,), generator=g, dtype=torch.uint8),
        "i64": torch.randint(-(2**40), 2**40, (4,), generator=g),
        "bool": torch.rand(13, generator=g) > 0.5,
        "c64": torch.randn(6, generator=g, dtype=torch.complex64),
        "c128": torch.randn(2, 3, generator=g, dtype=torch.complex128),
        "scalar": torch.tensor(3.5),
        "empty": torch.empty(0),
        "empty2d": torch.empty(3, 0, dtype=torch.float16),
        "size1": torch.randn(3, 1, generator=g).t(),  # (1, 3), strides (1, 1): contiguous
        "big": torch.randn(5000, generator=g),  # larger than the test slots: chunked
    }


def _save(obj: Any, path: Path) -> Path:
    torch.save(obj, path)
    return path


def _same(got: Any, want: Any, where: str = "") -> None:
    """`got` is what torch.load gave (`want`): types, containers, tensors and attributes."""
    assert type(got) is type(want), where
    if isinstance(want, torch.Tensor):
        assert got.dtype == want.dtype and got.shape == want.shape, where
        assert got.stride() == want.stride() or want.numel() == 0, where
        assert got.requires_grad == want.requires_grad, where
        assert got.device == want.device, where
        assert torch.equal(got.detach().cpu(), want.detach().cpu()), where
    elif isinstance(want, dict):
        assert list(got) == list(want), where
        for key in want:
            _same(got[key], want[key], f"{where}.{key}")
        assert getattr(got, "_metadata", None) == getattr(want, "_metadata", None), where
    elif isinstance(want, list | tuple):
        assert len(got) == len(want), where
        for k, (a, b) in enumerate(zip(got, want, strict=True)):
            _same(a, b, f"{where}.{k}")
    else:
        assert got == want, where


def _engine(**kw: Any) -> FakeDevice:
    return FakeDevice(default=0, **{"slot_bytes": 4096, "slots": 2, "threads": 2, **kw})


# --------------------------------------------------------------------------------------------
# Whole files: load_file of a plain state dict


@pytest.mark.parametrize("slot_bytes", [256, 4096, 1 << 20])
@pytest.mark.parametrize("deferred", [False, True])
def test_a_model_state_dict_streams_as_torch_loads_it(tmp_path, slot_bytes, deferred):
    path = _save(_model().state_dict(), tmp_path / "model.pth")
    cls = DeferredDevice if deferred else FakeDevice
    engine = cls(default=0, slot_bytes=slot_bytes, slots=2, threads=2)
    with using_engine(engine):
        got = load_file(path, map_location="cpu")
    _same(got, torch.load(path, map_location="cpu", weights_only=True))
    assert engine.issued, "not streamed"
    assert not any(mapped_from(t, path.resolve()) for t in got.values() if t.numel())
    # Bounded: at most `slots` buffers of at most one slot, whatever the file's size.
    assert len(engine.buffers) <= 2 and max(engine.buffers) <= slot_bytes
    if deferred:
        assert not engine.pending  # every copy done on return


def test_every_dtype_and_shape_streams(tmp_path):
    path = _save(_dtypes(), tmp_path / "dtypes.pth")
    engine = _engine(slot_bytes=1024)
    with using_engine(engine):
        got = load_file(path, map_location={"cpu": "cpu"})
    want = torch.load(path, map_location="cpu", weights_only=True)
    _same(got, want)
    assert got["size1"].stride() == want["size1"].stride() == (1, 1)
    assert engine.issued and max(engine.buffers) <= 1024
    assert got["big"].untyped_storage().nbytes() == 5000 * 4


def test_parameters_and_requires_grad_are_kept(tmp_path):
    g = torch.Generator().manual_seed(2)
    obj = OrderedDict(
        p=nn.Parameter(torch.randn(4, 4, generator=g)),
        frozen=nn.Parameter(torch.randn(3, generator=g), requires_grad=False),
        grad=torch.randn(5, generator=g).requires_grad_(),
        plain=torch.randn(2, generator=g),
    )
    path = _save(obj, tmp_path / "params.pth")
    engine = _engine()
    with using_engine(engine):
        got = load_file(path, map_location="cpu")
    _same(got, torch.load(path, map_location="cpu", weights_only=True))
    assert engine.issued
    assert type(got["p"]) is nn.Parameter and got["p"].requires_grad
    assert type(got["frozen"]) is nn.Parameter and not got["frozen"].requires_grad
    assert type(got["grad"]) is torch.Tensor and got["grad"].requires_grad


def test_a_parameter_with_attributes_goes_the_usual_way(tmp_path, caplog):
    param = nn.Parameter(torch.randn(3))
    param.tag = "kept"  # saved with _rebuild_parameter_with_state
    path = _save({"p": param, "q": torch.randn(2)}, tmp_path / "state.pth")
    engine = _engine()
    with using_engine(engine), caplog.at_level(logging.DEBUG, logger="ckptmap"):
        got = load_file(path, map_location="cpu")
    assert got["p"].tag == "kept" and not engine.issued
    assert "has attributes of its own" in caplog.text
    _same(got, torch.load(path, map_location="cpu", weights_only=True))


def test_shared_storages_go_the_usual_way_and_stay_shared(tmp_path, caplog):
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False))
    model[1].weight = model[0].weight  # tied
    path = _save(model.state_dict(), tmp_path / "tied.pth")
    engine = _engine()
    with using_engine(engine), caplog.at_level(logging.DEBUG, logger="ckptmap"):
        got = load_file(path, map_location="cpu")
    _same(got, torch.load(path, map_location="cpu", weights_only=True))
    assert got["0.weight"].data_ptr() == got["1.weight"].data_ptr()
    assert not engine.issued
    assert "shares its storage with '0.weight'" in caplog.text


def test_views_of_one_storage_asked_together_stay_shared(tmp_path):
    base = torch.arange(20.0)
    path = _save({"a": base, "b": base[5:9], "c": torch.ones(3)}, tmp_path / "views.pth")
    f = PthFile(path)
    engine = _engine()
    with using_engine(engine):
        both = f.load(["a", "b"], map_location="cpu")
    assert not engine.issued
    assert both["b"].untyped_storage().data_ptr() == both["a"].untyped_storage().data_ptr()
    assert both["b"].storage_offset() == 5 and torch.equal(both["b"], base[5:9])
    assert "shares its storage" in f.stream_reason(["a", "b"])
    # One user of the storage among the rows asked: read on its own.
    with using_engine(engine):
        one = f.load(["b", "c"], map_location="cpu")
    assert engine.issued and f.stream_reason(["b", "c"]) is None
    assert torch.equal(one["b"], base[5:9]) and one["b"].untyped_storage().nbytes() == 16


def test_non_contiguous_tensors_go_the_usual_way(tmp_path, caplog):
    g = torch.Generator().manual_seed(3)
    path = _save({"t": torch.randn(3, 5, generator=g).t(), "u": torch.ones(2)}, tmp_path / "t.pth")
    engine = _engine()
    with using_engine(engine), caplog.at_level(logging.DEBUG, logger="ckptmap"):
        got = load_file(path, map_location="cpu")
    want = torch.load(path, map_location="cpu", weights_only=True)
    _same(got, want)
    assert got["t"].stride() == (1, 5) and not engine.issued
    assert "'t' is not contiguous" in caplog.text
    with pytest.raises(ValueError, match="'t' is not contiguous"):
        PthFile(path).read_plan(["t"], torch.device("cpu"))


def test_a_big_endian_machine_goes_the_usual_way(tmp_path, monkeypatch):
    path = _save({"a": torch.arange(4.0)}, tmp_path / "a.pth")
    monkeypatch.setattr(pth_module, "sys", types.SimpleNamespace(byteorder="big"))
    engine = _engine()
    with using_engine(engine):
        got = load_file(path, map_location="cpu")
    assert not engine.issued and torch.equal(got["a"], torch.arange(4.0))
    assert "byte order" in PthFile(path).stream_reason()


def test_what_is_not_a_plain_state_dict_goes_the_usual_way(tmp_path):
    sd = _model().state_dict()
    runner = {"meta": {"epoch": 3, "seed": 0}, "state_dict": sd}
    cases = [runner, [sd["0.weight"], sd["0.bias"]], {"a": torch.ones(2), "n": 3}, {}]
    for k, obj in enumerate(cases):
        path = _save(obj, tmp_path / f"{k}.pth")
        engine = _engine()
        with using_engine(engine):
            got = load_file(path, map_location="cpu")
        _same(got, torch.load(path, map_location="cpu", weights_only=True), str(k))
        assert not engine.issued, k


def test_map_locations_that_name_no_single_device_go_the_usual_way(tmp_path):
    path = _save(_model().state_dict(), tmp_path / "m.pth")
    want = torch.load(path, map_location="cpu", weights_only=True)
    for where in (lambda storage, location: storage, {"cuda:0": "cpu"}, None):
        engine = _engine()
        with using_engine(engine):
            got = load_file(path, map_location=where)
        _same(got, want)
        assert not engine.issued
    # Without a streaming engine a CPU load stays zero-copy views of the file.
    got = load_file(path, map_location="cpu")
    assert mapped_from(got["3.weight"], path.resolve())


# --------------------------------------------------------------------------------------------
# Rows of the table: PthFile.load(names), read_plan, the opened checkpoint


def test_rows_stream_from_a_runner_checkpoint(tmp_path):
    sd = _model().state_dict()
    path = _save({"meta": {"epoch": 3}, "state_dict": sd}, tmp_path / "runner.pth")
    names = [f"state_dict.{k}" for k in sd]
    engine = _engine()
    with using_engine(engine):
        got = PthFile(path).load(names, map_location="cpu")
    assert list(got) == names and engine.issued
    for k, v in sd.items():
        _same(got[f"state_dict.{k}"], v, k)
    # The opened checkpoint's state_dict(names) takes the same path, `_metadata` set.
    engine = _engine()
    with using_engine(engine), open_checkpoint(path, map_location="cpu") as opened:
        part = opened.state_dict(list(sd)[:4])
    assert engine.issued and list(part) == list(sd)[:4]
    assert part._metadata == sd._metadata
    assert all(torch.equal(part[k], sd[k]) for k in part)


def test_read_plan_gives_the_table_s_byte_ranges(tmp_path):
    obj = _dtypes()
    path = _save(obj, tmp_path / "d.pth")
    f = PthFile(path)
    items = f.read_plan(["bf16", "big"], torch.device("cpu"))
    assert [i.dtype for i in items] == [torch.bfloat16, torch.float32]
    assert [i.shape for i in items] == [(5, 7), (5000,)]
    assert items[1].end - items[1].start == 20000
    assert items[0].file.identity[2] == path.stat().st_size
    engine = _engine()
    got = ckptmap.streaming.read_tensors(items, engine=engine)
    assert torch.equal(got[0], obj["bf16"]) and torch.equal(got[1], obj["big"])
    with pytest.raises(ckptmap.errors.TensorNotFoundError):
        f.read_plan(["nope"], torch.device("cpu"))


def test_load_checkpoint_end_to_end(tmp_path):
    source = _model()
    path = _save(source.state_dict(), tmp_path / "m.pth")
    target = _model()
    with torch.no_grad():
        for p in target.parameters():
            p.zero_()
    engine = _engine()
    with using_engine(engine):
        ckptmap.load_checkpoint(target, path, map_location="cpu", logger="silent")
    assert engine.issued
    for k, v in source.state_dict().items():
        assert torch.equal(target.state_dict()[k], v), k


def test_a_file_replaced_or_shortened_after_open(tmp_path):
    path = _save({"a": torch.randn(100), "b": torch.randn(100)}, tmp_path / "m.pth")
    f = PthFile(path)
    assert len(f.table) == 2
    other = _save({"a": torch.randn(100), "b": torch.randn(100)}, tmp_path / "other.pth")
    os.replace(other, path)
    engine = _engine()
    with using_engine(engine), pytest.raises(CorruptCheckpointError, match="another file") as info:
        f.load(["a", "b"], map_location="cpu")
    assert isinstance(info.value, RuntimeError) and str(path) in str(info.value)
    g = PthFile(path)
    assert len(g.table) == 2
    # A few bytes off the end (the zip's directory; the reader's map keeps its last page).
    os.truncate(path, path.stat().st_size - 10)
    with using_engine(engine), pytest.raises(CorruptCheckpointError, match=r"of \d+ bytes"):
        g.load(["a"], map_location="cpu")


# --------------------------------------------------------------------------------------------
# The real device where there is one


@pytest.mark.parametrize("device", DEVICES)
def test_map_location_on_the_device(tmp_path, device):
    obj = {**_model().state_dict(), **_dtypes()}
    path = _save(obj, tmp_path / "m.pth")
    if device == "cuda":
        engine: Any = small_cuda_engine(4096, 3, 2)
    else:
        engine = _engine(slots=3)
    with using_engine(engine):
        got = load_file(path, map_location=device)
        rows = PthFile(path).load(["big", "bf16"], map_location=device)
    _same(got, torch.load(path, map_location=device, weights_only=True))
    assert got["big"].device.type == device and rows["big"].device.type == device
    assert torch.equal(rows["bf16"].cpu(), obj["bf16"])
    if device == "cpu":
        assert engine.issued


def test_a_remote_pth_streams_from_its_fetched_bytes(tmp_path, monkeypatch):
    """Over http, by byte range: the ring reads the local copy of the fetched records, not
    the URI."""
    import io

    from servers import checkpoint_server

    from ckptmap.checkpoint import _load_checkpoint_with_prefix

    monkeypatch.setenv("CKPTMAP_HOME", str(tmp_path / "home"))
    sd = _model().state_dict()
    buffer = io.BytesIO()
    torch.save({"meta": {"epoch": 1}, "state_dict": sd}, buffer)
    engine = _engine()
    with checkpoint_server() as server, using_engine(engine):
        url = server.add("/m.pth", buffer.getvalue(), ranges="bytes")
        got = _load_checkpoint_with_prefix("3", url, map_location="cpu")
    assert engine.issued
    assert list(got) == ["weight", "bias"]
    assert torch.equal(got["weight"], sd["3.weight"]) and torch.equal(got["bias"], sd["3.bias"])
