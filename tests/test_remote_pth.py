"""http(s) torch zip checkpoints (``torch.save``'s ``.pth``) read by byte range, against a real
`http.server` on 127.0.0.1 that serves ranges and counts the bytes it sends.

The bar of issue 16 for ``.pth`` at test size: a 64 MiB checkpoint written by `torch.save`;
a prefix load of its 10% subtree transfers at most 15% of the file's bytes (counted at the
server) and equals `torch.load`'s tensors; tables come from the end of the file and
``data.pkl`` alone; nothing lands in the download cache, and the sparse working file is
removed when the checkpoint is closed. (`benches/test_bench_remote.py` measures 1 GiB.)
"""

from __future__ import annotations

import io
import logging
import os
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from devices import DEVICES
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from servers import SUBTREE, CheckpointServer, cache_entries, checkpoint_server, random_state
from torch import nn

from ckptmap import open_checkpoint
from ckptmap.checkpoint import _load_checkpoint_with_prefix, load_checkpoint
from ckptmap.cli.diff import checkpoint_shapes
from ckptmap.cli.summary import inspect_checkpoint
from ckptmap.errors import InvalidTorchZipError, RemoteChangedError, TensorNotFoundError
from ckptmap.remote.reader import RangeReader

SIZE = 64 << 20
WHOLE = "whole through the cache"


