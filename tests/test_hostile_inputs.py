"""Odd but valid inputs load; odd invalid ones are typed errors; mmap=False means no map.

Each case is a real file (written by torch, safetensors or ckptmap) or a real server on
127.0.0.1: a safetensors header with leading whitespace (which safetensors itself reads),
schemes in upper case, ``file://`` URIs, local paths that contain ``:s3://``, JSON nested
thousands deep in an index, a zoo table or a header, odd ``_metadata``, a ``map_location`` that
raises or returns a tensor, URLs that end in ``/``, a save into a read-only directory.
"""

from __future__ import annotations

import json
import os
import struct
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from probes import mapped_from
from safetensors.torch import load_file as st_load_file
from safetensors.torch import save_file
from servers import checkpoint_bytes, checkpoint_server

import ckptmap
from ckptmap.cache import cached_download
from ckptmap.errors import (
    CorruptCheckpointError,
    InvalidShardIndexError,
    InvalidStateDictError,
    MapLocationError,
    ZooTableError,
)
from ckptmap.formats import load_file
from ckptmap.formats.sharded import ShardedCheckpoint
from ckptmap.formats.sniff import Format, sniff
from ckptmap.latest import find_latest_checkpoint, is_complete_checkpoint
from ckptmap.magic import checkpoint_kind
from ckptmap.schemes import CheckpointLoader, load_from_ceph, load_from_http, load_from_local

