"""The Rust reader of torch zip checkpoints against ``torch.load`` itself.

Checkpoints are written by the real ``torch.save`` (and mmengine's Runner); every load is
compared deeply with torch's: keys and their order, types of every value, dtypes, shapes,
strides, storage offsets, bytes, ``requires_grad``, Parameters, ``_metadata``, and which tensors
share a storage. The reader must take its own path (``fallback_reason is None``) wherever it
claims to, and hand the rest to torch with a reason.
"""

from __future__ import annotations

import collections
import logging
import math
import os
import pickle
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from probes import mapped_from, ran_meanwhile
from pth_compare import (
    ALL_DTYPES,
    COMPLEX_HALF_WARNING,
    assert_same,
    byteswapped,
    random_tensor,
    save_big_endian,
    storage_bytes,
    walk_tensors,
)

from ckptmap._core import PthReader
from ckptmap.errors import InvalidTorchZipError, NoStateDictError, TensorNotFoundError
from ckptmap.formats import load_file, pth
from ckptmap.formats.pth import PthFile, read_pth

pytestmark = pytest.mark.filterwarnings(COMPLEX_HALF_WARNING)


def save(obj: Any, path: Path, **kwargs: Any) -> Path:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "ComplexHalf", UserWarning)
        torch.save(obj, path, **kwargs)
    return path


