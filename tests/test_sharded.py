"""Sharded checkpoints: the index, shard path safety, missing pieces, laziness, values."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file as st_save_file

from ckptmap.errors import (
    AmbiguousIndexError,
    CheckpointIsADirectoryError,
    CheckpointNotFoundError,
    CkptmapError,
    InvalidSafetensorsError,
    InvalidShardIndexError,
    ShardNotFoundError,
    ShardTensorMissingError,
    TensorNotFoundError,
    UnsafeShardPathError,
)
from ckptmap.formats.index import find_index
from ckptmap.formats.sharded import (
    ShardedCheckpoint,
    ShardEntry,
    load_sharded,
    open_sharded,
)

WEIGHTS = {
    "embed.weight": torch.arange(12.0).reshape(3, 4),
    "layers.0.weight": torch.full((4, 4), 1.0, dtype=torch.bfloat16),
    "layers.0.bias": torch.arange(4, dtype=torch.int64),
    "layers.1.weight": torch.full((4, 4), 2.0, dtype=torch.bfloat16),
    "head.weight": torch.tensor([True, False]),
}
SPLIT = {
    "model-00001-of-00002": ["embed.weight", "layers.0.weight", "layers.0.bias"],
    "model-00002-of-00002": ["layers.1.weight", "head.weight"],
}


def write_index(directory: Path, weight_map: object, name: str = "model.index.json") -> Path:
    path = directory / name
    path.write_text(json.dumps({"metadata": {"total_size": 123}, "weight_map": weight_map}))
    return path


def make_sharded(directory: Path, kind: str = "safetensors", index: str | None = None) -> Path:
    """Writes WEIGHTS in two shards (`kind`: safetensors, bin or mixed) plus the index."""
    weight_map = {}
    for i, (shard, names) in enumerate(SPLIT.items()):
        part = {n: WEIGHTS[n] for n in names}
        as_bin = kind == "bin" or (kind == "mixed" and i == 1)
        filename = f"{shard}.{'bin' if as_bin else 'safetensors'}"
        if as_bin:
            torch.save(part, directory / filename)
        else:
            st_save_file(part, str(directory / filename))
        weight_map |= dict.fromkeys(names, filename)
    default = "model.safetensors.index.json" if kind == "safetensors" else "model.bin.index.json"
    return write_index(directory, weight_map, index or default)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


@pytest.mark.parametrize("kind", ["safetensors", "bin", "mixed"])
def test_values_equal_the_original_weights(tmp_path: Path, kind: str) -> None:
    index = make_sharded(tmp_path, kind)
    for loaded in (load_sharded(index), load_sharded(tmp_path)):
        assert list(loaded) == list(WEIGHTS)  # index order
        for name, t in WEIGHTS.items():
            assert same(loaded[name], t), name


def test_the_plan_comes_from_headers_and_the_index(tmp_path: Path) -> None:
    index = make_sharded(tmp_path, "mixed")
    with ShardedCheckpoint(index) as ckpt:
        assert ckpt.metadata == {"total_size": 123}
        assert ckpt.shard_of("head.weight") == "model-00002-of-00002.bin"
        assert len(ckpt) == 5 and "embed.weight" in ckpt and "nope" not in ckpt
        assert set(ckpt._pending) == {"model-00002-of-00002.bin"}  # not loaded yet
        first = [e for e in ckpt.plan() if e.shard.endswith(".safetensors")]
        assert first[0] == ShardEntry(
            "embed.weight", "model-00001-of-00002.safetensors", "float32", (3, 4), 48
        )
        plan = {e.name: e for e in ckpt.plan()}
        assert plan["head.weight"] == ShardEntry(
            "head.weight", "model-00002-of-00002.bin", "bool", (2,), 2
        )
        assert "tensors=5" in repr(ckpt) and "shards=2" in repr(ckpt)


def test_torch_shards_load_only_when_needed(tmp_path: Path) -> None:
    index = make_sharded(tmp_path, "bin")
    ckpt = open_sharded(index)
    assert len(ckpt._pending) == 2
    assert list(ckpt.load(prefix="layers.0")) == ["layers.0.weight", "layers.0.bias"]
    assert list(ckpt._pending) == ["model-00002-of-00002.bin"]
    with pytest.raises(TensorNotFoundError, match="'nope'") as info:
        ckpt["nope"]
    assert isinstance(info.value, KeyError) and str(index) in str(info.value)
    assert list(ckpt.load(["head.weight"])) == ["head.weight"]
    assert not ckpt._pending


def test_map_location(tmp_path: Path) -> None:
    index = make_sharded(tmp_path, "mixed")
    loaded = load_sharded(index, map_location="meta")
    assert all(t.is_meta for t in loaded.values())
    loaded = load_sharded(index, map_location={"cpu": "cpu"})
    assert same(loaded["head.weight"], WEIGHTS["head.weight"])


def test_dispatcher_routes_index_and_directory_here(tmp_path: Path) -> None:
    from ckptmap.formats import load_file

    index = make_sharded(tmp_path)
    for path in (index, tmp_path):
        loaded = load_file(path)
        assert same(loaded["layers.1.weight"], WEIGHTS["layers.1.weight"])


# --- finding the index -------------------------------------------------------------------------


def test_directory_with_one_index_or_a_preferred_one(tmp_path: Path) -> None:
    index = make_sharded(tmp_path, "safetensors")
    assert find_index(tmp_path) == str(index)
    # Hugging Face ships both: the safetensors index wins.
    write_index(tmp_path, {}, "pytorch_model.bin.index.json")
    assert find_index(tmp_path) == str(index)
    write_index(tmp_path, {}, "other.safetensors.index.json")
    with pytest.raises(AmbiguousIndexError, match="several") as info:
        find_index(tmp_path)
    assert str(tmp_path) in str(info.value) and isinstance(info.value, ValueError)


def test_directory_without_index_and_missing_paths(tmp_path: Path) -> None:
    with pytest.raises(CheckpointIsADirectoryError):
        ShardedCheckpoint(tmp_path)
    with pytest.raises(CheckpointNotFoundError):
        ShardedCheckpoint(tmp_path / "missing.index.json")


# --- bad indexes --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        ("{not json", "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        ("[1, 2]", "top level is a list"),
        ('{"metadata": {}}', 'no "weight_map"'),
        ('{"weight_map": []}', 'no "weight_map"'),
        ('{"weight_map": {"a": 1}}', "maps 'a' to a int"),
        ('{"weight_map": {"a": null}}', "maps 'a' to a NoneType"),
        ('{"weight_map": {"a": "x.safetensors", "a": "y.safetensors"}}', "the key 'a' twice"),
        ("[" * 100_000 + "]" * 100_000, "not valid JSON"),
    ],
    ids=["syntax", "utf8", "list", "no-map", "map-list", "int", "null", "duplicate", "deep"],
)
def test_invalid_index_is_a_typed_error(tmp_path: Path, content: str | bytes, reason: str) -> None:
    path = tmp_path / "model.index.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    with pytest.raises(InvalidShardIndexError) as info:
        ShardedCheckpoint(path)
    message = str(info.value)
    assert reason in message and str(path) in message and "re-download" in message
    assert isinstance(info.value, (CkptmapError, ValueError))


UNSAFE = [
    ("../outside.safetensors", "'..' path component"),
    ("sub/../../outside.safetensors", "'..' path component"),
    ("/etc/passwd", "absolute path"),
    ("C:model.safetensors", "drive letter"),
    ("c:/model.safetensors", "drive letter"),
    ("..\\outside.safetensors", "backslash"),
    ("model\x00.safetensors", "control character"),
    ("", "is empty"),
    ("./model.safetensors", "'.' path component"),
    ("sub//model.safetensors", "an empty path component"),
]


@pytest.mark.parametrize(("shard", "reason"), UNSAFE, ids=[u[1] for u in UNSAFE])
def test_unsafe_shard_names_are_rejected_before_any_file_is_opened(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shard: str, reason: str
) -> None:
    inside = tmp_path / "ckpt"
    inside.mkdir()
    st_save_file({"a": torch.ones(1)}, str(inside / "good.safetensors"))
    (tmp_path / "outside.safetensors").write_bytes(b"secret")
    index = write_index(inside, {"a": "good.safetensors", "b": shard})
    opened: list[str] = []
    import ckptmap.formats.sharded as sharded

    monkeypatch.setattr(sharded, "sniff", lambda p: opened.append(p))
    monkeypatch.setattr(sharded, "SafetensorsFile", lambda p, **kw: opened.append(p))
    with pytest.raises(UnsafeShardPathError) as info:
        ShardedCheckpoint(index)
    assert opened == []
    err = info.value
    assert reason in str(err) and str(index) in str(err) and "tampered" in str(err)
    assert err.shard == shard and isinstance(err, ValueError)


def test_symlinks_escaping_the_directory_are_rejected(tmp_path: Path) -> None:
    inside = tmp_path / "ckpt"
    inside.mkdir()
    st_save_file({"a": torch.ones(1)}, str(tmp_path / "elsewhere.safetensors"))
    (inside / "link.safetensors").symlink_to(tmp_path / "elsewhere.safetensors")
    (inside / "sub").symlink_to(tmp_path)
    for shard in ["link.safetensors", "sub/elsewhere.safetensors"]:
        index = write_index(inside, {"a": shard})
        with pytest.raises(UnsafeShardPathError, match="outside"):
            ShardedCheckpoint(index)


def test_symlinks_inside_the_directory_and_the_hf_cache_layout_work(tmp_path: Path) -> None:
    inside = tmp_path / "ckpt"
    inside.mkdir()
    st_save_file({"a": torch.ones(1)}, str(inside / "real.safetensors"))
    (inside / "link.safetensors").symlink_to("real.safetensors")
    index = write_index(inside, {"a": "link.safetensors"})
    assert load_sharded(index)["a"].tolist() == [1.0]
    # ~/.cache/huggingface/hub/models--x/snapshots/<rev>/ links into ../../blobs/.
    repo = tmp_path / "models--org--name"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    st_save_file({"a": torch.ones(2)}, str(repo / "blobs" / "deadbeef"))
    (snapshot / "model.safetensors").symlink_to("../../blobs/deadbeef")
    index = write_index(snapshot, {"a": "model.safetensors"})
    assert load_sharded(snapshot)["a"].tolist() == [1.0, 1.0]


def test_missing_shards_are_named(tmp_path: Path) -> None:
    index = make_sharded(tmp_path)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ShardNotFoundError) as info:
        ShardedCheckpoint(index)
    err = info.value
    assert isinstance(err, FileNotFoundError) and isinstance(err, CheckpointNotFoundError)
    assert err.missing == ["model-00002-of-00002.safetensors"]
    assert "model-00002-of-00002.safetensors" in str(err) and str(index) in str(err)
    assert "Download or copy every shard" in str(err)
    assert err.filename == str(tmp_path / "model-00002-of-00002.safetensors")


def test_a_tensor_absent_from_its_safetensors_shard(tmp_path: Path) -> None:
    index = make_sharded(tmp_path)
    doc = json.loads(index.read_text())
    doc["weight_map"]["ghost.weight"] = "model-00001-of-00002.safetensors"
    index.write_text(json.dumps(doc))
    with pytest.raises(ShardTensorMissingError) as info:
        ShardedCheckpoint(index)
    err = info.value
    assert isinstance(err, KeyError) and err.name == "ghost.weight"
    message = str(err)
    assert "'ghost.weight'" in message and "model-00001-of-00002.safetensors" in message
    assert str(index) in message and "Re-download" in message


def test_a_tensor_absent_from_its_torch_shard(tmp_path: Path) -> None:
    index = make_sharded(tmp_path, "bin")
    doc = json.loads(index.read_text())
    doc["weight_map"]["ghost.weight"] = "model-00002-of-00002.bin"
    index.write_text(json.dumps(doc))
    ckpt = ShardedCheckpoint(index)  # torch shards are checked when loaded
    assert same(ckpt["embed.weight"], WEIGHTS["embed.weight"])
    with pytest.raises(ShardTensorMissingError, match=r"'ghost\.weight'"):
        ckpt["head.weight"]


def test_a_bad_shard_is_its_own_typed_error(tmp_path: Path) -> None:
    index = make_sharded(tmp_path)
    shard = tmp_path / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-3])
    with pytest.raises(InvalidSafetensorsError, match="data truncated") as info:
        ShardedCheckpoint(index)
    assert str(shard) in str(info.value)


def test_errors_survive_pickling(tmp_path: Path) -> None:
    errors = [
        InvalidShardIndexError("i.json", "why"),
        UnsafeShardPathError("i.json", "../x", "has a '..' path component"),
        AmbiguousIndexError("d", ["a.index.json", "b.index.json"]),
        ShardNotFoundError("i.json", "d", ["x", "y"]),
        ShardTensorMissingError("i.json", "s", "n"),
    ]
    for err in errors:
        again = pickle.loads(pickle.dumps(err))
        assert type(again) is type(err) and str(again) == str(err)


def test_tensors_beyond_the_index_are_ignored(tmp_path: Path) -> None:
    st_save_file({"a": torch.ones(1), "extra": torch.zeros(1)}, str(tmp_path / "s.safetensors"))
    index = write_index(tmp_path, {"a": "s.safetensors"})
    assert list(load_sharded(index)) == ["a"]
    assert os.path.exists(index)
