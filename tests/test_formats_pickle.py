"""Pickle checkpoints (torch zip, legacy torch, plain pickle): values equal torch.load's, the
safe loader is always on, opt-ins are explicit, and malicious files never run
(RELIABILITY.md: "Pickle / torch zip checkpoints")."""

from __future__ import annotations

import argparse
import collections
import contextlib
import logging
import os
import pathlib
import pickle
import subprocess
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from probes import mapped_from

from ckptmap.errors import (
    CkptmapError,
    CorruptCheckpointError,
    InvalidStateDictError,
    UnsafeCheckpointError,
    UnsafeLoadWarning,
)
from ckptmap.formats import Format, load_file, pth, sniff, validate_state_dict
from ckptmap.formats.allowlist import MMENGINE_RUNNER
from ckptmap.formats.pickled import pickle_globals

# complex32 tensors make torch warn on creation, also inside torch.load; that is torch's word
# to the user about the dtype, not a fault of the loading.
pytestmark = pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental:UserWarning")

# -- dtypes -------------------------------------------------------------------------------------

# What both torch.save formats store.
CLASSIC_DTYPES = [
    torch.float64,
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.complex64,
    torch.complex128,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.uint8,
    torch.bool,
]
# Newer dtypes: the zip format only (the legacy writer can not store them).
NEW_DTYPES = [
    getattr(torch, name)
    for name in (
        "float8_e4m3fn",
        "float8_e5m2",
        "float8_e4m3fnuz",
        "float8_e5m2fnuz",
        "float8_e8m0fnu",
        "float4_e2m1fn_x2",
        "uint16",
        "uint32",
        "uint64",
        "complex32",
    )
    if hasattr(torch, name)
]
ALL_DTYPES = CLASSIC_DTYPES + NEW_DTYPES


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """A tensor of `dtype` with arbitrary bit patterns (NaNs included), bools 0/1."""
    numel = int(np.prod(shape, dtype=np.int64))
    gen = np.random.default_rng(seed)
    if dtype is torch.bool:
        return torch.from_numpy(gen.integers(0, 2, numel, dtype=np.uint8)).bool().reshape(shape)
    raw = gen.integers(0, 256, numel * dtype.itemsize, dtype=np.uint8)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "ComplexHalf support is experimental", UserWarning)
        if numel == 0:
            return torch.empty(shape, dtype=dtype)
        return torch.from_numpy(raw).view(dtype).reshape(shape)


def raw_bytes(t: torch.Tensor) -> bytes:
    if t.numel() == 0:
        return b""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "ComplexHalf support is experimental", UserWarning)
        return bytes(t.detach().contiguous().view(-1).view(torch.uint8).numpy())


def layout(sd: dict[str, Any]) -> list[tuple]:
    """Each tensor's dtype, shape, stride, offset, bytes and which earlier key it shares
    storage with: equal layouts mean equal values and equal aliasing."""
    first_key_of_storage: dict[int, str] = {}
    out = []
    for key, t in sd.items():
        if not isinstance(t, torch.Tensor):
            out.append((key, t))
            continue
        storage = t.untyped_storage()
        shared_with = None
        if storage.nbytes():
            shared_with = first_key_of_storage.setdefault(storage.data_ptr(), key)
        out.append(
            (
                key,
                type(t).__name__,
                t.dtype,
                tuple(t.shape),
                t.stride(),
                t.storage_offset(),
                raw_bytes(t),
                shared_with,
                t.requires_grad,
            )
        )
    return out


def save(obj: Any, path: Path, legacy: bool = False) -> Path:
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    return path


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_every_dtype_equals_torch_load_zip(tmp_path: Path, dtype: torch.dtype) -> None:
    sd = {"a": random_tensor(dtype, (3, 5), 1), "scalar": random_tensor(dtype, (), 2)}
    path = save(sd, tmp_path / "m.pth")
    for mmap in (None, False):
        loaded = load_file(path, mmap=mmap)
        assert layout(loaded) == layout(torch.load(path, weights_only=True, mmap=bool(mmap)))
        assert layout(loaded) == layout(sd)
    assert mapped_from(load_file(path)["a"], path)
    assert not mapped_from(load_file(path, mmap=False)["a"], path)