def reference(path: Path, protocol: int = 2, **kwargs: Any) -> Any:
    """What torch.load returns: its safe loader for protocol 2; for the protocols it refuses
    (3 to 5: opcodes it does not implement), its full unpickler on our own trusted file."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Detected pickle protocol", UserWarning)
        return torch.load(path, weights_only=protocol == 2, **kwargs)


# Tests where torch's loader builds the checkpoint; everywhere else a fallback is a failure.
FALLBACK_EXPECTED = (
    "test_meta_map_location_goes_to_torch",
    "test_what_the_reader_does_not_build",
    "test_a_tensor_subclass_goes_to_torch",
    "test_torchs_skip_data_mode_goes_to_torch",
    "test_load_names_on_a_fallback_file",
)


@pytest.fixture(autouse=True)
def _no_silent_fallback(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch):
    reasons: list[str] = []
    log = PthFile._log_fallback

    def record(self: PthFile, reason: str) -> None:
        reasons.append(reason)
        log(self, reason)

    monkeypatch.setattr(PthFile, "_log_fallback", record)
    yield
    if not request.node.name.startswith(FALLBACK_EXPECTED):
        assert reasons == [], f"torch's loader built the checkpoint: {reasons}"


def fast(path: Path, **kwargs: Any) -> PthFile:
    f = read_pth(path, **kwargs)
    assert f.fallback_reason is None, f.fallback_reason
    return f


# -- generated checkpoints ----------------------------------------------------------------------

TENSOR_KINDS = ("plain", "offset", "transpose", "expand", "param", "grad", "shared")


class Builder:
    """Builds a checkpoint from a drawn spec, keeping the tensors for `shared` views."""

    def __init__(self) -> None:
        self.tensors: list[torch.Tensor] = []

    def tensor(self, dtype: torch.dtype, shape: tuple[int, ...], seed: int, kind: str) -> Any:
        floating = dtype.is_floating_point or dtype.is_complex
        if kind == "shared" and self.tensors:
            base = self.tensors[seed % len(self.tensors)].detach()
            return base[1:] if base.dim() and base.shape[0] > 1 else base
        if kind == "offset":
            return random_tensor(dtype, (shape[0] + 2 if shape else 3, *shape[1:]), seed)[2:]
        t = random_tensor(dtype, shape, seed)
        if kind == "transpose" and t.dim() >= 2:
            t = t.transpose(0, -1)
        elif kind == "expand":
            t = random_tensor(dtype, (1,), seed).expand(3)
        elif kind == "param":
            t = torch.nn.Parameter(t, requires_grad=False)
        elif kind == "grad" and floating and dtype.itemsize >= 2 and dtype != torch.complex32:
            t = torch.nn.Parameter(t) if seed % 2 else t.requires_grad_()
        self.tensors.append(t)
        return t

    def build(self, spec: Any) -> Any:
        kind = spec[0]
        if kind == "tensor":
            return self.tensor(*spec[1:])
        if kind == "value":
            return spec[1]
        if kind == "size":
            return torch.Size(spec[1])
        if kind == "device":
            return torch.device("cpu")
        if kind == "dtype":
            return spec[1]
        if kind == "set":
            return set(spec[1])
        if kind == "list":
            return [self.build(s) for s in spec[1]]
        if kind == "tuple":
            return tuple(self.build(s) for s in spec[1])
        if kind in ("dict", "intdict"):
            return {k: self.build(v) for k, v in spec[1].items()}
        if kind == "odict":
            out = collections.OrderedDict((k, self.build(v)) for k, v in spec[1].items())
            out._metadata = collections.OrderedDict(  # type: ignore[attr-defined]
                (k, {"version": i}) for i, k in enumerate(["", *spec[1]])
            )
            return out
        raise AssertionError(kind)


tensor_specs = st.tuples(
    st.just("tensor"),
    st.sampled_from(ALL_DTYPES),
    st.lists(st.integers(0, 4), max_size=3).map(tuple),
    st.integers(0, 2**31),
    st.sampled_from(TENSOR_KINDS),
)
values = st.one_of(
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6),
    st.binary(min_size=1, max_size=6),  # b"" pickles as builtins.bytes, which torch refuses
    st.none(),
    st.booleans(),
    st.complex_numbers(allow_nan=False, max_magnitude=1e6),
)
leaves = st.one_of(
    tensor_specs,
    values.map(lambda v: ("value", v)),
    st.lists(st.integers(0, 5), max_size=3).map(lambda s: ("size", s)),
    st.just(("device",)),
    st.sampled_from([torch.float16, torch.bfloat16, torch.int64]).map(lambda d: ("dtype", d)),
    st.frozensets(st.one_of(st.integers(-3, 3), st.text(max_size=2)), max_size=3).map(
        lambda s: ("set", s)
    ),
)
keys = st.text(alphabet="abcxyz._", min_size=1, max_size=5)
specs = st.recursive(
    leaves,
    lambda children: st.one_of(
        st.lists(children, max_size=4).map(lambda xs: ("list", xs)),
        st.lists(children, max_size=4).map(lambda xs: ("tuple", xs)),
        st.dictionaries(keys, children, max_size=4).map(lambda d: ("dict", d)),
        st.dictionaries(st.integers(-3, 9), children, max_size=3).map(lambda d: ("intdict", d)),
        st.dictionaries(keys, children, max_size=4).map(lambda d: ("odict", d)),
    ),
    max_leaves=16,
)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(spec=specs, protocol=st.sampled_from([2, 3, 4, 5]))
def test_generated_checkpoints_equal_torch_load(tmp_path_factory, spec: Any, protocol: int):
    path = tmp_path_factory.mktemp("gen") / "ckpt.pth"
    save(Builder().build(spec), path, pickle_protocol=protocol)
    expected = reference(path, protocol, mmap=True)
    f = fast(path)
    for mmap in (True, False):
        assert_same(f.load(mmap=mmap), expected)
    # The table is what a walk of the loaded checkpoint finds.
    walked = list(walk_tensors(expected))
    table = f.table
    assert table.names == [name for name, _ in walked]
    assert table.dtypes == [str(t.dtype).removeprefix("torch.") for _, t in walked]
    assert table.shapes == [tuple(t.shape) for _, t in walked]
    assert table.strides == [t.stride() for _, t in walked]
    assert table.storage_offsets == [t.storage_offset() for _, t in walked]
    assert table.nbytes == [t.nbytes for _, t in walked]
    assert table.requires_grad == [t.requires_grad for _, t in walked]
    assert table.parameters == [isinstance(t, torch.nn.Parameter) for _, t in walked]
    data = path.read_bytes()
    for (start, end), (_, t) in zip(table.byte_ranges, walked, strict=True):
        if t.numel():
            offset = t.storage_offset() * t.element_size()
            assert data[start:end] == storage_bytes(t)[offset : offset + end - start]


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_every_dtype(tmp_path: Path, dtype: torch.dtype) -> None:
    sd = {
        "a": random_tensor(dtype, (3, 4), 1),
        "scalar": random_tensor(dtype, (), 2),
        "empty": random_tensor(dtype, (0, 5), 3),
        "t": random_tensor(dtype, (4, 2), 4).t(),
    }
    sd["view"] = sd["a"][1:, 2:]
    path = save(sd, tmp_path / "m.pth")
    assert_same(fast(path).load(), reference(path))
    assert_same(load_file(path), reference(path, mmap=True))


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
@pytest.mark.parametrize("new_zip", [True, None])
def test_protocols_and_zip_flag(tmp_path: Path, protocol: int, new_zip: bool | None) -> None:
    sd = collections.OrderedDict(w=torch.randn(3, 2), b=torch.nn.Parameter(torch.ones(2)))
    sd._metadata = {"": {"version": 2}}  # type: ignore[attr-defined]
    obj = {"state_dict": sd, "meta": {"bytes": b"\x00\xff", "set": {1, 2}, "c": 1 + 2j}}
    kwargs: dict[str, Any] = {"pickle_protocol": protocol}
    if new_zip is not None:
        kwargs["_use_new_zipfile_serialization"] = new_zip
    path = save(obj, tmp_path / "m.pth", **kwargs)
    f = fast(path)
    assert f.pickle_protocol == protocol and f.version == 3 and f.byteorder == sys.byteorder
    assert_same(f.load(), reference(path, protocol))


def test_state_dict_of_a_real_architecture_with_its_optimizer(tmp_path: Path) -> None:
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3),
        torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.LazyLinear(4),
    )
    model(torch.randn(2, 3, 8, 8))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, 10)
    path = save(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "epoch": 7,
            "rng": torch.get_rng_state(),
        },
        tmp_path / "train.pth",
    )
    assert_same(fast(path).load(), reference(path))
    # Tied weights stay tied.
    tied = torch.nn.Linear(4, 4)
    path = save({"enc": tied.weight, "dec": tied.weight, "bias": tied.bias}, tmp_path / "t.pth")
    loaded = fast(path).load()
    assert loaded["enc"] is loaded["dec"]
    assert_same(loaded, reference(path))


# -- big-endian files -----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_big_endian_files_are_swapped_like_torch_does(tmp_path: Path, dtype: torch.dtype) -> None:
    """Files written as on a big-endian machine (see pth_compare.save_big_endian)."""
    base = random_tensor(dtype, (4, 3), 11)
    native = {"a": base, "view": base[1:, 1:], "t": random_tensor(dtype, (2, 3), 12).t()}
    swapped_base = byteswapped(base)
    big = {
        "a": swapped_base,
        "view": swapped_base[1:, 1:],
        "t": byteswapped(native["t"]),
    }
    path = tmp_path / "big.pth"
    save_big_endian(big, path)
    f = fast(path)
    assert f.byteorder == "big"
    for mmap in (True, False):
        ours = f.load(mmap=mmap)
        assert_same(ours, reference(path))
    # torch swaps tensors stored under a typed storage; it leaves those saved through an
    # untyped storage (uint16, float8, ...: _rebuild_tensor_v3) as they are. So does ckptmap.
    if dtype in (torch.float32, torch.float64, torch.int32, torch.complex64, torch.bfloat16):
        assert storage_bytes(ours["a"]) == storage_bytes(base)
        assert_same(ours["view"], native["view"])
    # The file itself is untouched by the swap (it happens on a private copy).
    assert fast(path).load()["a"].untyped_storage().nbytes() == base.untyped_storage().nbytes()
    assert_same(fast(path).load(), reference(path))


# -- memory: views of the file, copies on request --------------------------------------------


def test_mmap_views_the_file_and_mmap_false_copies(tmp_path: Path) -> None:
    path = save({"w": torch.randn(1024, 16), "b": torch.randn(16)}, tmp_path / "m.pth")
    f = fast(path)
    mapped = f.load(mmap=True)
    assert mapped_from(mapped["w"], path) and mapped_from(mapped["b"], path)
    read = f.load(mmap=False)
    assert not mapped_from(read["w"], path)
    assert_same(mapped, read)
    # Separate loads are separate memory, as separate torch.load calls are.
    again = f.load()
    assert again["w"].data_ptr() != mapped["w"].data_ptr()


def test_writes_to_mapped_tensors_never_reach_the_file(tmp_path: Path) -> None:
    path = save({"w": torch.zeros(4096)}, tmp_path / "m.pth")
    before = path.read_bytes()
    loaded = fast(path).load()
    loaded["w"].add_(1)
    assert path.read_bytes() == before
    assert float(fast(path).load()["w"].sum()) == 0


def test_tensors_outlive_the_reader(tmp_path: Path) -> None:
    path = save({"w": torch.arange(1000.0)}, tmp_path / "m.pth")
    loaded = fast(path).load()
    import gc

    gc.collect()
    assert float(loaded["w"].sum()) == float(torch.arange(1000.0).sum())


def test_a_file_that_can_not_be_mapped_is_read_with_one_log_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    path = save({"w": torch.randn(8)}, tmp_path / "m.pth")
    build = pth._build

    def no_mmap(reader: Any, hooks: Any, mmap: bool, rows: Any) -> Any:
        if mmap:
            raise OSError(19, "No such device", str(path))
        return build(reader, hooks, mmap, rows)

    monkeypatch.setattr(pth, "_build", no_mmap)
    with caplog.at_level(logging.INFO, logger="ckptmap"):
        loaded = load_file(path)
    assert_same(loaded, reference(path))
    records = [r for r in caplog.records if r.name == "ckptmap"]
    assert len(records) == 1 and "can not be memory-mapped" in records[0].getMessage()


def test_a_file_rewritten_between_open_and_load_is_refused(tmp_path: Path) -> None:
    path = save({"w": torch.randn(8)}, tmp_path / "m.pth")
    f = fast(path)
    with open(path, "ab") as out:
        out.write(b"\0" * 100)
    with pytest.raises(InvalidTorchZipError) as info:
        f.load()
    assert info.value.kind == "file_changed" and str(path) in str(info.value)


# -- map_location ---------------------------------------------------------------------------


def cpu_only(storage: Any, location: str) -> Any:
    return storage


def default_restore(storage: Any, location: str) -> None:
    return None


@pytest.mark.parametrize(
    "map_location",
    [
        None,
        "cpu",
        torch.device("cpu"),
        {"cpu": "cpu"},
        {"cuda:0": "cpu"},
        cpu_only,
        default_restore,
    ],
    ids=["none", "str", "device", "dict", "dict-other", "callable", "callable-none"],
)
def test_map_location_forms_equal_torch_load(tmp_path: Path, map_location: Any) -> None:
    w = torch.randn(3, 4)
    path = save({"w": w, "v": w[1:], "p": torch.nn.Parameter(torch.ones(2))}, tmp_path / "m.pth")
    ours = fast(path).load(map_location=map_location)
    assert_same(ours, torch.load(path, map_location=map_location, weights_only=True))
    assert_same(load_file(path, map_location), ours)


def test_callable_map_location_sees_each_storage_once_with_its_location(tmp_path: Path) -> None:
    w = torch.randn(3, 4)
    path = save({"w": w, "v": w[1:], "x": torch.ones(2)}, tmp_path / "m.pth")
    seen: list[tuple[int, str]] = []

    def record(storage: Any, location: str) -> Any:
        seen.append((storage.nbytes(), location))
        return storage

    loaded = fast(path).load(map_location=record)
    theirs: list[tuple[int, str]] = []
    torch.load(
        path, map_location=lambda s, loc: theirs.append((s.nbytes(), loc)), weights_only=True
    )
    assert sorted(seen) == sorted(theirs) == [(8, "cpu"), (48, "cpu")]
    assert loaded["v"].untyped_storage().data_ptr() == loaded["w"].untyped_storage().data_ptr()


def test_meta_map_location_goes_to_torch(tmp_path: Path) -> None:
    path = save({"w": torch.randn(3)}, tmp_path / "m.pth")
    loaded = load_file(path, "meta")
    assert loaded["w"].is_meta and loaded["w"].shape == (3,)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_map_location_equals_torch(tmp_path: Path) -> None:
    w = torch.randn(3, 4)
    path = save({"w": w, "v": w[1:]}, tmp_path / "m.pth")
    for location in ("cuda", torch.device("cuda:0"), {"cpu": "cuda:0"}):
        ours = fast(path).load(map_location=location)
        theirs = torch.load(path, map_location=location, weights_only=True)
        assert ours["w"].device == theirs["w"].device
        assert torch.equal(ours["v"].cpu(), theirs["v"].cpu())
        assert ours["v"].untyped_storage().data_ptr() == ours["w"].untyped_storage().data_ptr()


# -- fallbacks --------------------------------------------------------------------------------


class Tagged(torch.Tensor):
    pass


def fallback_cases() -> dict[str, Any]:
    warnings.filterwarnings("ignore", "torch.quantize_per_tensor", UserWarning)
    tagged = torch.ones(2)
    tagged.note = "hello"  # type: ignore[attr-defined]
    return {
        "quantized": torch.quantize_per_tensor(torch.ones(3), 0.5, 0, torch.quint8),
        "sparse": torch.eye(3).to_sparse(),
        "meta": torch.empty(3, device="meta"),
        "attribute": tagged,
        "conj": torch.ones(2, dtype=torch.complex64).conj(),
    }


FALLBACK_CASES = ["attribute", "conj", "meta", "quantized", "sparse"]


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("case", FALLBACK_CASES)
def test_what_the_reader_does_not_build_goes_to_torch_with_a_reason(
    tmp_path: Path, case: str, caplog: pytest.LogCaptureFixture
) -> None:
    value = fallback_cases()[case]
    path = save({"x": value, "y": torch.ones(2)}, tmp_path / "m.pth")
    expected = torch.load(path, weights_only=True)
    f = read_pth(path)
    reason = f.fallback_reason
    if reason is None:  # the tensor pickles as a plain one (conj is resolved by torch.save)
        assert case == "conj"
    else:
        assert "torch._utils._rebuild" in reason or "global" in reason or "tensor" in reason
    with caplog.at_level(logging.INFO, logger="ckptmap"):
        loaded = load_file(path)
    assert type(loaded["x"]) is type(expected["x"])
    assert torch.equal(loaded["y"], expected["y"])
    if reason is not None:
        messages = [r.getMessage() for r in caplog.records if r.name == "ckptmap"]
        assert len(messages) == 1 and reason in messages[0]


def test_a_tensor_subclass_goes_to_torch_with_its_allowlist(tmp_path: Path) -> None:
    path = save({"x": torch.ones(2).as_subclass(Tagged)}, tmp_path / "m.pth")
    assert "torch._tensor._rebuild_from_type_v2" in (read_pth(path).fallback_reason or "")
    loaded = load_file(path, allowed_globals=[Tagged])
    assert type(loaded["x"]) is Tagged


def test_torchs_skip_data_mode_goes_to_torch(tmp_path: Path) -> None:
    path = save({"x": torch.ones(2)}, tmp_path / "m.pth")
    with torch.serialization.skip_data():
        loaded = load_file(path)
    assert loaded["x"].shape == (2,)


# -- tables, subsets, shapes ----------------------------------------------------------------


def test_load_names_builds_only_those_tensors(tmp_path: Path) -> None:
    sd = {"a": torch.randn(2), "b": {"c": torch.randn(3), "d": [torch.ones(1), 5]}}
    path = save(sd, tmp_path / "m.pth")
    f = fast(path)
    assert f.table.names == ["a", "b.c", "b.d.0"]
    part = f.load(names=["b.d.0", "a"])
    assert list(part) == ["b.d.0", "a"]
    assert torch.equal(part["a"], sd["a"]) and torch.equal(part["b.d.0"], sd["b"]["d"][0])
    with pytest.raises(TensorNotFoundError, match="'nope'"):
        f.load(names=["nope"])


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_load_names_on_a_fallback_file(tmp_path: Path) -> None:
    q = torch.quantize_per_tensor(torch.ones(3), 0.5, 0, torch.quint8)
    path = save({"q": q, "w": torch.randn(2)}, tmp_path / "m.pth")
    f = read_pth(path)
    assert f.fallback_reason is not None
    assert list(f.load(names=["w"])) == ["w"]


@pytest.mark.parametrize(
    "layout",
    ["root", "state_dict", "model", "model-tensor", "odict-with-extras"],
)
def test_state_dict_shapes_equal_what_find_state_dict_finds(tmp_path: Path, layout: str) -> None:
    from ckptmap.shapes import _shapes_of
    from ckptmap.statedict import find_state_dict

    sd = collections.OrderedDict(w=torch.randn(2, 3), b=torch.ones(3, dtype=torch.int64))
    obj: Any = {
        "root": sd,
        "state_dict": {"state_dict": sd, "meta": 1},
        "model": {"model": sd, "optimizer": {}},
        "model-tensor": {"model": torch.ones(1), "other": torch.zeros(2)},
        "odict-with-extras": collections.OrderedDict(w=torch.ones(1), _extra_state={"k": 1}),
    }[layout]
    path = save(obj, tmp_path / "m.pth")
    expected = _shapes_of(find_state_dict(torch.load(path, weights_only=True)))
    assert fast(path).state_dict_shapes() == expected


@pytest.mark.parametrize(
    ("obj", "where"),
    [([torch.ones(1)], "top-level object"), ({"state_dict": [1]}, "'state_dict' entry")],
)
def test_state_dict_shapes_raise_as_find_state_dict(tmp_path: Path, obj: Any, where: str) -> None:
    path = save(obj, tmp_path / "m.pth")
    with pytest.raises(NoStateDictError, match=where):
        fast(path).state_dict_shapes()


def test_many_members_use_zip64_end_records(tmp_path: Path) -> None:
    # Over 65,535 members: torch's writer adds the zip64 end records.
    sd = {f"t{i}": torch.full((1,), float(i)) for i in range(66_000)}
    path = save(sd, tmp_path / "many.pth")
    f = fast(path)
    assert len(f.table) == 66_000
    loaded = f.load()
    assert float(loaded["t65999"]) == 65999.0 and list(loaded) == list(sd)


# -- the GIL, errors, stubs ----------------------------------------------------------------------


def test_the_gil_is_released_while_parsing(tmp_path: Path) -> None:
    path = save({f"layer.{i}.weight": torch.ones(1) for i in range(30_000)}, tmp_path / "m.pth")
    assert ran_meanwhile(lambda: PthReader.open(path))


def test_invalid_torch_zip_error_is_typed_and_pickles(tmp_path: Path) -> None:
    err = InvalidTorchZipError("x.pth", 10, "crc_mismatch", "data.pkl damaged")
    assert isinstance(err, RuntimeError) and isinstance(err, ValueError)
    clone = pickle.loads(pickle.dumps(err))
    assert type(clone) is type(err) and str(clone) == str(err) and clone.kind == err.kind
    assert "x.pth" in str(err) and "re-download" in str(err).lower()


def test_repr_and_len(tmp_path: Path) -> None:
    path = save({"a": torch.ones(1), "b": [torch.ones(2)]}, tmp_path / "m.pth")
    f = fast(path)
    assert len(f) == 2 and "tensors=2" in repr(f)
    assert f.table.infos()[1].name == "b.0"
    assert os.fspath(path) in repr(PthReader.open(path))
    assert math.isclose(float(f.load()["b"][0].sum()), 2.0)
    assert np.dtype("float32")  # numpy is importable beside the reader
