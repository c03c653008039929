"""http(s) safetensors read by byte range, against a real `http.server` on 127.0.0.1 that serves
ranges and counts the bytes it sends.

The bar of issue 16 at test size: a 64 MiB file; a prefix load of its 10% subtree transfers at
most 15% of the file's bytes (counted at the server) and equals a full load by safetensors
itself; plans, ``inspect`` and ``diff`` transfer the header alone. (`benches/
test_bench_remote.py` measures the same on 1 GiB.)
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from servers import SUBTREE, CheckpointServer, cache_entries, checkpoint_server, random_checkpoint
from torch import nn

from ckptmap import open_checkpoint
from ckptmap.checkpoint import _load_checkpoint_with_prefix, load_checkpoint
from ckptmap.cli.diff import checkpoint_shapes
from ckptmap.cli.summary import inspect_checkpoint
from ckptmap.errors import (
    DownloadError,
    IncompleteDownloadError,
    InvalidSafetensorsError,
    RemoteAccessDenied,
    RemoteChangedError,
    RemoteNotFoundError,
    RemoteUnavailableError,
    TensorNotFoundError,
)
from ckptmap.remote import RangeOptions, open_remote
from ckptmap.remote.reader import RangeReader
from ckptmap.schemes import CheckpointLoader, load_from_http

SIZE = 64 << 20
FALLBACK = "whole through the cache"


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> tuple[Path, bytes, bytes]:
    """The 64 MiB file, its bytes and its header bytes."""
    path = tmp_path_factory.mktemp("remote") / "model.safetensors"
    header = random_checkpoint(path, SIZE)
    return path, path.read_bytes(), header


@pytest.fixture(scope="module")
def small_file(tmp_path_factory) -> tuple[Path, bytes, bytes]:
    """A 2 MiB file of the same layout, for whole downloads."""
    path = tmp_path_factory.mktemp("remote") / "small.safetensors"
    header = random_checkpoint(path, 2 << 20, seed=1)
    return path, path.read_bytes(), header


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "home"
    monkeypatch.setenv("CKPTMAP_HOME", str(root))
    return root


@pytest.fixture
def server() -> Iterator[CheckpointServer]:
    with checkpoint_server() as srv:
        yield srv


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch):
    monkeypatch.setattr(RangeReader, "backoff_s", 0.0)
    monkeypatch.setattr(RangeReader, "attempts", 2)


def model_for(path: Path, names: list[str] | None = None) -> nn.Module:
    """A meta-device module whose parameters are the file's tensors (or those in `names`)."""
    root = nn.Module()
    with open_checkpoint(path) as local:
        entries = {e.name: e for e in local.entries()}
    for name in names if names is not None else list(entries):
        *owners, leaf = name.split(".")
        module = root
        for owner in owners:
            if not hasattr(module, owner):
                module.add_module(owner, nn.Module())
            module = getattr(module, owner)
        module.register_parameter(leaf, nn.Parameter(entries[name].meta, requires_grad=False))
    return root


def test_a_prefix_load_transfers_its_subtree_and_equals_a_full_load(model_file, server, home):
    path, body, header = model_file
    url = server.add("/models/model.safetensors", body, ranges="bytes")
    got = _load_checkpoint_with_prefix(SUBTREE, url)
    full = safetensors.torch.load_file(str(path))
    expected = {k[len(SUBTREE) + 1 :]: v for k, v in full.items() if k.startswith(SUBTREE + ".")}
    assert list(got) == list(expected)
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name
    sent = server.bytes_sent["/models/model.safetensors"]
    subtree = sum(t.nbytes for t in expected.values())
    assert subtree >= 0.099 * len(body)
    assert len(header) + subtree <= sent <= 0.15 * len(body), (sent, len(body))
    assert cache_entries(home) == []  # nothing was written to the cache


