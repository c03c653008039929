"""save_checkpoint, get_state_dict and weights_to_cpu: round trips and the OpenMMLab contracts.

Files are read back with torch.load(weights_only=True), safetensors.torch.load_file and
ckptmap.formats.load_file. S3 runs against a moto server on 127.0.0.1.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections import OrderedDict, defaultdict, namedtuple
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import _TYPES as _ST_TYPES
from safetensors.torch import load_file as st_load_file
from torch import nn

import ckptmap
from ckptmap.atomic import is_temp_file
from ckptmap.errors import CheckpointSaveError, NotSerializableError, UnsupportedSaveTargetError
from ckptmap.formats import load_file
from ckptmap.formats.safetensors_write import write_safetensors
from ckptmap.save import get_state_dict, is_shard_file, parse_size, save_checkpoint, weights_to_cpu
from ckptmap.save import sinks as sinks_module

# --- helpers -------------------------------------------------------------------------------------

# Sub-byte ints have no storage of their own; quantized tensors need a quantizer (own test).
_SKIPPED = {f"{s}int{n}" for s in ("", "u") for n in range(1, 8)} | {
    "qint8",
    "qint32",
    "quint8",
    "quint4x2",
    "quint2x4",
}


def _all_dtypes() -> list[torch.dtype]:
    """Every dtype a dense tensor can have."""
    found: list[torch.dtype] = []
    for name in sorted(dir(torch)):
        dtype = getattr(torch, name)
        if not isinstance(dtype, torch.dtype) or str(dtype).removeprefix("torch.") in _SKIPPED:
            continue
        if dtype not in found:
            found.append(dtype)
    return found


ALL_DTYPES = _all_dtypes()
SAFETENSORS_DTYPES = [d for d in ALL_DTYPES if d in set(_ST_TYPES.values())]


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Random bytes viewed as `dtype` (bit patterns such as NaNs included)."""
    gen = torch.Generator().manual_seed(seed)
    with warnings.catch_warnings():  # complex32 warns that it is experimental
        warnings.simplefilter("ignore", UserWarning)
        out = torch.empty(shape, dtype=dtype)
    raw = torch.randint(0, 256, (out.numel() * out.element_size(),), generator=gen)
    if dtype == torch.bool:
        return (raw[: out.numel()] % 2).bool().reshape(shape)
    out.reshape(-1).view(torch.uint8).copy_(raw.to(torch.uint8))
    return out


