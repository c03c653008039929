"""What `save_checkpoint` writes comes back from the loaders as the same checkpoint.

Every format (``.pth``, ``.safetensors``, sharded ``.pth`` and safetensors) and both loaders
(`ckptmap.formats.load_file`, `ckptmap._load_checkpoint`): the entries beside the state dict
(``meta`` with nested JSON values, tuples included), their order and the state dict's place
among them, the state dict's key order (safetensors headers list tensors by element size) and
its ``_metadata``. Values are compared with their types: ``True`` is not ``1``, a tuple is not
a list. Then the codec alone (`ckptmap.formats.codec`) against hostile and foreign metadata.
"""

from __future__ import annotations

import json
import tempfile
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file as st_save_file

import ckptmap
from ckptmap.errors import NotSerializableError, SaveArgumentError
from ckptmap.formats import codec, load_file
from ckptmap.save import save_checkpoint

# --- strategies ---------------------------------------------------------------------------------

JSON_LEAVES = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=8)
)
JSON_VALUES = st.recursive(
    JSON_LEAVES,
    lambda children: (
        st.lists(children, max_size=3)
        | st.lists(children, max_size=3).map(tuple)
        | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=12,
)
ENTRY_NAMES = st.text(min_size=1, max_size=8).filter(
    lambda n: not n.startswith(codec.PREFIX) and n not in ("state_dict", "model", "total_size")
)
TENSOR_NAMES = st.text(max_size=12).filter(lambda n: n != "__metadata__")
DTYPES = st.sampled_from(
    [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int8, torch.bool]
)


@st.composite
def tensors(draw: Any) -> torch.Tensor:
    dtype = draw(DTYPES)
    shape = tuple(draw(st.lists(st.integers(0, 3), max_size=3)))
    seed = draw(st.integers(0, 2**16))
    raw = torch.randint(0, 256, (max(1, torch.Size(shape).numel()) * 8,), dtype=torch.uint8,
                        generator=torch.Generator().manual_seed(seed))  # fmt: skip
    if dtype == torch.bool:
        return (raw[: torch.Size(shape).numel()] % 2).bool().reshape(shape)
    out = torch.empty(shape, dtype=dtype)
    out.reshape(-1).view(torch.uint8).copy_(raw[: out.numel() * out.element_size()])
    return out


@st.composite
def state_dicts(draw: Any) -> OrderedDict[str, torch.Tensor]:
    names = draw(st.lists(TENSOR_NAMES, max_size=6, unique=True))  # any order
    state = OrderedDict((name, draw(tensors())) for name in names)
    if draw(st.booleans()):
        prefixes = draw(st.lists(st.text(max_size=6), max_size=3, unique=True))
        state._metadata = OrderedDict(  # type: ignore[attr-defined]
            (p, {"version": draw(st.integers(1, 3))}) for p in prefixes
        )
    return state


@st.composite
def checkpoints(draw: Any) -> Any:
    state = draw(state_dicts())
    key = draw(st.sampled_from([None, "state_dict", "model"]))
    if key is None:
        return state
    entries = draw(st.dictionaries(ENTRY_NAMES, JSON_VALUES, max_size=3))
    items = list(entries.items())
    items.insert(draw(st.integers(0, len(items))), (key, state))
    return dict(items)


# --- comparing with types -----------------------------------------------------------------------


def assert_same_value(got: Any, expected: Any, where: str = "") -> None:
    assert type(got) is type(expected), (where, got, expected)
    if isinstance(expected, dict):
        assert list(got) == list(expected), where
        for k in expected:
            assert_same_value(got[k], expected[k], f"{where}[{k!r}]")
    elif isinstance(expected, list | tuple):
        assert len(got) == len(expected), where
        for i, (a, b) in enumerate(zip(got, expected, strict=True)):
            assert_same_value(a, b, f"{where}[{i}]")
    else:
        assert got == expected, where


def raw_bytes(t: torch.Tensor) -> bytes:
    return bytes(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


def assert_same_state_dict(got: Mapping[str, Any], expected: Mapping[str, Any]) -> None:
    assert list(got) == list(expected), "key order"
    for name, value in expected.items():
        assert got[name].dtype == value.dtype and got[name].shape == value.shape, name
        assert raw_bytes(got[name]) == raw_bytes(value), name
    metadata = getattr(expected, "_metadata", None)
    if metadata is not None:
        assert getattr(got, "_metadata", None) == metadata


def assert_same_checkpoint(got: Any, expected: Any) -> None:
    key = codec.state_dict_key(expected)
    if key is None:
        assert_same_state_dict(got, expected)
        return
    assert isinstance(got, Mapping) and list(got) == list(expected), "entry order"
    for name, value in expected.items():
        if name == key:
            assert_same_state_dict(got[name], value)
        else:
            assert_same_value(got[name], value, name)


# --- through files ------------------------------------------------------------------------------

FORMATS = {
    "pth": ("epoch.pth", None),
    "safetensors": ("epoch.safetensors", None),
    "sharded pth": ("epoch.pth", 24),
    "sharded safetensors": ("epoch.safetensors", 24),
}


@settings(max_examples=25)
@given(checkpoint=checkpoints(), fmt=st.sampled_from(sorted(FORMATS)))
def test_every_format_round_trips_through_both_loaders(checkpoint, fmt):
    name, shard_size = FORMATS[fmt]
    with tempfile.TemporaryDirectory() as tmp:
        written = save_checkpoint(checkpoint, Path(tmp) / name, max_shard_size=shard_size)
        assert_same_checkpoint(load_file(written), checkpoint)
        assert_same_checkpoint(ckptmap._load_checkpoint(written, logger="silent"), checkpoint)


def test_safetensors_header_order_differs_but_the_state_dict_order_does_not(tmp_path):
    # Element size decides the file's layout (largest first, for alignment): int8 last.
    state = OrderedDict([("b.small", torch.ones(2, dtype=torch.int8)),
                         ("a.big", torch.ones(2, dtype=torch.float64)),
                         ("c.mid", torch.ones(2, dtype=torch.float16))])  # fmt: skip
    path = tmp_path / "m.safetensors"
    save_checkpoint({"meta": {"CLASSES": ("cat", "dog")}, "state_dict": state}, path)
    header = json.loads(path.read_bytes()[8 : 8 + int.from_bytes(path.read_bytes()[:8], "little")])
    assert [k for k in header if k != "__metadata__"] == ["a.big", "c.mid", "b.small"]
    loaded = ckptmap._load_checkpoint(path, logger="silent")
    assert list(loaded["state_dict"]) == ["b.small", "a.big", "c.mid"]
    assert loaded["meta"] == {"CLASSES": ("cat", "dog")}


def test_mmcv_form_checkpoint_loads_back_with_classes(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.BatchNorm1d(3))
    model.CLASSES = ("class1", "class2")
    for name in ("m.pth", "m.safetensors"):
        save_checkpoint(model, tmp_path / name, meta={"epoch": 2})
        loaded = ckptmap._load_checkpoint(tmp_path / name, logger="silent")
        assert loaded["meta"]["CLASSES"] == ("class1", "class2")
        assert loaded["meta"]["epoch"] == 2
        assert_same_state_dict(loaded["state_dict"], model.state_dict())


# --- the codec alone ----------------------------------------------------------------------------


@settings(max_examples=200)
@given(checkpoint=checkpoints(), data=st.data())
def test_decode_inverts_encode_whatever_order_the_file_lists_tensors(checkpoint, data):
    encoded = codec.encode(checkpoint, "x.safetensors")
    assert all(isinstance(v, str) for v in encoded.metadata.values())
    names = data.draw(st.permutations(list(encoded.tensors)))
    from_file = {name: encoded.tensors[name] for name in names}
    assert_same_checkpoint(codec.decode(from_file, encoded.metadata), checkpoint)


@settings(max_examples=200)
@given(
    metadata=st.dictionaries(
        st.sampled_from(
            [
                "ckptmap.codec",
                "ckptmap.entries",
                "ckptmap.state_dict_key",
                "ckptmap.key_order",
                "ckptmap.state_dict_metadata",
                "ckptmap.tuples",
                "meta",
                "format",
                "state_dict",
            ]
        ),
        st.text(max_size=30) | JSON_VALUES.map(json.dumps) | JSON_VALUES,
    ),
    names=st.lists(TENSOR_NAMES, max_size=4, unique=True),
)
def test_decode_never_fails_on_hostile_metadata(metadata, names):
    """Tampered metadata can reorder or relabel, but never lose or invent a tensor."""
    tensors = {name: torch.zeros(1) for name in names}
    checkpoint = codec.decode(tensors, metadata)
    layout = codec.layout(metadata)
    state_dict = checkpoint if layout.key is None else checkpoint[layout.key]
    assert sorted(state_dict) == sorted(names)
    assert all(state_dict[name] is tensors[name] for name in names)


def test_foreign_metadata_is_not_an_entry():
    tensors = OrderedDict(w=torch.ones(1))
    assert codec.decode(tensors, {"format": "pt"}) is tensors
    assert codec.decode(tensors, {}) is tensors
    # A transformers index: only total_size.
    assert codec.decode(tensors, {"total_size": 4}) is tensors


def test_files_from_before_the_entry_list_still_decode(tmp_path):
    """The table ckptmap wrote before ``ckptmap.entries``, ``key_order`` and ``format``."""
    path = tmp_path / "old.safetensors"
    old = {
        "meta": json.dumps({"epoch": 3}),
        "ckptmap.state_dict_key": json.dumps("state_dict"),
        "ckptmap.state_dict_metadata": json.dumps({"": {"version": 1}}),
    }
    st_save_file({"b": torch.ones(1), "a": torch.zeros(1)}, str(path), metadata=old)
    loaded = load_file(path)
    assert loaded["meta"] == {"epoch": 3} and sorted(loaded["state_dict"]) == ["a", "b"]
    assert loaded["state_dict"]._metadata == {"": {"version": 1}}


def test_deep_nesting_is_refused_on_save_and_kept_as_text_on_load(tmp_path):
    deep: Any = 0
    for _ in range(codec.MAX_DEPTH + 5):
        deep = [deep]
    with pytest.raises(NotSerializableError, match="nested more than"):
        save_checkpoint({"meta": deep, "state_dict": {}}, tmp_path / "x.safetensors")
    assert list(tmp_path.iterdir()) == []
    hostile = "[" * 100_000 + "]" * 100_000  # json.loads would hit the recursion limit
    metadata = {
        "ckptmap.codec": "1",
        "ckptmap.entries": '["meta", "state_dict"]',
        "ckptmap.state_dict_key": '"state_dict"',
        "meta": hostile,
    }
    st_save_file({"w": torch.ones(1)}, str(tmp_path / "h.safetensors"), metadata=metadata)
    loaded = load_file(tmp_path / "h.safetensors")
    assert loaded["meta"] == hostile and list(loaded["state_dict"]) == ["w"]


@pytest.mark.parametrize(
    ("checkpoint", "name", "shard", "error", "match"),
    [
        ({"ckptmap.x": 1, "state_dict": {}}, "a.safetensors", None, NotSerializableError,
         "taken by ckptmap"),
        ({"__metadata__": torch.ones(1)}, "a.safetensors", None, NotSerializableError,
         "keeps its metadata"),
        ({"total_size": 1, "state_dict": {}}, "a.pth", 10, SaveArgumentError, "total_size"),
        ({"meta": {1: "x"}, "state_dict": {}}, "a.safetensors", None, NotSerializableError,
         "JSON keys are strings"),
    ],
)  # fmt: skip
def test_names_the_format_needs_are_refused(tmp_path, checkpoint, name, shard, error, match):
    with pytest.raises(error, match=match):
        save_checkpoint(checkpoint, tmp_path / name, max_shard_size=shard)
    assert list(tmp_path.iterdir()) == []


def test_a_user_entry_named_format_wins(tmp_path):
    path = tmp_path / "f.safetensors"
    save_checkpoint({"format": ["mine"], "state_dict": {"w": torch.ones(1)}}, path)
    with safe_open(path, "pt") as f:
        assert json.loads(f.metadata()["format"]) == ["mine"]
    assert load_file(path)["format"] == ["mine"]