@pytest.mark.parametrize("dtype", CLASSIC_DTYPES, ids=str)
def test_every_dtype_equals_torch_load_legacy(tmp_path: Path, dtype: torch.dtype) -> None:
    sd = {"a": random_tensor(dtype, (4, 2), 3)}
    path = save(sd, tmp_path / "m.pth", legacy=True)
    assert sniff(path).format is Format.TORCH_LEGACY
    assert layout(load_file(path)) == layout(torch.load(path, weights_only=True)) == layout(sd)


def tied_state_dict() -> dict[str, torch.Tensor]:
    base = random_tensor(torch.float32, (4, 6), 7)
    bias = random_tensor(torch.float16, (6,), 8)
    return collections.OrderedDict(
        [
            ("embed.weight", base),
            ("head.weight", base),  # tied: the same tensor
            ("half", base[2:]),  # a view with an offset
            ("transposed", base.t()),  # non-contiguous
            ("column", base[:, 1]),
            ("bias", bias),
            ("param", torch.nn.Parameter(bias.float())),
            ("empty", torch.empty(0, 3)),
        ]
    )


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize("mmap", [None, False])
def test_tied_and_view_tensors_keep_torchs_aliasing(
    tmp_path: Path, legacy: bool, mmap: bool | None
) -> None:
    sd = tied_state_dict()
    path = save(sd, tmp_path / "tied.pth", legacy=legacy)
    loaded = load_file(path, mmap=mmap)
    expected = torch.load(path, weights_only=True, mmap=bool(mmap) and not legacy)
    assert layout(loaded) == layout(expected)
    assert loaded["embed.weight"] is loaded["head.weight"] or (
        loaded["embed.weight"].untyped_storage().data_ptr()
        == loaded["head.weight"].untyped_storage().data_ptr()
    )
    # Writing through one name shows through the tied ones, as after torch.load.
    if mmap is False or legacy:
        loaded["embed.weight"][3, 0] = 42.0
        assert loaded["half"][1, 0] == 42.0 and loaded["transposed"][0, 3] == 42.0


tensor_specs = st.lists(
    st.tuples(
        st.sampled_from(ALL_DTYPES),
        st.lists(st.integers(0, 4), min_size=0, max_size=3).map(tuple),
        st.sampled_from(["own", "alias", "view", "transpose"]),
    ),
    min_size=1,
    max_size=6,
)


@given(tensor_specs, st.integers(0, 2**32 - 1))
def test_random_state_dicts_equal_torch_load_on_every_path(specs, seed: int) -> None:
    sd: dict[str, torch.Tensor] = {}
    for i, (dtype, shape, kind) in enumerate(specs):
        previous = list(sd.values())
        if kind == "alias" and previous:
            sd[f"t{i}"] = previous[-1]
        elif kind == "view" and previous and previous[-1].dim() and previous[-1].shape[0]:
            sd[f"t{i}"] = previous[-1][1:]
        elif kind == "transpose" and previous and previous[-1].dim() >= 2:
            sd[f"t{i}"] = previous[-1].transpose(0, 1)
        else:
            sd[f"t{i}"] = random_tensor(dtype, shape, seed + i)
    with tempfile.TemporaryDirectory() as tmp:
        zip_path = save(sd, Path(tmp) / "z.pth")
        for mmap in (None, False):
            expected = torch.load(zip_path, weights_only=True, mmap=mmap is None)
            assert layout(load_file(zip_path, mmap=mmap)) == layout(expected) == layout(sd)
        if all(t.dtype in CLASSIC_DTYPES for t in sd.values()):
            legacy_path = save(sd, Path(tmp) / "l.pth", legacy=True)
            expected = torch.load(legacy_path, weights_only=True)
            assert layout(load_file(legacy_path)) == layout(expected)


def test_map_location_forms(tmp_path: Path) -> None:
    sd = tied_state_dict()
    path = save(sd, tmp_path / "m.pth")
    for location in ("cpu", torch.device("cpu"), {"cpu": "cpu"}, lambda storage, loc: storage):
        assert layout(load_file(path, map_location=location)) == layout(
            torch.load(path, map_location=location, weights_only=True, mmap=True)
        )


@pytest.mark.parametrize(
    "top_level",
    [[torch.ones(2), torch.zeros(1)], torch.arange(3), 7, None, ("a", 1.5)],
    ids=["list", "tensor", "int", "none", "tuple"],
)
def test_non_dict_top_level_is_returned_as_torch_load_does(tmp_path: Path, top_level) -> None:
    path = save(top_level, tmp_path / "odd.pth")
    loaded = load_file(path)
    expected = torch.load(path, weights_only=True)
    if isinstance(expected, torch.Tensor):
        assert torch.equal(loaded, expected)
    elif isinstance(expected, list):
        assert all(torch.equal(a, b) for a, b in zip(loaded, expected, strict=True))
    else:
        assert loaded == expected