def raw_bytes(t: torch.Tensor) -> bytes:
    return bytes(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


def assert_same_tensors(got, expected) -> None:
    assert list(got) == list(expected) or sorted(got) == sorted(expected)
    for key, value in expected.items():
        assert got[key].dtype == value.dtype, key
        assert got[key].shape == value.shape, key
        assert raw_bytes(got[key]) == raw_bytes(value), key


def load_sharded(index_path: str | Path) -> tuple[dict, dict]:
    """The state dict and metadata of a sharded checkpoint, read shard by shard."""
    index_path = Path(index_path)
    index = json.loads(index_path.read_text())
    merged: dict[str, torch.Tensor] = {}
    for shard in sorted(set(index["weight_map"].values())):
        path = index_path.parent / shard
        if shard.endswith(".safetensors"):
            part = st_load_file(path)
        else:
            part = torch.load(path, weights_only=True)
        assert set(part) == {k for k, v in index["weight_map"].items() if v == shard}
        merged.update(part)
    return merged, index["metadata"]


class Net(nn.Module):
    CLASSES = ("cat", "dog")

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


def trained_net_and_optimizers() -> tuple[Net, torch.optim.Optimizer, torch.optim.Optimizer]:
    torch.manual_seed(0)
    net = Net()
    adam = torch.optim.Adam(net.head.parameters(), lr=1e-3)
    sgd = torch.optim.SGD(net.conv.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(2, 3, 5, 5)
    out = net.head(net.bn(net.conv(x)).mean((2, 3)))
    out.sum().backward()
    adam.step()
    sgd.step()
    return net, adam, sgd


# --- round trips: .pth ---------------------------------------------------------------------------


def test_every_dtype_round_trips_through_pth(tmp_path):
    state = OrderedDict(
        (f"t.{str(d).removeprefix('torch.')}", random_tensor(d, (3, 5), i))
        for i, d in enumerate(ALL_DTYPES)
    )
    state["scalar"] = torch.tensor(2.5)
    state["empty"] = torch.empty(0, 3)
    state["view"] = state["t.float32"][1:, ::2]  # non-contiguous view sharing storage
    path = tmp_path / "all.pth"
    assert save_checkpoint({"state_dict": state}, path) == str(path)
    loaded = torch.load(path, weights_only=True)["state_dict"]
    assert_same_tensors(loaded, state)
    # Aliasing survives as torch.save keeps it.
    assert (
        loaded["view"].untyped_storage().data_ptr()
        == loaded["t.float32"].untyped_storage().data_ptr()
    )
    assert os.listdir(tmp_path) == ["all.pth"]


def test_quantized_tensors_round_trip_through_pth(tmp_path):
    with warnings.catch_warnings():  # torch deprecates quantized tensor creation
        warnings.simplefilter("ignore", UserWarning)
        q = torch.quantize_per_tensor(torch.randn(4, 4), 0.1, 3, torch.quint8)
        save_checkpoint({"q": q}, tmp_path / "q.pth")
        loaded = torch.load(tmp_path / "q.pth", weights_only=True)["q"]
    assert loaded.dtype == torch.quint8 and torch.equal(loaded.int_repr(), q.int_repr())


def test_nested_meta_and_optimizer_state_round_trip(tmp_path):
    net, adam, sgd = trained_net_and_optimizers()
    checkpoint = {
        "meta": {"epoch": 3, "cfg": {"lr": [1e-3, 1e-4], "name": "ü"}, "nested": {"a": {"b": ()}}},
        "state_dict": weights_to_cpu(get_state_dict(net)),
        "optimizer": {"adam": adam.state_dict(), "sgd": sgd.state_dict()},
    }
    save_checkpoint(checkpoint, tmp_path / "c.pth")
    loaded = torch.load(tmp_path / "c.pth", weights_only=True)
    assert loaded["meta"] == checkpoint["meta"]
    assert_same_tensors(loaded["state_dict"], checkpoint["state_dict"])
    assert loaded["state_dict"]._metadata == checkpoint["state_dict"]._metadata
    for name, opt in (("adam", adam), ("sgd", sgd)):
        state = loaded["optimizer"][name]
        assert state["param_groups"] == opt.state_dict()["param_groups"]
        for pid, entries in opt.state_dict()["state"].items():
            for key, value in entries.items():
                assert torch.equal(
                    torch.as_tensor(state["state"][pid][key]), torch.as_tensor(value)
                )
    again = load_file(tmp_path / "c.pth")
    assert again["meta"] == checkpoint["meta"]
    assert_same_tensors(again["state_dict"], checkpoint["state_dict"])


def test_mmcv_form_builds_the_checkpoint_as_mmcv_does(tmp_path):
    net, adam, sgd = trained_net_and_optimizers()
    meta = {"epoch": 7}
    wrapped = nn.DataParallel(net)
    save_checkpoint(wrapped, tmp_path / "one.pth", adam, meta)
    assert meta == {"epoch": 7}, "the caller's meta is not modified"
    loaded = torch.load(tmp_path / "one.pth", weights_only=True)
    assert set(loaded) == {"meta", "state_dict", "optimizer"}
    assert loaded["meta"]["epoch"] == 7
    assert loaded["meta"]["ckptmap_version"] == ckptmap.__version__
    assert loaded["meta"]["torch_version"] == str(torch.__version__)
    assert loaded["meta"]["CLASSES"] == ("cat", "dog")
    assert isinstance(loaded["meta"]["time"], str) and len(loaded["meta"]["time"]) == 24
    assert_same_tensors(loaded["state_dict"], net.state_dict())
    assert loaded["state_dict"]._metadata == net.state_dict()._metadata
    assert loaded["optimizer"]["param_groups"] == adam.state_dict()["param_groups"]

    save_checkpoint(net, tmp_path / "two.pth", optimizer={"a": adam, "s": sgd})
    loaded = torch.load(tmp_path / "two.pth", weights_only=True)
    assert set(loaded["optimizer"]) == {"a", "s"}
    assert set(loaded["meta"]) == {"ckptmap_version", "torch_version", "time", "CLASSES"}

    save_checkpoint(nn.Linear(2, 2), tmp_path / "three.pth", file_client_args={"backend": "disk"})
    loaded = torch.load(tmp_path / "three.pth", weights_only=True)
    assert "optimizer" not in loaded and "CLASSES" not in loaded["meta"]


def test_mmcv_form_rejects_bad_meta_and_optimizer(tmp_path):
    with pytest.raises(TypeError, match="meta must be a dict"):
        save_checkpoint(nn.Linear(2, 2), tmp_path / "x.pth", meta=["epoch"])
    with pytest.raises(TypeError, match="optimizer must be"):
        save_checkpoint(nn.Linear(2, 2), tmp_path / "x.pth", optimizer="adam")
    assert os.listdir(tmp_path) == []


def test_engine_form_arguments_follow_mmengine(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="ckptmap"):
        save_checkpoint({"a": torch.ones(1)}, tmp_path / "a.pth", {"backend": "local"})
    assert "file_client_args" in caplog.text and "backend_args" in caplog.text
    with pytest.raises(ValueError, match="cannot be set at the same time"):
        save_checkpoint({}, tmp_path / "b.pth", file_client_args={}, backend_args={})
    with pytest.raises(TypeError, match="backend_args"):
        save_checkpoint({}, tmp_path / "b.pth", None, None, "extra")
    with pytest.raises(TypeError, match="optimizer"):
        save_checkpoint(nn.Linear(1, 1), tmp_path / "b.pth", nope=1)
    with pytest.raises(UnsupportedSaveTargetError, match="pavi://"):
        save_checkpoint({}, "pavi://model/epoch_1.pth")
    with pytest.raises(UnsupportedSaveTargetError, match="pavi://"):
        save_checkpoint(nn.Linear(1, 1), "pavi://model/epoch_1.pth")
    with pytest.raises(UnsupportedSaveTargetError, match="s3://"):
        save_checkpoint({}, "http://example.com/x.pth")
    with pytest.raises(IsADirectoryError):
        save_checkpoint({}, str(tmp_path) + "/")
    assert os.listdir(tmp_path) == ["a.pth"]


def test_creates_missing_directories_and_overwrites_atomically(tmp_path):
    target = tmp_path / "work" / "dir" / "epoch_1.pth"
    save_checkpoint({"v": torch.zeros(2)}, target)
    save_checkpoint({"v": torch.ones(2)}, target)
    assert torch.equal(torch.load(target, weights_only=True)["v"], torch.ones(2))
    assert os.listdir(target.parent) == ["epoch_1.pth"]


def test_any_picklable_object_saves_as_pth(tmp_path):
    save_checkpoint([torch.ones(2), {"x": 1}], tmp_path / "list.pth")
    loaded = torch.load(tmp_path / "list.pth", weights_only=True)
    assert torch.equal(loaded[0], torch.ones(2)) and loaded[1] == {"x": 1}


# --- round trips: safetensors ----------------------------------------------------------------


def test_every_safetensors_dtype_round_trips(tmp_path):
    state = {f"t.{d}": random_tensor(d, (2, 3, 4), i) for i, d in enumerate(SAFETENSORS_DTYPES)}
    state["scalar"] = torch.tensor(1.5, dtype=torch.float64)
    state["empty"] = torch.empty(0, 2, dtype=torch.int16)
    state["transposed"] = random_tensor(torch.float32, (4, 6)).t()
    state["conj"] = random_tensor(torch.complex64, (3,)).conj()
    state["grad"] = nn.Parameter(torch.randn(3))
    path = tmp_path / "w.safetensors"
    save_checkpoint(state, path)
    loaded = st_load_file(path)
    expected = {k: v.resolve_conj() for k, v in state.items()}
    assert_same_tensors(loaded, expected)
    with safe_open(path, "pt") as f:
        # No entries besides the tensors: the codec's marker, the key order, and the
        # "format" that transformers insists on.
        metadata = f.metadata()
    assert metadata == {
        "ckptmap.codec": "1",
        "ckptmap.key_order": json.dumps(list(state)),
        "format": "pt",
    }
    # Every tensor is aligned to its element size (mmap loaders view it in place).
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    header = json.loads(path.read_bytes()[8 : 8 + header_len])
    assert (8 + header_len) % 8 == 0
    for name, info in header.items():
        if name != "__metadata__":
            assert info["data_offsets"][0] % state[name].element_size() == 0, name
    loaded = load_file(path)
    assert list(loaded) == list(state), "the state dict's order, not the header's"
    assert_same_tensors(loaded, expected)


@pytest.mark.parametrize("dtype", [d for d in ALL_DTYPES if d not in SAFETENSORS_DTYPES])
def test_dtypes_safetensors_lacks_are_refused_before_writing(tmp_path, dtype):
    path = tmp_path / "w.safetensors"
    path.write_bytes(b"old")
    state = {"ok": torch.ones(2), "bad": random_tensor(dtype, (2,))}
    with pytest.raises(NotSerializableError, match=r"save to a \.pth") as info:
        save_checkpoint(state, path)
    assert isinstance(info.value, TypeError) and str(dtype) in str(info.value)
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["w.safetensors"]


def test_safetensors_keeps_the_checkpoint_in_json_metadata(tmp_path):
    net, _, _ = trained_net_and_optimizers()
    meta = {"epoch": 3, "classes": ["a", "b"], "cfg": {"x": None, "y": 1.5, "z": True}}
    path = tmp_path / "c.safetensors"
    save_checkpoint({"meta": meta, "message": "hi", "state_dict": net.state_dict()}, path)
    with safe_open(path, "pt") as f:
        metadata = f.metadata()
    assert all(isinstance(v, str) for v in metadata.values())
    assert metadata.pop("format") == "pt"
    decoded = {k: json.loads(v) for k, v in metadata.items()}
    # Other tools read the entries as plain JSON.
    assert decoded["meta"] == meta and decoded["message"] == "hi"
    assert decoded["ckptmap.state_dict_key"] == "state_dict"
    assert decoded["ckptmap.entries"] == ["meta", "message", "state_dict"]
    assert decoded["ckptmap.state_dict_metadata"] == {
        k: dict(v) for k, v in net.state_dict()._metadata.items()
    }
    assert_same_tensors(st_load_file(path), net.state_dict())
    # ckptmap reads the checkpoint back as it was.
    loaded = load_file(path)
    assert list(loaded) == ["meta", "message", "state_dict"]
    assert loaded["meta"] == meta and loaded["message"] == "hi"
    assert list(loaded["state_dict"]) == list(net.state_dict())
    assert loaded["state_dict"]._metadata == net.state_dict()._metadata


def test_mmcv_form_to_safetensors_without_optimizer(tmp_path):
    net, adam, _ = trained_net_and_optimizers()
    path = tmp_path / "net.safetensors"
    save_checkpoint(net, path, meta={"epoch": 1})
    with safe_open(path, "pt") as f:
        meta = json.loads(f.metadata()["meta"])
    assert meta["epoch"] == 1 and meta["CLASSES"] == ["cat", "dog"]
    # Optimizer state holds tensors, which JSON metadata can't: refused, nothing written.
    with pytest.raises(NotSerializableError, match=r"checkpoint\['optimizer'\]"):
        save_checkpoint(net, tmp_path / "opt.safetensors", adam)
    assert os.listdir(tmp_path) == ["net.safetensors"]


@pytest.mark.parametrize(
    ("checkpoint", "match"),
    [
        ({"state_dict": {"w": torch.ones(1)}, "meta": {1: "int key"}}, "JSON keys are strings"),
        ({"state_dict": {"w": torch.ones(1)}, "meta": {"t": torch.ones(1)}}, "Tensor"),
        ({"state_dict": {"w": "not a tensor"}}, "only tensors"),
        ({"state_dict": {"w": torch.ones(2).to_sparse()}}, "dense"),
        ({"state_dict": {"w": torch.empty(2, device="meta")}}, "meta device"),
        ([torch.ones(1)], "dict of tensors"),
    ],
)
def test_safetensors_refuses_what_it_cant_hold(tmp_path, checkpoint, match):
    with pytest.raises(NotSerializableError, match=match):
        save_checkpoint(checkpoint, tmp_path / "x.safetensors")
    assert os.listdir(tmp_path) == []


def test_streaming_writer_matches_the_reference_bytes(tmp_path):
    """Same tensors and order as safetensors' own writer gives the same loaded content, and
    metadata values must be strings."""
    import io

    state = {"b": torch.arange(6, dtype=torch.int64), "a": torch.ones(3, dtype=torch.float16)}
    buffer = io.BytesIO()
    size = write_safetensors(buffer, state, {"k": "v"})
    assert size == len(buffer.getvalue())
    (tmp_path / "s.safetensors").write_bytes(buffer.getvalue())
    assert_same_tensors(st_load_file(tmp_path / "s.safetensors"), state)
    with pytest.raises(NotSerializableError, match="str to str"):
        write_safetensors(io.BytesIO(), state, {"k": 1})  # type: ignore[dict-item]


# --- sharding --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        (123, 123),
        ("5GB", 5 * 10**9),
        ("5GiB", 5 * 2**30),
        ("1.5MB", 1_500_000),
        ("512kib", 512 * 1024),
        ("200", 200),
        (" 7 B ", 7),
    ],
)
def test_parse_size(size, expected):
    assert parse_size(size) == expected