BODY = checkpoint_bytes(0)
FAST = {"backoff_s": 0.0, "max_backoff_s": 0.0, "timeout_s": 10.0}


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("CKPTMAP_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


# --- safetensors headers with leading whitespace ---------------------------------------------


def _with_leading_whitespace(path: Path, padding: bytes) -> bytes:
    save_file({"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(4)}, str(path))
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = padding + raw[8 : 8 + length].rstrip()
    header += b" " * (-len(header) % 8)
    data = struct.pack("<Q", len(header)) + header + raw[8 + length :]
    path.write_bytes(data)
    return data


@pytest.mark.parametrize("padding", [b" ", b"\n\t\r ", b" " * 5000])
def test_a_safetensors_header_may_start_with_whitespace(tmp_path, home, padding):
    path = tmp_path / "ws.safetensors"
    data = _with_leading_whitespace(path, padding)
    expected = st_load_file(str(path))  # the reference implementation reads it
    assert sniff(path).format is Format.SAFETENSORS
    loaded = load_file(path)
    assert all(torch.equal(loaded[k], v) for k, v in expected.items())
    assert is_complete_checkpoint(path)
    (tmp_path / "last_checkpoint").write_text(str(path))
    assert find_latest_checkpoint(tmp_path) == str(path)
    assert checkpoint_kind(data[: 9 + len(padding)]) == "safetensors"
    with checkpoint_server() as server:
        url = server.add("/ws.safetensors", data)
        assert cached_download(url, **FAST).read_bytes() == data


# --- schemes in any case, file:// URIs, local paths with :s3:// ---------------------------------


def test_schemes_are_case_insensitive(home):
    with checkpoint_server() as server:
        url = server.add("/upper.pth", BODY)
        for spelled in (url.replace("http://", "HTTP://"), url.replace("http://", "Http://")):
            assert CheckpointLoader._get_checkpoint_loader(spelled) is load_from_http
            checkpoint = CheckpointLoader.load_checkpoint(spelled, map_location="cpu")
            assert set(checkpoint["state_dict"]) == {"weight", "bias"}
        assert server.hits["/upper.pth"] == 1  # one cache entry for every spelling
    for uri in ("S3://bucket/k.pth", "cluster1:S3://bucket/k.pth"):
        assert CheckpointLoader._get_checkpoint_loader(uri) is load_from_ceph


def test_file_uris_are_local_files(tmp_path):
    directory = tmp_path / "with space"
    directory.mkdir()
    path = directory / "ckpt#1.pth"
    path.write_bytes(BODY)
    for uri in (path.as_uri(), "FILE://" + path.as_uri()[len("file://") :]):
        checkpoint = CheckpointLoader.load_checkpoint(uri)
        assert set(checkpoint["state_dict"]) == {"weight", "bias"}
    localhost = "file://localhost" + path.as_uri()[len("file://") :]
    assert set(CheckpointLoader.load_checkpoint(localhost)["state_dict"]) == {"weight", "bias"}
    with pytest.raises(ValueError, match=r"another|host"):
        CheckpointLoader.load_checkpoint("file://fileserver/share/ckpt.pth")
    with pytest.raises(FileNotFoundError):
        CheckpointLoader.load_checkpoint((directory / "missing.pth").as_uri())


def test_an_existing_local_path_with_an_embedded_scheme_is_local(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    nested = Path("runs", "a:s3:", "", "bucket")
    nested.mkdir(parents=True)
    (nested / "ckpt.pth").write_bytes(BODY)
    local = "runs/a:s3://bucket/ckpt.pth"
    assert os.path.exists(local)
    assert CheckpointLoader._get_checkpoint_loader(local) is load_from_local
    assert set(CheckpointLoader.load_checkpoint(local)["state_dict"]) == {"weight", "bias"}
    # A missing one still goes to the scheme it names, and so does a URI that starts with one.
    assert CheckpointLoader._get_checkpoint_loader("runs/b:s3://bucket/x.pth") is load_from_ceph
    Path("s3:", "bucket").mkdir(parents=True)
    Path("s3:", "bucket", "k.pth").write_bytes(BODY)
    assert CheckpointLoader._get_checkpoint_loader("s3://bucket/k.pth") is load_from_ceph


# --- deeply nested JSON ------------------------------------------------------------------------

DEEP = "[" * 100_000 + "]" * 100_000


def test_deep_json_in_an_index_is_a_typed_error(tmp_path):
    index = tmp_path / "model.safetensors.index.json"
    index.write_text('{"weight_map": {"a": "x.safetensors"}, "metadata": ' + DEEP + "}")
    with pytest.raises((InvalidShardIndexError, CorruptCheckpointError)) as info:
        load_file(index)
    assert str(index) in str(info.value) and "nested too deeply" in str(info.value)
    with pytest.raises(InvalidShardIndexError, match="nested too deeply"):
        ShardedCheckpoint(index)
    index.write_text(DEEP)
    with pytest.raises(CorruptCheckpointError, match=str(index)):
        load_file(index)
    assert not is_complete_checkpoint(index)


def test_deep_json_in_a_safetensors_header_is_a_typed_error(tmp_path):
    header = ('{"__metadata__": {"a": "b"}, "w": {"dtype": "F32", "shape": ' + DEEP + "}}").encode()
    header += b" " * (-len(header) % 8)
    path = tmp_path / "deep.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(CorruptCheckpointError) as info:
        load_file(path)
    assert str(path) in str(info.value)
    assert not is_complete_checkpoint(path)


def test_deep_json_in_a_zoo_table_is_a_typed_error(home):
    home.mkdir(parents=True)
    (home / "open_mmlab.json").write_text(DEEP)
    with pytest.raises(ZooTableError, match="nested too deeply"):
        CheckpointLoader.load_checkpoint("open-mmlab://resnet50")


# --- odd _metadata and map_location -----------------------------------------------------------


@pytest.mark.parametrize(
    ("metadata", "words"),
    [
        ([1, 2], "of type list"),
        ("version 2", "of type str"),
        ({"0": "x"}, "module '0' of type str"),
        ({"0": None}, "of type NoneType"),
        ({"0": {"version": "2"}}, "version '2'"),
        ({"0": {"version": 2.5}}, "version 2.5"),
        ({1: {"version": 1}}, "keyed by 1"),
    ],
)
def test_odd_metadata_is_a_typed_error(tmp_path, metadata, words):
    model = torch.nn.Sequential(torch.nn.BatchNorm1d(3))
    state = model.state_dict()
    state._metadata = metadata
    torch.save(state, tmp_path / "odd.pth")
    with pytest.raises(InvalidStateDictError, match="_metadata") as info:
        ckptmap.load_checkpoint(model, tmp_path / "odd.pth")
    assert words in str(info.value) and isinstance(info.value, TypeError)
    with pytest.raises(InvalidStateDictError):
        ckptmap._load_checkpoint_with_prefix("0", tmp_path / "odd.pth")


def test_usual_metadata_still_loads(tmp_path):
    model = torch.nn.Sequential(torch.nn.BatchNorm1d(3))
    state = model.state_dict()
    state._metadata = OrderedDict({"": {"version": 1}, "0": {"version": 2, "extra": "x"}})
    torch.save(state, tmp_path / "ok.pth")
    ckptmap.load_checkpoint(model, tmp_path / "ok.pth", strict=True)


def _raises(storage, location):
    raise ZeroDivisionError("boom")


@pytest.mark.parametrize(
    ("map_location", "words"),
    [
        (_raises, "raised ZeroDivisionError: boom"),
        (lambda storage, location: 5, "returned an object of type int"),
        (lambda storage, location: torch.ones(2), "returned an object of type Tensor"),
        ([1, 2], "is a list"),
    ],
    ids=["raises", "int", "tensor", "list"],
)
@pytest.mark.parametrize("fmt", ["pth", "legacy", "safetensors"])
def test_a_bad_map_location_is_a_typed_error(tmp_path, map_location, words, fmt):
    path = tmp_path / f"ckpt.{fmt}"
    state = {"w": torch.ones(3)}
    if fmt == "safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path, _use_new_zipfile_serialization=fmt == "pth")
    with pytest.raises(MapLocationError) as info:
        load_file(path, map_location=map_location)
    assert words in str(info.value) and str(path) in str(info.value)
    assert isinstance(info.value, TypeError)


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_good_map_location_callables_still_work(tmp_path, fmt):
    path = tmp_path / f"ckpt.{fmt}"
    state = {"w": torch.arange(3.0)}
    save_file(state, str(path)) if fmt == "safetensors" else torch.save(state, path)
    for fn in (lambda s, loc: s, lambda s, loc: None, lambda s, loc: s.cpu()):
        assert torch.equal(load_file(path, map_location=fn)["w"], torch.arange(3.0))


# --- mmap=False -------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["pth", "safetensors", "sharded"])
def test_mmap_false_leaves_no_map_of_the_file(tmp_path, fmt):
    state = {"w": torch.arange(4096.0), "b": torch.ones(2048)}
    if fmt == "pth":
        path = tmp_path / "m.pth"
        torch.save(state, path)
        files = [path]
    elif fmt == "safetensors":
        path = tmp_path / "m.safetensors"
        save_file(state, str(path))
        files = [path]
    else:
        path = Path(ckptmap.save_checkpoint(state, tmp_path / "m.safetensors", max_shard_size=9000))
        files = sorted(tmp_path.glob("m-*.safetensors"))
        assert len(files) == 2
    unmapped = load_file(path, mmap=False)
    mapped = load_file(path, mmap=True)
    for key in state:
        assert torch.equal(unmapped[key], state[key])
        assert not any(mapped_from(unmapped[key], f) for f in files)
    assert any(mapped_from(mapped["w"], f) for f in files)  # the probe sees a real map
    with open("/proc/self/maps") as maps:
        listed = maps.read()
    del mapped
    import gc

    gc.collect()
    with open("/proc/self/maps") as maps:
        after = maps.read()
    assert any(str(f) in listed for f in files)
    assert not any(str(f) in after for f in files), "a map outlived the tensors"
    # The unmapped copy is independent of the file from now on.
    for f in files:
        f.write_bytes(b"")
    assert torch.equal(unmapped["w"], state["w"])


# --- errors that name what the caller named --------------------------------------------------


# A save into a write-protected directory names the target, never the temp file: tested as an
# unprivileged user (root writes anywhere) in test_save_files.py,
# test_write_protection_is_honoured_and_errors_name_the_target.


def test_write_errors_name_the_target_not_the_temp_file(tmp_path):
    from ckptmap.atomic import atomic_write

    target = tmp_path / "epoch_1.pth"
    target.mkdir()  # os.replace of a file over a directory fails
    with pytest.raises(OSError) as info, atomic_write(target) as out:
        out.write(b"data")
    assert str(target) in str(info.value) and "ckptmap-tmp" not in str(info.value)
    assert [p.name for p in tmp_path.iterdir()] == ["epoch_1.pth"]


def test_an_odd_index_metadata_value_is_ignored(tmp_path):
    save_file({"a": torch.ones(2)}, str(tmp_path / "s.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": [1, 2], "weight_map": {"a": "s.safetensors"}})
    )
    assert torch.equal(load_file(tmp_path)["a"], torch.ones(2))