# -- logging for the mmap fallback -----------------------------------------------------------


def test_legacy_checkpoint_is_read_without_mmap_with_one_log_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = save({"a": torch.ones(3)}, tmp_path / "old.pth", legacy=True)
    with caplog.at_level(logging.INFO, logger="ckptmap"):
        load_file(path)
    records = [r for r in caplog.records if r.name == "ckptmap"]
    assert len(records) == 1 and "legacy" in records[0].getMessage()
    assert records[0].levelno == logging.INFO
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="ckptmap"):
        load_file(path, mmap=True)
    records = [r for r in caplog.records if r.name == "ckptmap"]
    assert len(records) == 1 and records[0].levelno == logging.WARNING
    assert "can not be memory-mapped" in records[0].getMessage()


def test_zip_checkpoint_that_can_not_be_mapped_is_read_with_one_log_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    sd = tied_state_dict()
    path = save(sd, tmp_path / "m.pth")

    def no_mmap(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"unable to mmap {path}: Operation not supported (95)")

    monkeypatch.setattr(torch.UntypedStorage, "from_file", no_mmap)
    # torch's path (the Rust reader's own fallback is in test_pth_reader.py).
    monkeypatch.setattr(pth, "load_fast", lambda *args, **kwargs: pth.FALLBACK)
    with caplog.at_level(logging.INFO, logger="ckptmap"):
        loaded = load_file(path)
    assert layout(loaded) == layout(torch.load(path, weights_only=True))
    records = [r for r in caplog.records if r.name == "ckptmap"]
    assert len(records) == 1 and "can not be memory-mapped" in records[0].getMessage()