@pytest.mark.parametrize("size", ["5 parsecs", "", "-1GB", 0, -5, "0KB"])
def test_parse_size_rejects_non_sizes(size):
    with pytest.raises(ValueError):
        parse_size(size)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_sharded_round_trip(tmp_path, suffix):
    state = OrderedDict(
        (f"layer{i}.weight", random_tensor(torch.float32, (16, 16), i)) for i in range(10)
    )
    state["big"] = random_tensor(torch.float32, (64, 64), 99)  # larger than a shard
    state["tiny"] = torch.tensor(1, dtype=torch.int8)
    state._metadata = OrderedDict({"": {"version": 1}})
    meta = {"epoch": 2, "names": ["x"]}
    limit = 3 * 16 * 16 * 4
    index = save_checkpoint(
        {"meta": meta, "state_dict": state}, tmp_path / f"epoch_2{suffix}", max_shard_size=limit
    )
    assert index == str(tmp_path / f"epoch_2{suffix}.index.json")
    loaded, metadata = load_sharded(index)
    assert_same_tensors(loaded, state)
    assert metadata["total_size"] == sum(v.numel() * v.element_size() for v in state.values())
    assert json.loads(metadata["meta"]) == meta
    assert json.loads(metadata["ckptmap.state_dict_key"]) == "state_dict"
    assert json.loads(metadata["ckptmap.state_dict_metadata"]) == {"": {"version": 1}}
    shards = sorted(p for p in os.listdir(tmp_path) if p != Path(index).name)
    assert all(is_shard_file(s) and s.endswith(suffix) for s in shards)
    assert len(shards) == 6 and shards[0].startswith("epoch_2-")
    for shard in shards:
        size = (tmp_path / shard).stat().st_size
        names = [
            k for k, v in json.loads(Path(index).read_text())["weight_map"].items() if v == shard
        ]
        if names != ["big"]:
            assert sum(state[n].numel() * 4 for n in names) <= limit
        assert size > 0
    again = load_file(index)
    assert list(again) == ["meta", "state_dict"] and again["meta"] == meta
    assert list(again["state_dict"]) == list(state)
    assert again["state_dict"]._metadata == state._metadata
    assert_same_tensors(again["state_dict"], state)