def runner_like(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """What mmengine's Runner saves around a state dict (numpy scalars in ``meta``)."""
    return {
        "meta": {"epoch": 3, "iter": 1200, "lr": np.float64(0.01), "seed": np.int64(7)},
        "state_dict": state,
        "message_hub": {"log_scalars": {}},
    }


def saved(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def model() -> tuple[dict[str, torch.Tensor], bytes]:
    """The 64 MiB state dict and its `torch.save` bytes (a Runner-style checkpoint)."""
    state = random_state(SIZE, seed=3)
    return state, saved(runner_like(state))


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "home"
    monkeypatch.setenv("CKPTMAP_HOME", str(root))
    return root


@pytest.fixture
def scratch(tmp_path, monkeypatch) -> Path:
    """The temp directory, watched: sparse working files go there."""
    root = tmp_path / "tmp"
    root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    return root


@pytest.fixture
def server() -> Iterator[CheckpointServer]:
    with checkpoint_server() as srv:
        yield srv


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch):
    monkeypatch.setattr(RangeReader, "backoff_s", 0.0)
    monkeypatch.setattr(RangeReader, "attempts", 2)


def subtree_of(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    lead = SUBTREE + "."
    return {k[len(lead) :]: v for k, v in state.items() if k.startswith(lead)}


def test_a_prefix_load_transfers_its_subtree_and_equals_torch_load(model, server, home, scratch):
    _, body = model
    url = server.add("/zoo/model.pth", body, ranges="bytes")
    got = _load_checkpoint_with_prefix(SUBTREE, url)
    expected = subtree_of(torch.load(io.BytesIO(body), weights_only=False)["state_dict"])
    assert list(got) == list(expected)
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name
    sent = server.bytes_sent["/zoo/model.pth"]
    subtree = sum(t.nbytes for t in expected.values())
    assert subtree >= 0.099 * len(body)
    assert subtree <= sent <= 0.15 * len(body), (sent, len(body))
    assert cache_entries(home) == []  # nothing in the download cache
    assert list(scratch.iterdir()) == []  # the sparse working file is gone


def meta_model(state: dict[str, torch.Tensor], names: list[str]) -> nn.Module:
    """A meta-device module whose parameters are `names` of `state`."""
    root = nn.Module()
    for name in names:
        *owners, leaf = name.split(".")
        module = root
        for owner in owners:
            if not hasattr(module, owner):
                module.add_module(owner, nn.Module())
            module = getattr(module, owner)
        meta = torch.empty(state[name].shape, dtype=state[name].dtype, device="meta")
        module.register_parameter(leaf, nn.Parameter(meta, requires_grad=False))
    return root


def test_tables_plans_inspect_and_diff_read_the_directory_and_pickle_alone(
    model, server, home, scratch, tmp_path
):
    state, body = model
    url = server.add("/m.pth", body, ranges="bytes")
    directory_and_pickle = 512 << 10  # the tail read, data.pkl and small records, with room
    with open_checkpoint(url) as opened:
        assert opened.looks_like == "a torch zip checkpoint (read by byte range)"
        assert opened.keys() == list(state)
        entries = opened.entries()
        assert [(e.name, e.shape, e.dtype) for e in entries] == [
            (k, tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in state.items()
        ]
        assert all(e.file == url and e.start is None for e in entries)
        meta = opened.meta_state_dict()
        assert all(t.device.type == "meta" for t in meta.values())
        assert [e.name for e in opened.all_entries()] == [f"state_dict.{k}" for k in state]
        assert len(list(scratch.iterdir())) == 1
    assert list(scratch.iterdir()) == []
    assert server.bytes_sent["/m.pth"] <= directory_and_pickle
    server.reset_counts()
    subtree = [k for k in state if k.startswith(SUBTREE + ".")]
    plan = load_checkpoint(meta_model(state, subtree), url, dry_run=True)
    assert plan.header_only and not plan.result.missing_keys
    assert sorted(plan.reads) == sorted(subtree)
    assert plan.bytes_to_read == sum(state[n].nbytes for n in subtree)
    local = tmp_path / "m.pth"
    local.write_bytes(body)
    summary, here = inspect_checkpoint(url), inspect_checkpoint(local)
    assert summary["path"] == url and summary["file_bytes"] == len(body)
    for key in ("tensor_count", "total_bytes", "dtypes", "tree", "header_only"):
        assert summary[key] == here[key], key
    assert checkpoint_shapes(url)[0] == checkpoint_shapes(local)[0]
    assert server.bytes_sent["/m.pth"] <= 3 * directory_and_pickle
    assert cache_entries(home) == [] and list(scratch.iterdir()) == []


def test_the_whole_checkpoint_goes_through_the_cache(server, home, scratch):
    state = {"w": torch.arange(6.0), "b": torch.ones(2, dtype=torch.bfloat16)}
    body = saved(runner_like(state))
    url = server.add("/whole.pth", body, ranges="bytes")
    with open_checkpoint(url) as opened:
        loaded = opened.load()
    want = torch.load(io.BytesIO(body), weights_only=False)
    assert loaded["meta"] == want["meta"] and list(loaded["state_dict"]) == ["w", "b"]
    assert all(torch.equal(loaded["state_dict"][k], v) for k, v in state.items())
    assert len(cache_entries(home)) == 1


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16))
        self.head = nn.Linear(16, 3)


def test_load_checkpoint_into_a_model_equals_the_source(server, home, scratch):
    torch.manual_seed(0)
    source = Net()
    body = saved({"meta": {"epoch": 1}, "state_dict": source.state_dict()})
    url = server.add("/net.pth", body, ranges="bytes")
    # A part of the model: by range, nothing cached.
    head = Net().head
    head.load_state_dict(_load_checkpoint_with_prefix("head", url))
    assert torch.equal(head.weight, source.head.weight)
    assert cache_entries(home) == []
    # load_checkpoint returns the whole checkpoint: the whole file, through the cache.
    target = Net()
    load_checkpoint(target, url, strict=True)
    for name, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[name], value), name
    assert len(cache_entries(home)) == 1 and list(scratch.iterdir()) == []


@pytest.mark.parametrize("device", DEVICES)
def test_map_location_moves_what_was_fetched(server, home, device):
    body = saved({"state_dict": {"a.w": torch.arange(4.0), "b.w": torch.ones(3)}})
    url = server.add("/moved.pth", body, ranges="bytes")
    got = _load_checkpoint_with_prefix("a", url, map_location=device)
    assert got["w"].device.type == device and torch.equal(got["w"].cpu(), torch.arange(4.0))


