"""Remote shard sets (``*.index.json`` + shards) written by huggingface_hub, served over http by a
real `http.server` and over S3 by moto: the index, then only the shards (and ranges) a load
needs, by byte range for safetensors and torch ``.bin`` shards alike; servers without ranges
are downloaded whole, shard by shard."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"

import huggingface_hub
import pytest
import torch
from servers import (
    SUBTREE,
    CheckpointServer,
    cache_entries,
    checkpoint_server,
    counting_moto_s3_server,
    random_state,
)

from ckptmap import objectstore, open_checkpoint
from ckptmap.checkpoint import _load_checkpoint_with_prefix
from ckptmap.cli.summary import inspect_checkpoint
from ckptmap.errors import ShardTensorMissingError, UnsafeShardPathError
from ckptmap.remote.reader import RangeReader

INDEX = "model.safetensors.index.json"
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def write_shards(directory: Path, *, safe: bool = True) -> dict[str, torch.Tensor]:
    state = random_state(8 << 20, seed=3)
    huggingface_hub.save_torch_state_dict(
        state, directory, max_shard_size="2MB", safe_serialization=safe
    )
    return state


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    directory = tmp_path_factory.mktemp("shards")
    return directory, write_shards(directory)


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("CKPTMAP_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(RangeReader, "backoff_s", 0.0)
    return tmp_path / "home"


@pytest.fixture
def server() -> Iterator[CheckpointServer]:
    with checkpoint_server() as srv:
        yield srv


def serve(server: CheckpointServer, directory: Path, **options) -> str:
    """Serves every file of `directory` under ``/repo/``; returns the index URL."""
    for path in sorted(directory.iterdir()):
        server.add(f"/repo/{path.name}", path.read_bytes(), **options)
    index = next(p.name for p in directory.iterdir() if p.name.endswith(".index.json"))
    return server.url(f"/repo/{index}")


def header_bytes(path: Path) -> int:
    with open(path, "rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")


def weight_map(directory: Path) -> dict[str, str]:
    index = next(p for p in directory.iterdir() if p.name.endswith(".index.json"))
    return json.loads(index.read_text())["weight_map"]


def test_a_prefix_load_reads_only_the_shards_it_needs(shards, server, home):
    directory, state = shards
    url = serve(server, directory, ranges="bytes")
    mapping = weight_map(directory)
    needed = {s for n, s in mapping.items() if n.startswith(SUBTREE + ".")}
    assert 1 <= len(needed) < len(set(mapping.values())) - 1  # a real subset of the shards
    got = _load_checkpoint_with_prefix(SUBTREE, url)
    expected = {k[len(SUBTREE) + 1 :]: v for k, v in state.items() if k.startswith(SUBTREE + ".")}
    assert list(got) == list(expected)
    assert all(torch.equal(got[k], v) for k, v in expected.items())
    for shard in set(mapping.values()):
        sent = server.bytes_sent[f"/repo/{shard}"]
        if shard not in needed:
            assert server.hits[f"/repo/{shard}"] == 0, shard
            continue
        subtree = sum(
            state[n].nbytes for n, s in mapping.items() if s == shard and n.startswith(SUBTREE)
        )
        size = (directory / shard).stat().st_size
        assert header_bytes(directory / shard) + subtree <= sent <= size
    assert server.bytes_sent[f"/repo/{INDEX}"] == (directory / INDEX).stat().st_size
    assert cache_entries(home) == []


def test_inspect_reads_the_index_and_every_header(shards, server, home):
    directory, _ = shards
    url = serve(server, directory, ranges="bytes")
    summary = inspect_checkpoint(url)
    local = inspect_checkpoint(directory)
    for key in ("tensor_count", "total_bytes", "dtypes", "tree", "metadata", "shards"):
        assert summary[key] == local[key], key
    for path in directory.iterdir():
        want = path.stat().st_size if path.name == INDEX else header_bytes(path)
        assert server.bytes_sent[f"/repo/{path.name}"] == want, path.name
    with open_checkpoint(url) as opened, open_checkpoint(directory) as here:
        assert opened.keys() == here.keys()
        assert [(e.name, e.dtype, e.shape, e.nbytes) for e in opened.entries()] == [
            (e.name, e.dtype, e.shape, e.nbytes) for e in here.entries()
        ]
        whole = opened.load()
        assert list(whole) == here.keys()
        assert all(torch.equal(whole[k], v) for k, v in here.state_dict().items())


def test_torch_shards_and_servers_without_ranges_are_downloaded_shard_by_shard(
    tmp_path, server, home, caplog
):
    directory = tmp_path / "bin"
    directory.mkdir()
    state = write_shards(directory, safe=False)
    url = serve(server, directory)  # no range support either
    mapping = weight_map(directory)
    needed = sorted({s for n, s in mapping.items() if n.startswith(SUBTREE + ".")})
    with caplog.at_level(logging.INFO, logger="ckptmap"):
        got = _load_checkpoint_with_prefix(SUBTREE, url)
    assert all(torch.equal(got[k], state[f"{SUBTREE}.{k}"]) for k in got)
    lines = [r.getMessage() for r in caplog.records if "whole through the cache" in r.getMessage()]
    assert len(lines) == len(needed)
    for line, shard in zip(lines, needed, strict=True):
        assert line.startswith(f"Downloading the shard {server.url('/repo/' + shard)} whole")
    assert sorted(p.name for p in cache_entries(home)) == needed
    assert all(server.hits[f"/repo/{s}"] == 0 for s in set(mapping.values()) - set(needed))


def test_torch_bin_shards_are_read_by_range_too(tmp_path, server, home):
    directory = tmp_path / "bin"
    directory.mkdir()
    state = write_shards(directory, safe=False)  # pytorch_model-0000N-of-0000M.bin
    url = serve(server, directory, ranges="bytes")
    mapping = weight_map(directory)
    lead = SUBTREE + "."
    needed = {s for n, s in mapping.items() if n.startswith(lead)}
    got = _load_checkpoint_with_prefix(SUBTREE, url)
    expected = {k[len(lead) :]: v for k, v in state.items() if k.startswith(lead)}
    assert list(got) == list(expected)
    assert all(torch.equal(got[k], v) for k, v in expected.items())
    subtree = sum(v.nbytes for v in expected.values())
    sent = sum(server.bytes_sent.get(f"/repo/{s}", 0) for s in set(mapping.values()))
    assert subtree <= sent <= subtree + len(needed) * (512 << 10), (sent, subtree)
    assert all(server.hits[f"/repo/{s}"] == 0 for s in set(mapping.values()) - needed)
    assert cache_entries(home) == []
    with open_checkpoint(url) as opened:
        entries = opened.entries()
    assert [(e.name, e.shape) for e in entries] == [(k, tuple(v.shape)) for k, v in state.items()]


def test_a_shard_name_outside_the_directory_is_refused_first(shards, server, home):
    directory, _ = shards
    index = json.loads((directory / INDEX).read_text())
    name = next(iter(index["weight_map"]))
    index["weight_map"][name] = "../../secret.safetensors"
    url = server.add("/repo/bad.safetensors.index.json", json.dumps(index).encode(), ranges="bytes")
    with pytest.raises(UnsafeShardPathError) as info:
        open_checkpoint(url)
    assert "../../secret.safetensors" in str(info.value)
    assert [p for p, _ in server.requests] == ["/repo/bad.safetensors.index.json"]


def test_an_index_that_places_a_tensor_in_the_wrong_shard_is_refused(shards, server, home):
    directory, _ = shards
    url = serve(server, directory, ranges="bytes")
    index = json.loads((directory / INDEX).read_text())
    index["weight_map"]["neck.extra"] = sorted(set(index["weight_map"].values()))[0]
    url = server.add(f"/repo/{INDEX}", json.dumps(index).encode(), ranges="bytes")
    with open_checkpoint(url) as opened, pytest.raises(ShardTensorMissingError) as info:
        opened.state_dict(["neck.extra"])
    assert "neck.extra" in str(info.value)


def test_a_shard_set_on_s3(shards, tmp_path, monkeypatch):
    directory, state = shards
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("CKPTMAP_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(objectstore, "DEFAULT_MAX_ATTEMPTS", 1)
    import boto3

    with counting_moto_s3_server() as (endpoint, counter):
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        client = boto3.client("s3", endpoint_url=endpoint)
        client.create_bucket(Bucket="hub")
        for path in directory.iterdir():
            client.put_object(Bucket="hub", Key=f"org/model/{path.name}", Body=path.read_bytes())
        counter.reset()
        got = _load_checkpoint_with_prefix(SUBTREE, f"s3://hub/org/model/{INDEX}")
        mapping = weight_map(directory)
        needed = {s for n, s in mapping.items() if n.startswith(SUBTREE + ".")}
        touched = {p.rsplit("/", 1)[1] for p, _ in counter.requests} - {INDEX}
    assert touched == needed
    assert all(torch.equal(got[k], state[f"{SUBTREE}.{k}"]) for k in got)
    assert cache_entries(tmp_path / "home") == []