def test_sharded_pth_shards_hold_only_their_views(tmp_path):
    flat = torch.arange(4096, dtype=torch.float32)
    state = {f"p{i}": flat[i * 512 : (i + 1) * 512] for i in range(8)}
    index = save_checkpoint(state, tmp_path / "m.pth", max_shard_size=2048 * 4)
    loaded, _ = load_sharded(index)
    assert_same_tensors(loaded, state)
    total = sum((tmp_path / p).stat().st_size for p in os.listdir(tmp_path) if is_shard_file(p))
    assert total < 2 * flat.numel() * 4, "each shard stores its slices, not the whole buffer"


def test_resaving_sharded_replaces_shards_after_the_index(tmp_path):
    state = {f"w{i}": torch.full((256,), float(i)) for i in range(4)}
    index = save_checkpoint(state, tmp_path / "m.safetensors", max_shard_size=2048)
    first = sorted(os.listdir(tmp_path))
    state2 = {k: v + 100 for k, v in state.items()}
    assert save_checkpoint(state2, tmp_path / "m.safetensors.index.json", max_shard_size=2048) == (
        index
    )
    second = sorted(os.listdir(tmp_path))
    assert len(first) == len(second) == 3 and set(first) & set(second) == {
        "m.safetensors.index.json"
    }
    assert_same_tensors(load_sharded(index)[0], state2)