def test_parameters_views_and_tied_tensors_come_back_as_torch_gives_them(server, home):
    base = torch.arange(24.0).reshape(4, 6)
    state = {
        "p": nn.Parameter(torch.ones(3)),
        "frozen": nn.Parameter(torch.zeros(2), requires_grad=False),
        "row": base[1],  # a view into a larger storage
        "col": base[:, 2],  # non-contiguous
        "tied.a": base,
        "tied.b": base,  # the same tensor twice
        "empty": torch.empty(0, 5),
    }
    body = saved(state)
    url = server.add("/views.pth", body, ranges="bytes")
    want = torch.load(io.BytesIO(body), weights_only=True)
    with open_checkpoint(url) as opened:
        got = opened.state_dict(list(state))
    for k, v in want.items():
        assert type(got[k]) is type(v) and got[k].requires_grad == v.requires_grad, k
        assert got[k].stride() == v.stride() and torch.equal(got[k], v), k
    assert got["tied.a"].data_ptr() == got["tied.b"].data_ptr()
    assert got["row"].untyped_storage().data_ptr() == got["tied.a"].untyped_storage().data_ptr()


def test_a_server_without_ranges_falls_back_in_one_log_line(server, home, caplog):
    body = saved({"state_dict": {"w": torch.arange(3.0)}})
    url = server.add("/plain.pth", body, ranges="none")
    with caplog.at_level(logging.INFO, logger="ckptmap"), open_checkpoint(url) as opened:
        assert torch.equal(opened.state_dict()["w"], torch.arange(3.0))
    lines = [r.getMessage() for r in caplog.records if WHOLE in r.getMessage()]
    assert len(lines) == 1 and "does not serve byte ranges" in lines[0]
    assert len(cache_entries(home)) == 1