def test_plans_inspect_and_diff_transfer_the_header_alone(model_file, server, home, tmp_path):
    path, body, header = model_file
    url = server.add("/m.safetensors", body, ranges="bytes")
    full = safetensors.torch.load_file(str(path))
    subtree = [n for n in full if n.startswith(SUBTREE + ".")]
    plan = load_checkpoint(model_for(path, subtree), url, dry_run=True)
    assert plan.header_only and not plan.result.missing_keys
    assert sorted(plan.reads) == sorted(subtree)
    assert plan.bytes_to_read == sum(full[n].nbytes for n in subtree)
    assert server.bytes_sent["/m.safetensors"] == len(header)
    server.reset_counts()
    summary = inspect_checkpoint(url)
    local = inspect_checkpoint(path)
    assert server.bytes_sent["/m.safetensors"] == len(header)
    assert summary["path"] == url and summary["file_bytes"] == len(body)
    for key in ("tensor_count", "total_bytes", "dtypes", "tree", "metadata", "header_only"):
        assert summary[key] == local[key], key
    server.reset_counts()
    assert checkpoint_shapes(url)[0] == checkpoint_shapes(path)[0]
    assert server.bytes_sent["/m.safetensors"] == len(header)
    assert cache_entries(home) == []


def test_the_opened_checkpoint_answers_from_the_header(model_file, server, home):
    path, body, header = model_file
    url = server.add("/m.safetensors", body, ranges="bytes")
    with open_checkpoint(url) as opened, open_checkpoint(path) as local:
        assert opened.header_only and opened.size == len(body) == local.size
        assert opened.keys() == local.keys() == [e.name for e in opened.entries()]
        assert sorted(opened.keys()) == sorted(safetensors.safe_open(str(path), "pt").keys())
        assert opened.metadata == local.metadata == {"format": "pt", "seed": "0"}
        for remote_entry, local_entry in zip(opened.entries(), local.entries(), strict=True):
            assert remote_entry.file == url
            assert remote_entry == local_entry._replace(file=url)
        assert opened.meta_state_dict().keys() == local.meta_state_dict().keys()
        assert server.bytes_sent["/m.safetensors"] == len(header)
        with pytest.raises(TensorNotFoundError):
            opened.state_dict(["no.such.tensor"])
        assert server.bytes_sent["/m.safetensors"] == len(header)