def test_resaving_sharded_deletes_only_shards_it_wrote(tmp_path):
    keep = tmp_path / "keep.pth"
    save_checkpoint({"w": torch.ones(2)}, keep)
    foreign = tmp_path / "m.pth-00001-of-00001.pth"  # a shard name, but not of our stem
    foreign.write_bytes(keep.read_bytes())
    index = tmp_path / "m.pth.index.json"
    index.write_text(json.dumps({"weight_map": {"w": "keep.pth", "v": foreign.name}}))
    save_checkpoint({"w": torch.zeros(2)}, tmp_path / "m.pth", max_shard_size=100)
    assert keep.exists() and foreign.exists()
    assert_same_tensors(load_sharded(index)[0], {"w": torch.zeros(2)})


def test_index_name_without_shard_size_is_refused(tmp_path):
    with pytest.raises(ValueError, match="max_shard_size"):
        save_checkpoint({"a": torch.ones(1)}, tmp_path / "a.safetensors.index.json")
    with pytest.raises(ValueError, match="total_size"):
        save_checkpoint(
            {"state_dict": {"a": torch.ones(1)}, "total_size": 1},
            tmp_path / "a.pth",
            max_shard_size=10,
        )
    assert os.listdir(tmp_path) == []


# --- get_state_dict ------------------------------------------------------------------------