def test_zip_checkpoint_logs_nothing(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = save({"a": torch.ones(3)}, tmp_path / "new.pth")
    with caplog.at_level(logging.DEBUG, logger="ckptmap"):
        load_file(path)
    assert [r for r in caplog.records if r.name == "ckptmap"] == []


# -- malicious pickles --------------------------------------------------------------------------


class Payload:
    """Creates `sentinel` when unpickled, through one of the usual code-execution gadgets."""

    def __init__(self, kind: str, sentinel: Path) -> None:
        self.kind = kind
        self.sentinel = str(sentinel)

    def __reduce__(self) -> tuple:
        touch = f"__import__('pathlib').Path({self.sentinel!r}).touch()"
        if self.kind == "os.system":
            return (os.system, (f"touch {self.sentinel}",))
        if self.kind == "subprocess":
            return (subprocess.call, (["touch", self.sentinel],))
        if self.kind == "eval":
            return (eval, (touch,))
        if self.kind == "exec":
            return (exec, (touch,))
        if self.kind == "getattr":
            # A bound method pickles as getattr(obj, name); reducing it calls it.
            return (pathlib.Path(self.sentinel).touch, ())
        raise ValueError(self.kind)


PAYLOAD_GLOBALS = {
    "os.system": "posix.system" if os.name == "posix" else "nt.system",
    "subprocess": "subprocess.call",
    "eval": "builtins.eval",
    "exec": "builtins.exec",
    "getattr": "builtins.getattr",
}


def write_container(container: str, obj: Any, path: Path) -> Path:
    if container == "zip":
        return save(obj, path)
    if container == "legacy":
        return save(obj, path, legacy=True)
    protocol = {"pickle2": 2, "pickle4": 4, "pickle5": 5}[container]
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    return path


@pytest.mark.parametrize("kind", sorted(PAYLOAD_GLOBALS))
@pytest.mark.parametrize("container", ["zip", "legacy", "pickle2", "pickle4"])
def test_malicious_reduce_is_rejected_and_never_runs(
    tmp_path: Path, kind: str, container: str
) -> None:
    sentinel = tmp_path / "PWNED"
    checkpoint = {"state_dict": {"w": torch.ones(2)}, "meta": {"x": Payload(kind, sentinel)}}
    path = write_container(container, checkpoint, tmp_path / "evil.pth")
    with pytest.raises(UnsafeCheckpointError) as info:
        load_file(path)
    assert not sentinel.exists(), "the payload ran"
    err = info.value
    assert isinstance(err, pickle.UnpicklingError)
    assert PAYLOAD_GLOBALS[kind] in err.dangerous
    message = str(err)
    assert PAYLOAD_GLOBALS[kind] in message and str(path) in message
    assert "malicious" in message and "weights_only=False" not in message
    # Also with an allowlist that has nothing to do with the payload.
    with pytest.raises(UnsafeCheckpointError):
        load_file(path, allowed_globals=MMENGINE_RUNNER)
    assert not sentinel.exists(), "the payload ran"


@pytest.mark.parametrize("kind", sorted(PAYLOAD_GLOBALS))
def test_payloads_are_real(tmp_path: Path, kind: str) -> None:
    # The control for the test above: an unrestricted unpickler does run each payload.
    sentinel = tmp_path / "PWNED"
    pickle.loads(pickle.dumps(Payload(kind, sentinel), protocol=2))
    assert sentinel.exists()


@contextlib.contextmanager
def spy_torch_load(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[dict[str, Any]]]:
    calls: list[dict[str, Any]] = []
    real = torch.load

    def spy(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    yield calls


@pytest.mark.parametrize("container", ["zip", "legacy"])
def test_a_failed_safe_load_is_never_retried_unsafely(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, container: str
) -> None:
    sentinel = tmp_path / "PWNED"
    path = write_container(container, {"x": Payload("os.system", sentinel)}, tmp_path / "e.pth")
    with spy_torch_load(monkeypatch) as calls, pytest.raises(UnsafeCheckpointError):
        load_file(path)
    assert calls and all(call["weights_only"] is True for call in calls)
    assert not sentinel.exists()


def test_force_no_weights_only_env_cannot_disable_the_safe_loader(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    benign = save({"args": argparse.Namespace(lr=0.1)}, tmp_path / "benign.pth")
    sentinel = tmp_path / "PWNED"
    evil = save({"x": Payload("os.system", sentinel)}, tmp_path / "evil.pth")
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    # What the variable does to callers that leave weights_only out (as the seeds do):
    with pytest.warns(UserWarning, match="TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"):
        assert torch.load(benign)["args"].lr == 0.1
    # ckptmap passes weights_only=True explicitly, which torch then honours.
    with pytest.raises(UnsafeCheckpointError, match=r"argparse\.Namespace"):
        load_file(benign)
    with pytest.raises(UnsafeCheckpointError):
        load_file(evil)
    assert not sentinel.exists()


def test_force_weights_only_env_overrides_the_unsafe_opt_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    benign = save({"args": argparse.Namespace(lr=0.1)}, tmp_path / "benign.pth")
    plain = tmp_path / "plain.pkl"
    plain.write_bytes(pickle.dumps({"args": argparse.Namespace(lr=0.1)}, protocol=2))
    monkeypatch.setenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "1")
    for path in (benign, plain):
        with warnings.catch_warnings():
            warnings.simplefilter("error", UnsafeLoadWarning)
            with pytest.raises(UnsafeCheckpointError):
                load_file(path, weights_only=False)


# -- benign classes outside the allowlist: listed, with the opt-in named -----------------------
# (numpy values and mmengine's Runner state load by default: tests/test_allowlist.py)


def test_namespace_needs_an_explicit_opt_in(tmp_path: Path) -> None:
    path = save({"args": argparse.Namespace(lr=0.1), "w": torch.ones(1)}, tmp_path / "ns.pth")
    with pytest.raises(UnsafeCheckpointError) as info:
        load_file(path)
    assert info.value.globals == ["argparse.Namespace"]
    assert "allowed_globals" in str(info.value) and "weights_only=False" in str(info.value)
    assert load_file(path, allowed_globals=[argparse.Namespace])["args"].lr == 0.1
    # The opt-in lasts for that call only.
    with pytest.raises(UnsafeCheckpointError):
        load_file(path)
    with pytest.warns(UnsafeLoadWarning, match="weights_only=False"):
        assert load_file(path, weights_only=False)["args"].lr == 0.1


def test_allowing_keeps_globals_the_user_registered(tmp_path: Path) -> None:
    path = save({"args": argparse.Namespace(lr=0.1)}, tmp_path / "ns.pth")
    before = list(torch.serialization.get_safe_globals())
    torch.serialization.add_safe_globals([argparse.Namespace])
    try:
        load_file(path, allowed_globals=[argparse.Namespace])
        assert argparse.Namespace in torch.serialization.get_safe_globals()
        assert load_file(path)["args"].lr == 0.1  # the user's own registration still holds
    finally:
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(before)


def test_unsafe_warning_can_be_filtered_by_class(tmp_path: Path) -> None:
    path = save({"args": argparse.Namespace(lr=0.1)}, tmp_path / "ns.pth")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnsafeLoadWarning)
        assert load_file(path, weights_only=False)["args"].lr == 0.1


# -- plain pickles ------------------------------------------------------------------------------


def test_plain_protocol_2_pickle_loads_safely(tmp_path: Path) -> None:
    path = tmp_path / "plain.pkl"
    obj = {"epoch": 3, "names": ["a", "b"], "lr": 0.5, "od": collections.OrderedDict(a=1)}
    path.write_bytes(pickle.dumps(obj, protocol=2))
    assert load_file(path) == obj


def test_plain_protocol_4_pickle_needs_the_opt_in(tmp_path: Path) -> None:
    path = tmp_path / "plain.pkl"
    path.write_bytes(pickle.dumps({"epoch": 3}, protocol=4))
    with pytest.raises(UnsafeCheckpointError, match="protocol-4") as info:
        load_file(path)
    assert "weights_only=False" in str(info.value)
    with pytest.warns(UnsafeLoadWarning):
        assert load_file(path, weights_only=False) == {"epoch": 3}


def test_plain_pickle_with_tensors_names_the_unsafe_storage_loader(tmp_path: Path) -> None:
    # pickle.dumps(tensor) embeds a torch.save blob that is loaded with weights_only=False.
    path = tmp_path / "plain.pkl"
    path.write_bytes(pickle.dumps({"w": torch.ones(2)}, protocol=2))
    with pytest.raises(UnsafeCheckpointError, match=r"torch\.storage\._load_from_bytes"):
        load_file(path)


@pytest.mark.parametrize("cut", [3, 10, -1])
def test_truncated_plain_pickle_is_corrupt(tmp_path: Path, cut: int) -> None:
    path = tmp_path / "plain.pkl"
    path.write_bytes(pickle.dumps({"epoch": 3, "names": ["a", "b"] * 5}, protocol=2)[:cut])
    with pytest.raises(CorruptCheckpointError, match="corrupt or truncated") as info:
        load_file(path)
    assert "weights_only" not in str(info.value)


# -- the globals scan -----------------------------------------------------------------------


@pytest.mark.parametrize("protocol", [0, 1, 2, 3, 4, 5])
def test_pickle_globals_reads_every_protocol_without_executing(
    tmp_path: Path, protocol: int
) -> None:
    import io

    sentinel = tmp_path / "PWNED"
    data = pickle.dumps(
        [Payload("os.system", sentinel), argparse.Namespace(a=1), collections.OrderedDict()],
        protocol=protocol,
    )
    found = pickle_globals(io.BytesIO(data))
    assert {"posix.system", "argparse.Namespace", "collections.OrderedDict"} <= found
    assert not sentinel.exists()
    with pytest.raises(ValueError):
        pickle_globals(io.BytesIO(data[:-1]))


# -- validate_state_dict --------------------------------------------------------------------------


def test_validate_state_dict_names_the_bad_key() -> None:
    good = {"a.weight": torch.ones(1), "mod._extra_state": {"anything": 1}}
    assert validate_state_dict(good, "x.pth") is good
    with pytest.raises(InvalidStateDictError, match=r"\(1, 2\)") as info:
        validate_state_dict({"a": torch.ones(1), (1, 2): torch.ones(1)}, "x.pth")
    assert isinstance(info.value, TypeError) and "x.pth" in str(info.value)
    with pytest.raises(InvalidStateDictError, match=r"'b\.weight' to a list"):
        validate_state_dict({"b.weight": [1.0]}, "x.pth")
    with pytest.raises(InvalidStateDictError, match="not a mapping"):
        validate_state_dict([torch.ones(1)], "x.pth")


# -- errors travel between processes ---------------------------------------------------------


def test_errors_survive_pickling(tmp_path: Path) -> None:
    errors: list[CkptmapError] = [
        UnsafeCheckpointError("x.pth", ["posix.system"], ["posix.system"], "why"),
        UnsafeCheckpointError("x.pth", [], reason="why"),
        CorruptCheckpointError("x.pth", 12, "an HTML page"),
    ]
    for err in errors:
        clone = pickle.loads(pickle.dumps(err))
        assert type(clone) is type(err) and str(clone) == str(err)
        assert clone.__dict__ == err.__dict__