DEVICES = ["meta", "cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_map_location_moves_what_was_fetched(small_file, server, home, device):
    path, body, _ = small_file
    url = server.add("/m.safetensors", body, ranges="bytes")
    got = _load_checkpoint_with_prefix(SUBTREE, url, map_location=device)
    full = safetensors.torch.load_file(str(path))
    for name, tensor in got.items():
        assert tensor.device.type == device
        if device != "meta":
            assert torch.equal(tensor.cpu(), full[f"{SUBTREE}.{name}"])


def test_many_small_requests_in_parallel_give_the_same_tensors(model_file, server, home):
    path, body, _ = model_file
    url = server.add("/m.safetensors", body, ranges="bytes")
    options = RangeOptions(gap_bytes=0, request_bytes=1 << 20, workers=4)
    opened = open_remote(url, load_from_http, options=options)
    assert opened is not None
    names = opened.keys()[::3]
    got = opened.state_dict(names)
    full = safetensors.torch.load_file(str(path))
    assert all(torch.equal(got[n], full[n]) for n in names)
    wanted = sum(full[n].nbytes for n in names)
    ranged = [r for p, r in server.requests if r and not r.startswith("bytes=0-")]
    assert len(ranged) > 8  # split into 1 MiB requests
    assert server.bytes_sent["/m.safetensors"] - wanted < 64 << 10  # header only beyond


def test_the_whole_checkpoint_goes_through_the_cache(small_file, server, home):
    path, body, _ = small_file
    url = server.add("/m.safetensors", body, ranges="bytes")
    model = model_for(path)
    model = model.to_empty(device="cpu")
    load_checkpoint(model, url, strict=True)
    full = safetensors.torch.load_file(str(path))
    assert all(torch.equal(t, full[n]) for n, t in model.state_dict().items())
    (entry,) = cache_entries(home)
    assert entry.read_bytes() == body
    with open_checkpoint(url) as opened:
        assert list(opened.load()) == list(full)


def test_a_server_without_ranges_falls_back_in_one_log_line(small_file, server, home, caplog):
    path, body, _ = small_file
    url = server.add("/plain.safetensors", body)  # Range headers ignored: 200, whole body
    with caplog.at_level(logging.INFO, logger="ckptmap"):
        got = _load_checkpoint_with_prefix(SUBTREE, url)
    lines = [r.getMessage() for r in caplog.records if FALLBACK in r.getMessage()]
    assert lines == [
        f"Downloading {url} whole through the cache: the server does not serve byte ranges "
        "(it answered a ranged request with the whole file (HTTP 200))"
    ]
    full = safetensors.torch.load_file(str(path))
    assert all(torch.equal(got[k], full[f"{SUBTREE}.{k}"]) for k in got)
    (entry,) = cache_entries(home)
    assert entry.read_bytes() == body


def test_hashed_names_fall_back_and_torch_zips_are_read_by_range(server, home, caplog):
    buffer = io.BytesIO()
    torch.save({"state_dict": {"w": torch.arange(6.0)}}, buffer)
    zip_url = server.add("/model.pth", buffer.getvalue(), ranges="bytes")
    data = safetensors.torch.save({"w": torch.arange(3.0)})
    digest = hashlib.sha256(data).hexdigest()[:8]
    hashed_url = server.add(f"/w-{digest}.safetensors", data, ranges="bytes")
    with caplog.at_level(logging.INFO, logger="ckptmap"):
        with open_checkpoint(zip_url) as opened:
            assert torch.equal(opened.state_dict(["w"])["w"], torch.arange(6.0))
        with open_checkpoint(hashed_url) as opened:
            assert torch.equal(opened.state_dict()["w"], torch.arange(3.0))
    lines = [r.getMessage() for r in caplog.records if FALLBACK in r.getMessage()]
    assert lines == [
        f"Downloading {hashed_url} whole through the cache: its name carries a SHA-256 prefix, "
        "which only a whole download can check",
    ]
    assert server.hits[f"/w-{digest}.safetensors"] == 1  # no ranged probe first
    assert (
        len(cache_entries(home)) == 1
    )  # the torch zip was read by range (tests/test_remote_pth.py)


def safetensors_whose_header_starts_like_a_pickle() -> bytes:
    """A safetensors file whose header length is 0x280 + 0x100 * k: its first two bytes are
    ``80 02`` .. ``80 05``, a pickle's opening."""
    for width in range(1, 2000):
        data = safetensors.torch.save({"w" * width: torch.arange(4.0), "b": torch.ones(2)})
        if data[0] == 0x80 and 2 <= data[1] <= 5:
            return data
    raise AssertionError("no header length of that form found")


def test_a_header_that_starts_like_a_pickle_is_still_read_by_range(server, home, caplog):
    data = safetensors_whose_header_starts_like_a_pickle()
    url = server.add("/pickle-like.safetensors", data, ranges="bytes")
    with caplog.at_level(logging.INFO, logger="ckptmap"):
        with open_checkpoint(url) as opened:
            assert len(opened.keys()) == 2
            got = opened.state_dict(["b"])  # one tensor: by range, not through the cache
    assert list(got) == ["b"] and torch.equal(got["b"], torch.ones(2))
    assert not [r for r in caplog.records if FALLBACK in r.getMessage()]
    assert cache_entries(home) == []


def test_a_custom_http_loader_is_respected(server, home):
    url = server.add("/m.safetensors", safetensors.torch.save({"w": torch.ones(2)}), ranges="bytes")
    calls: list[str] = []

    def mine(filename: str, map_location: Any = None) -> Any:
        calls.append(filename)
        return {"w": torch.zeros(2)}

    CheckpointLoader.register_scheme(("http://", "https://"), mine, force=True)
    try:
        with open_checkpoint(url) as opened:
            assert torch.equal(opened.state_dict()["w"], torch.zeros(2))
    finally:
        CheckpointLoader.register_scheme(("http://", "https://"), load_from_http, force=True)
    assert calls == [url] and server.hits["/m.safetensors"] == 0


# --- a file that changes, a server that misbehaves ---------------------------------------------


def test_a_file_replaced_between_requests_is_refused(model_file, server, home):
    _, body, _ = model_file
    url = server.add("/m.safetensors", body, ranges="bytes")
    with open_checkpoint(url) as opened:
        server.routes["/m.safetensors"].body = body[:-4] + b"\0\0\0\0"  # same size, new ETag
        with pytest.raises(RemoteChangedError) as info:
            opened.state_dict([f"{SUBTREE}.fpn.0.weight"])
    assert info.value.what == "If-Match" and url in str(info.value)
    assert cache_entries(home) == []


@pytest.mark.parametrize(
    ("validators", "last_modified", "change", "what"),
    [
        (False, "Mon, 01 Jan 2024 00:00:00 GMT", "last_modified", "Last-Modified"),
        (False, None, "size", "size"),
    ],
)
def test_changes_are_seen_without_if_match(
    model_file, server, home, validators, last_modified, change, what
):
    _, body, _ = model_file
    url = server.add(
        "/m.safetensors", body, ranges="bytes", validators=validators, last_modified=last_modified
    )
    with open_checkpoint(url) as opened:
        route = server.routes["/m.safetensors"]
        if change == "last_modified":
            route.last_modified = "Tue, 02 Jan 2024 00:00:00 GMT"
        else:
            route.body = body + b"\0" * 8
        with pytest.raises(RemoteChangedError) as info:
            opened.state_dict([f"{SUBTREE}.fpn.0.weight"])
    assert info.value.what == what


def test_short_bodies_are_retried_then_refused(model_file, server, home):
    _, body, _ = model_file
    url = server.add("/m.safetensors", body, ranges="bytes")
    with open_checkpoint(url) as opened:
        server.routes["/m.safetensors"].ranges = "short"
        server.reset_counts()
        with pytest.raises(IncompleteDownloadError) as info:
            opened.state_dict([f"{SUBTREE}.fpn.0.weight"])
    assert server.hits["/m.safetensors"] == 2  # RangeReader.attempts
    assert "short body" in str(info.value)
    assert cache_entries(home) == []


def test_a_wrong_range_is_refused(model_file, server, home):
    _, body, _ = model_file
    url = server.add("/m.safetensors", body, ranges="shifted")
    with pytest.raises(DownloadError, match="does not honour byte ranges"):
        open_checkpoint(url)


def test_transient_errors_are_retried(model_file, server, home):
    _, body, _ = model_file
    url = server.add("/m.safetensors", body, kind="flaky", status=503, fail_times=1, ranges="bytes")
    with open_checkpoint(url) as opened, open_checkpoint(model_file[0]) as local:
        assert opened.keys() == local.keys()
    assert server.hits["/m.safetensors"] == 3  # 503, then the probe again, then the header


@pytest.mark.parametrize(
    ("status", "error"),
    [(404, RemoteNotFoundError), (403, RemoteAccessDenied), (503, RemoteUnavailableError)],
)
def test_http_errors_are_typed(server, home, status, error):
    url = server.add("/m.safetensors", kind="status", status=status)
    with pytest.raises(error) as info:
        open_checkpoint(url)
    assert info.value.status == status and url in str(info.value)
    assert cache_entries(home) == []


def test_a_damaged_header_names_the_url(server, home):
    data = safetensors.torch.save({"w": torch.arange(8.0)})
    url = server.add("/cut.safetensors", data[:-4], ranges="bytes")
    with pytest.raises(InvalidSafetensorsError) as info:
        open_checkpoint(url)
    assert info.value.kind == "data_truncated" and url in str(info.value)
    assert cache_entries(home) == []