class WithExtraState(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self.register_buffer("scratch", torch.zeros(3), persistent=False)
        self.counter = 5

    def get_extra_state(self):
        return {"counter": self.counter}

    def set_extra_state(self, state):
        self.counter = state["counter"]


class CustomStateDict(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(2))

    def state_dict(self, *, destination=None, prefix="", keep_vars=False):
        destination = super().state_dict(
            destination=destination, prefix=prefix, keep_vars=keep_vars
        )
        destination[prefix + "custom"] = torch.tensor(42)
        return destination


def hooked_model() -> tuple[nn.Module, list[str]]:
    calls: list[str] = []
    model = nn.Sequential(
        OrderedDict(
            bn=nn.BatchNorm1d(3),
            extra=WithExtraState(),
            custom=CustomStateDict(),
            deep=nn.Sequential(nn.Linear(3, 3), None, nn.LayerNorm(3)),
        )
    )

    def pre_hook(module, prefix, keep_vars):
        calls.append(f"pre:{prefix}")

    def post_hook(module, state_dict, prefix, local_metadata):
        calls.append(f"post:{prefix}")
        state_dict[prefix + "hooked"] = torch.tensor(float(len(prefix)))

    def private_hook(module, state_dict, prefix, local_metadata):
        local_metadata["private"] = True
        state_dict.pop(prefix + "0.bias", None)

    model.deep.register_state_dict_pre_hook(pre_hook)
    model.bn.register_state_dict_post_hook(post_hook)
    model.deep._register_state_dict_hook(private_hook)
    return model, calls


def test_get_state_dict_equals_torch_with_hooks_and_extra_state():
    model, calls = hooked_model()
    expected = model.state_dict()
    expected_calls = list(calls)
    calls.clear()
    got = get_state_dict(model)
    assert calls == expected_calls == ["post:bn.", "pre:deep."]
    assert list(got) == list(expected)
    assert all(got[k] is not None for k in got)
    for key, value in expected.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(got[key], value)
        else:
            assert got[key] == value
    assert got["extra._extra_state"] == {"counter": 5}
    assert "extra.scratch" not in got and "custom.custom" in got and "deep.0.bias" not in got
    assert got._metadata == expected._metadata
    assert got._metadata["deep"]["private"] is True
    assert got._metadata["bn"]["version"] == 2


def test_get_state_dict_unwraps_wrappers_at_every_level():
    inner = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    outer = nn.Sequential(OrderedDict(body=nn.DataParallel(inner), head=nn.Linear(2, 1)))
    got = get_state_dict(nn.DataParallel(outer))
    reference = nn.Sequential(OrderedDict(body=inner, head=outer.head)).state_dict()
    assert list(got) == list(reference)
    assert got._metadata == reference._metadata
    assert "body.module.0.weight" in outer.state_dict(), "torch itself keeps module."


def test_get_state_dict_keep_vars_prefix_and_destination():
    lin = nn.Linear(2, 2)
    got = get_state_dict(lin, keep_vars=True, prefix="m.")
    assert got["m.weight"] is lin.weight and got._metadata == OrderedDict(m={"version": 1})
    detached = get_state_dict(lin)
    assert not detached["weight"].requires_grad
    assert detached["weight"].data_ptr() == lin.weight.data_ptr()
    plain: dict = {}
    assert get_state_dict(lin, destination=plain) is plain and set(plain) == {"weight", "bias"}


def test_get_state_dict_public_post_hook_must_return_none():
    lin = nn.Linear(1, 1)
    lin.register_state_dict_post_hook(lambda m, sd, p, md: {"x": 1})
    with pytest.raises(RuntimeError, match="must return None"):
        get_state_dict(lin)


# --- weights_to_cpu ----------------------------------------------------------------------------


Pair = namedtuple("Pair", ["a", "b"])


def test_weights_to_cpu_walks_nested_checkpoints_and_keeps_types():
    state = OrderedDict(w=torch.ones(2), n=torch.tensor(3))
    state._metadata = OrderedDict({"": {"version": 1}})
    default = defaultdict(list, {"x": torch.zeros(1)})
    checkpoint = {
        "state_dict": state,
        "optimizer": {"state": {0: {"exp_avg": torch.ones(2)}}, "param_groups": [{"lr": 0.1}]},
        "pairs": [Pair(torch.ones(1), (torch.zeros(1), "s"))],
        "default": default,
        "number": 4,
    }
    out = weights_to_cpu(checkpoint)
    assert out is not checkpoint and out["number"] == 4
    assert type(out["state_dict"]) is OrderedDict
    assert out["state_dict"]._metadata == state._metadata
    assert out["state_dict"]._metadata is not state._metadata
    assert out["state_dict"]["w"] is state["w"], "CPU tensors are not copied"
    assert isinstance(out["pairs"][0], Pair) and out["pairs"][0].b[1] == "s"
    assert isinstance(out["default"], defaultdict) and out["default"]["new"] == []
    assert out["optimizer"]["state"][0]["exp_avg"].device.type == "cpu"
    top = weights_to_cpu(OrderedDict(a=torch.ones(1)))
    assert top._metadata == OrderedDict(), "a state dict always comes back with _metadata"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_weights_to_cpu_and_saving_from_the_gpu(tmp_path):
    net = Net().cuda()
    state = get_state_dict(net)
    out = weights_to_cpu({"state_dict": state, "x": [torch.ones(2, device="cuda")]})
    assert all(v.device.type == "cpu" for v in out["state_dict"].values())
    assert out["state_dict"]._metadata == state._metadata
    save_checkpoint(state, tmp_path / "gpu.safetensors")
    assert_same_tensors(st_load_file(tmp_path / "gpu.safetensors"), weights_to_cpu(state))
    save_checkpoint(net, tmp_path / "gpu.pth")
    loaded = torch.load(tmp_path / "gpu.pth", weights_only=True)
    assert all(v.device.type == "cpu" for v in loaded["state_dict"].values())


# --- S3 (moto server on 127.0.0.1) -------------------------------------------------------------


@pytest.fixture(scope="module")
def s3_endpoint():
    pytest.importorskip("boto3")
    server_mod = pytest.importorskip("moto.server")
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3(s3_endpoint, monkeypatch, request):
    import boto3

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    bucket = "ckpt-" + request.node.name.lower().replace("_", "-")[:40].strip("-[]")
    bucket = "".join(c if c.isalnum() or c == "-" else "-" for c in bucket)
    client.create_bucket(Bucket=bucket)
    return client, bucket


def _keys(client, bucket) -> list[str]:
    return sorted(o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", []))


def _get(client, bucket, key, tmp_path) -> Path:
    path = tmp_path / "downloaded" / key
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(client.get_object(Bucket=bucket, Key=key)["Body"].read())
    return path


def test_s3_round_trips_pth_and_safetensors(s3, tmp_path):
    client, bucket = s3
    net, adam, _ = trained_net_and_optimizers()
    uri = f"s3://{bucket}/work/epoch_1.pth"
    assert save_checkpoint(net, uri, adam, {"epoch": 1}) == uri
    loaded = torch.load(_get(client, bucket, "work/epoch_1.pth", tmp_path), weights_only=True)
    assert loaded["meta"]["epoch"] == 1
    assert_same_tensors(loaded["state_dict"], net.state_dict())
    save_checkpoint(
        {"meta": {"a": 1}, "state_dict": net.state_dict()}, f"s3://{bucket}/w.safetensors"
    )
    path = _get(client, bucket, "w.safetensors", tmp_path)
    assert_same_tensors(st_load_file(path), net.state_dict())
    with safe_open(path, "pt") as f:
        assert json.loads(f.metadata()["meta"]) == {"a": 1}
    assert _keys(client, bucket) == ["w.safetensors", "work/epoch_1.pth"]


def test_s3_multipart_and_sharded(s3, tmp_path, monkeypatch):
    client, bucket = s3
    monkeypatch.setattr(sinks_module, "S3_PART_SIZE", 5 * 2**20)  # S3's minimum part size
    state = {f"w{i}": random_tensor(torch.float32, (1024, 1024), i) for i in range(3)}  # 12 MiB
    save_checkpoint(state, f"s3://{bucket}/big.pth")
    assert_same_tensors(
        torch.load(_get(client, bucket, "big.pth", tmp_path), weights_only=True), state
    )
    assert client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []

    index_uri = save_checkpoint(
        {"meta": {"e": 1}, "state_dict": state},
        f"s3://{bucket}/sh/m.safetensors",
        max_shard_size="5MiB",
    )
    assert index_uri == f"s3://{bucket}/sh/m.safetensors.index.json"
    keys = _keys(client, bucket)
    shard_keys = [k for k in keys if k.startswith("sh/") and is_shard_file(k)]
    assert len(shard_keys) == 3
    for key in [*shard_keys, "sh/m.safetensors.index.json"]:
        _get(client, bucket, key, tmp_path)
    loaded, metadata = load_sharded(tmp_path / "downloaded" / "sh" / "m.safetensors.index.json")
    assert_same_tensors(loaded, state)
    assert json.loads(metadata["meta"]) == {"e": 1}
    # Saving again under the same name replaces the shards only once the new index is up.
    save_checkpoint(state, f"s3://{bucket}/sh/m.safetensors", max_shard_size="5MiB")
    new_shards = [k for k in _keys(client, bucket) if k.startswith("sh/") and is_shard_file(k)]
    assert len(new_shards) == 3 and not set(new_shards) & set(shard_keys)


class ExplodesOnData(torch.Tensor):
    """A tensor whose data can't be read: `detach` is the writer's first step on the data."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func is torch.Tensor.detach:
            raise RuntimeError("device lost while copying")
        return super().__torch_function__(func, types, args, kwargs or {})


def test_s3_failed_upload_leaves_nothing_visible_and_old_object_intact(s3, monkeypatch):
    client, bucket = s3
    monkeypatch.setattr(sinks_module, "S3_PART_SIZE", 5 * 2**20)
    save_checkpoint({"w": torch.ones(4)}, f"s3://{bucket}/m.safetensors")
    old = client.get_object(Bucket=bucket, Key="m.safetensors")["Body"].read()
    state = {
        "big": random_tensor(torch.float32, (6 * 2**18,)),  # 6 MiB: one part is uploaded
        "bad": torch.ones(4).as_subclass(ExplodesOnData),
    }
    with pytest.raises(RuntimeError, match="device lost"):
        save_checkpoint(state, f"s3://{bucket}/m.safetensors")
    assert client.get_object(Bucket=bucket, Key="m.safetensors")["Body"].read() == old
    assert client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    # A failing shard takes the shards already uploaded with it; the old index stays.
    save_checkpoint(
        {"a": torch.ones(4), "b": torch.ones(4)}, f"s3://{bucket}/s.pth", max_shard_size=16
    )
    before = {
        k: client.get_object(Bucket=bucket, Key=k)["Body"].read() for k in _keys(client, bucket)
    }
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(
            {"a": torch.ones(4), "b._extra_state": Interrupts()},
            f"s3://{bucket}/s.pth",
            max_shard_size=16,
        )
    after = {
        k: client.get_object(Bucket=bucket, Key=k)["Body"].read() for k in _keys(client, bucket)
    }
    assert after == before


class Interrupts:
    def __reduce__(self):
        raise KeyboardInterrupt


def test_s3_errors_are_typed_and_name_the_uri(s3, s3_endpoint, monkeypatch):
    with pytest.raises(FileNotFoundError, match=r"s3://no-such-bucket/x\.pth.*AWS_ENDPOINT_URL"):
        save_checkpoint({"a": torch.ones(1)}, "s3://no-such-bucket/x.pth")
    with pytest.raises(ValueError, match="must name a bucket and a key"):
        save_checkpoint({}, "s3://bucket-only")
    with pytest.raises(TypeError, match="unknown"):
        save_checkpoint({}, "s3://b/x.pth", backend_args={"path_mapping": {}})
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    from botocore.config import Config

    with pytest.raises(CheckpointSaveError, match=r"127\.0\.0\.1:9"):
        save_checkpoint(
            {"a": torch.ones(1)},
            "s3://b/x.pth",
            backend_args={"config": Config(retries={"max_attempts": 1}, connect_timeout=2)},
        )


# --- names -------------------------------------------------------------------------------------


def test_shard_and_temp_names_are_told_apart():
    assert is_shard_file("epoch_1-1a2b3c4d-00001-of-00002.pth")
    assert is_shard_file("model-00001-of-00003.safetensors")
    assert not is_shard_file("epoch_1.pth") and not is_shard_file("epoch_1.pth.index.json")
    assert not is_temp_file("epoch_1-1a2b3c4d-00001-of-00002.pth")