def compressed(body: bytes) -> bytes:
    """The same archive, its members deflated (a tool that re-zipped a checkpoint)."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(body)) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info), compress_type=zipfile.ZIP_DEFLATED)
    return out.getvalue()


def test_what_only_torch_reads_is_downloaded_whole_in_one_log_line(server, home, caplog, scratch):
    body = compressed(saved({"state_dict": {"w": torch.arange(5.0)}}))
    url = server.add("/deflated.pth", body, ranges="bytes")
    with caplog.at_level(logging.INFO, logger="ckptmap"), open_checkpoint(url) as opened:
        assert torch.equal(opened.state_dict()["w"], torch.arange(5.0))
    lines = [r.getMessage() for r in caplog.records if WHOLE in r.getMessage()]
    assert lines == [
        f"Downloading {url} whole through the cache: only torch can read it (compressed "
        'member: member "archive/data.pkl" is compressed (zip method 8); torch.save stores '
        "every member uncompressed, and only uncompressed members can be mapped)"
    ]
    assert len(cache_entries(home)) == 1 and list(scratch.iterdir()) == []


def test_a_record_damaged_at_the_server_fails_its_crc_when_fetched(server, home, scratch):
    # Records larger than the first read from the end, so "a" is fetched only when asked for.
    state = {"a": torch.arange(300_000.0), "b": torch.arange(300_000.0) * 2}
    body = bytearray(saved({"state_dict": state}))
    at = bytes(body).index(state["a"][:1000].numpy().tobytes()) + 40
    body[at] ^= 0xFF
    url = server.add("/damaged.pth", bytes(body), ranges="bytes")
    with open_checkpoint(url) as opened:
        assert torch.equal(opened.state_dict(["b"])["b"], state["b"])  # its record is fine
        with pytest.raises(InvalidTorchZipError) as info:
            opened.state_dict(["a"])
    assert info.value.kind == "crc_mismatch" and url in str(info.value)
    assert cache_entries(home) == [] and list(scratch.iterdir()) == []


def test_a_damaged_directory_names_the_url(server, home, scratch):
    body = saved({"state_dict": {"w": torch.arange(3.0)}})
    url = server.add("/cut.pth", body[:-30] + bytes(30), ranges="bytes")
    with pytest.raises(InvalidTorchZipError) as info:
        open_checkpoint(url)
    assert info.value.kind == "no_end_record" and url in str(info.value)
    assert list(scratch.iterdir()) == [] and cache_entries(home) == []


def test_a_file_replaced_between_requests_is_refused(model, server, home, scratch):
    _, body = model
    url = server.add("/moving.pth", body, ranges="bytes")
    with open_checkpoint(url) as opened:
        server.routes["/moving.pth"].body = body[:-4] + b"\0\0\0\0"  # same size, new ETag
        with pytest.raises(RemoteChangedError) as info:
            opened.state_dict([f"{SUBTREE}.fpn.0.weight"])
    assert info.value.what == "If-Match" and url in str(info.value)
    assert cache_entries(home) == []


def test_a_missing_tensor_is_named(server, home):
    url = server.add("/few.pth", saved({"w": torch.ones(2)}), ranges="bytes")
    with open_checkpoint(url) as opened, pytest.raises(TensorNotFoundError) as info:
        opened.state_dict(["nope"])
    assert url in str(info.value) and "nope" in str(info.value)


_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int8, torch.int64, torch.bool]


@st.composite
def _states(draw: st.DrawFn) -> dict[str, torch.Tensor]:
    n = draw(st.integers(1, 8))
    out = {}
    for i in range(n):
        dtype = draw(st.sampled_from(_DTYPES))
        shape = tuple(draw(st.lists(st.integers(0, 40), min_size=0, max_size=3)))
        out[f"m{i % 3}.t{i}"] = (torch.arange(int(np.prod(shape))) % 7).reshape(shape).to(dtype)
    return out


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(state=_states(), data=st.data())
def test_any_subset_equals_torch_load(server, home, state, data):
    body = saved({"state_dict": state})
    url = server.add(f"/h{abs(hash(body))}.pth", body, ranges="bytes")
    names = data.draw(st.lists(st.sampled_from(list(state)), unique=True))
    want = torch.load(io.BytesIO(body), weights_only=True)["state_dict"]
    with open_checkpoint(url) as opened:
        got = opened.state_dict(names)
    assert list(got) == names
    for name in names:
        assert got[name].dtype == want[name].dtype and torch.equal(got[name], want[name])
    assert os.path.exists(home) is False or cache_entries(home) == []


def test_a_larger_storage_alignment_costs_one_more_fetch_not_a_failure(server, home, scratch):
    """torch's ``storage_alignment`` pads local headers past the reader's first guess."""
    from torch.utils.serialization import config

    state = {"a": torch.arange(1_000_000.0), "b": torch.arange(1_000_000.0) * 3}
    before = config.save.storage_alignment
    config.save.storage_alignment = 4096
    try:
        body = saved({"state_dict": state})
    finally:
        config.save.storage_alignment = before
    url = server.add("/aligned.pth", body, ranges="bytes")
    with open_checkpoint(url) as opened:
        got = opened.state_dict(["a"])
    assert torch.equal(got["a"], state["a"])
    assert server.bytes_sent["/aligned.pth"] < len(body) * 0.6
    assert cache_entries(home) == [] and list(scratch.iterdir()) == []


def local_header_of(body: bytes, name: str) -> int:
    with zipfile.ZipFile(io.BytesIO(body)) as z:
        return z.getinfo(f"archive/{name}").header_offset


@pytest.mark.parametrize(
    ("field", "value"),
    [(0, b"XXXX"), (26, b"\x40\x00")],
    ids=["signature", "name length"],
)
def test_a_damaged_local_header_is_found_when_its_record_is_fetched(server, home, field, value):
    state = {"a": torch.arange(300_000.0), "b": torch.ones(300_000)}
    body = bytearray(saved({"state_dict": state}))
    at = local_header_of(bytes(body), "data/1") + field  # b's, far from what opening reads
    body[at : at + len(value)] = value
    url = server.add("/bad-local.pth", bytes(body), ranges="bytes")
    with open_checkpoint(url) as opened:
        assert torch.equal(opened.state_dict(["a"])["a"], state["a"])
        with pytest.raises(InvalidTorchZipError) as info:
            opened.state_dict(["b"])
    assert info.value.kind == "bad_local_header" and url in str(info.value)
    assert cache_entries(home) == []
