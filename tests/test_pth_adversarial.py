"""Damaged and malicious torch zip checkpoints against the Rust reader.

Every file here starts as a real ``torch.save`` checkpoint and is then cut, corrupted or
re-packed the way disks, downloads and attackers do it. The reader must answer with a typed
error naming the file (`InvalidTorchZipError`, a `CorruptCheckpointError`), or hand the file
to torch's safe loader, which refuses it exactly as it did before the reader existed; no
payload ever runs, no crash, no other exception.
"""

from __future__ import annotations

import collections
import os
import pickle
import struct
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pth_compare import assert_same

from ckptmap._core import PthFormatError, PthReader
from ckptmap.errors import (
    CorruptCheckpointError,
    InvalidTorchZipError,
    UnsafeAllowlistError,
    UnsafeCheckpointError,
)
from ckptmap.formats import load_file, pth
from ckptmap.formats.allowlist import MMENGINE_RUNNER
from ckptmap.formats.pth import read_pth


def checkpoint(path: Path) -> Path:
    w = torch.arange(12.0).reshape(3, 4)
    sd = collections.OrderedDict(w=w, v=w[1:], b=torch.ones(4, dtype=torch.int64))
    sd._metadata = {"": {"version": 1}}  # type: ignore[attr-defined]
    torch.save({"state_dict": sd, "epoch": 3}, path)
    return path


def members(path: Path) -> list[tuple[str, bytes]]:
    with zipfile.ZipFile(path) as z:
        return [(i.filename, z.read(i)) for i in z.infolist()]


def repack(
    out: Path,
    entries: list[tuple[str, bytes]],
    compression: int = zipfile.ZIP_STORED,
) -> Path:
    """A zip of `entries` written by Python's zipfile (a valid archive of another writer)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Duplicate name", UserWarning)
        with zipfile.ZipFile(out, "w", compression) as z:
            for name, data in entries:
                z.writestr(name, data)
    return out


def kind_of(path: Path) -> str:
    with pytest.raises(InvalidTorchZipError) as info:
        read_pth(path)
    err = info.value
    assert str(path) in str(err) and err.size == path.stat().st_size
    assert isinstance(err, CorruptCheckpointError) and isinstance(err, ValueError)
    with pytest.raises(PthFormatError) as raw:
        PthReader.open(path)
    assert raw.value.kind == err.kind and raw.value.path == str(path)
    return err.kind


def edit(path: Path, name_suffix: str, change: Callable[[bytes], bytes]) -> list[tuple[str, bytes]]:
    return [(n, change(d) if n.endswith(name_suffix) else d) for n, d in members(path)]


# -- every error kind, from real files -----------------------------------------------------------


def test_a_repacked_archive_still_loads(tmp_path: Path) -> None:
    good = checkpoint(tmp_path / "m.pth")
    out = repack(tmp_path / "re.pth", members(good))
    f = read_pth(out)
    assert f.fallback_reason is None
    assert torch.equal(f.load()["state_dict"]["v"], torch.arange(4.0, 12.0).reshape(2, 4))


def test_no_end_record(tmp_path: Path) -> None:
    good = checkpoint(tmp_path / "m.pth")
    (tmp_path / "cut.pth").write_bytes(good.read_bytes()[:-5])
    assert kind_of(tmp_path / "cut.pth") == "no_end_record"
    (tmp_path / "tail.pth").write_bytes(good.read_bytes() + b"garbage")
    assert kind_of(tmp_path / "tail.pth") == "no_end_record"


def test_end_records_that_disagree_or_do_not_fit(tmp_path: Path) -> None:
    # torch's writer always adds the zip64 end records; the classic ones must agree.
    data = bytearray(checkpoint(tmp_path / "m.pth").read_bytes())
    eocd = data.rindex(b"PK\x05\x06")
    zip64 = data.rindex(b"PK\x06\x06")
    bad = bytearray(data)
    struct.pack_into("<I", bad, eocd + 16, struct.unpack_from("<I", bad, eocd + 16)[0] - 10)
    (tmp_path / "a.pth").write_bytes(bad)
    assert kind_of(tmp_path / "a.pth") == "bad_zip64"
    for field in (eocd + 16, zip64 + 48):  # both offsets of the central directory
        fmt = "<I" if field == eocd + 16 else "<Q"
        struct.pack_into(fmt, data, field, struct.unpack_from(fmt, data, field)[0] - 10)
    (tmp_path / "b.pth").write_bytes(data)
    assert kind_of(tmp_path / "b.pth") == "bad_central_directory"


def test_compressed_member(tmp_path: Path) -> None:
    good = checkpoint(tmp_path / "m.pth")
    out = repack(tmp_path / "z.pth", members(good), zipfile.ZIP_DEFLATED)
    with pytest.raises(PthFormatError) as raw:
        PthReader.open(out)
    assert raw.value.kind == "compressed_member"
    # The reader maps only stored members; torch's reader inflates them, under ckptmap's cap
    # (ckptmap.formats.torch_zip_check), and the reason is given.
    assert "compressed member" in (read_pth(out).fallback_reason or "")
    assert_same(load_file(out), torch.load(good, weights_only=True))


def test_a_huge_memo_slot_in_a_pickle_torch_reads_is_not_replayed(tmp_path: Path) -> None:
    """The Rust reader hands a sparse memo to torch's reader, after ckptmap's replay of
    data.pkl in a C unpickler, which sizes its memo to the largest slot named: a damaged slot
    must not reach it (2**31 is 16 GiB). torch's own unpickler (a dict memo) then decides."""
    import tracemalloc

    good = checkpoint(tmp_path / "m.pth")
    damaged = b"\x80\x02}r" + (1 << 26).to_bytes(4, "little") + b"."  # {} at slot 2**26
    out = repack(tmp_path / "z.pth", edit(good, "data.pkl", lambda _: damaged))
    tracemalloc.start()
    try:
        assert load_file(out) == {}
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20, f"{peak:,} bytes: the memo was sized to the slot (512 MiB)"
    assert torch.load(out, weights_only=True) == {}


def test_duplicate_member(tmp_path: Path) -> None:
    entries = members(checkpoint(tmp_path / "m.pth"))
    record = next(e for e in entries if e[0].endswith("data/0"))
    assert kind_of(repack(tmp_path / "d.pth", [*entries, record])) == "duplicate_member"


@pytest.mark.parametrize(
    "name", ["m/../../etc/passwd", "other/data/9", "m//x", "m/./x", "m/a\\b", "/abs/x"]
)
def test_member_names_outside_the_archive(tmp_path: Path, name: str) -> None:
    entries = members(checkpoint(tmp_path / "m.pth"))
    assert kind_of(repack(tmp_path / "n.pth", [*entries, (name, b"x")])) == "bad_member_name"


def test_data_pkl_outside_the_first_members_directory(tmp_path: Path) -> None:
    entries = members(checkpoint(tmp_path / "m.pth"))
    out = repack(tmp_path / "p.pth", [("elsewhere/readme", b"hi"), *entries])
    assert kind_of(out) == "bad_member_name"
    moved = [(n.replace("m/", "x/", 1), d) for n, d in entries if not n.endswith("data.pkl")]
    out = repack(tmp_path / "q.pth", [*moved, ("x/sub/data.pkl", dict(entries)["m/data.pkl"])])
    assert kind_of(out) == "missing_record"


def central_entries(data: bytes) -> dict[str, int]:
    """Offsets of the central directory entries of a (non-zip64) archive, by name."""
    eocd = data.rindex(b"PK\x05\x06")
    count, _size, at = struct.unpack_from("<HII", data, eocd + 10)
    out = {}
    for _ in range(count):
        n, e, c = struct.unpack_from("<HHH", data, at + 28)
        out[data[at + 46 : at + 46 + n].decode()] = at
        at += 46 + n + e + c
    return out


def test_overlapping_members(tmp_path: Path) -> None:
    data = bytearray(checkpoint(tmp_path / "m.pth").read_bytes())
    # Grow data/0's sizes so its data runs over the next member's header.
    entry = central_entries(data)["m/data/0"]
    size = struct.unpack_from("<I", data, entry + 24)[0]
    struct.pack_into("<II", data, entry + 20, size + 200, size + 200)
    (tmp_path / "o.pth").write_bytes(data)
    assert kind_of(tmp_path / "o.pth") == "overlapping_members"


def test_missing_storage_record(tmp_path: Path) -> None:
    entries = [e for e in members(checkpoint(tmp_path / "m.pth")) if not e[0].endswith("data/1")]
    assert kind_of(repack(tmp_path / "r.pth", entries)) == "missing_record"


def test_damaged_pickle_fails_its_crc(tmp_path: Path) -> None:
    data = bytearray(checkpoint(tmp_path / "m.pth").read_bytes())
    at = data.index(b"state_dict")
    data[at] = ord("S")
    (tmp_path / "c.pth").write_bytes(data)
    assert kind_of(tmp_path / "c.pth") == "crc_mismatch"


def test_bad_byteorder(tmp_path: Path) -> None:
    entries = edit(checkpoint(tmp_path / "m.pth"), "/byteorder", lambda _: b"middle")
    assert kind_of(repack(tmp_path / "b.pth", entries)) == "bad_byteorder"


def test_storage_record_of_the_wrong_size(tmp_path: Path) -> None:
    entries = edit(checkpoint(tmp_path / "m.pth"), "data/0", lambda d: d + b"\0" * 4)
    assert kind_of(repack(tmp_path / "s.pth", entries)) == "storage_size_mismatch"
    entries = edit(checkpoint(tmp_path / "m.pth"), "data/0", lambda d: d[:-4])
    assert kind_of(repack(tmp_path / "t.pth", entries)) == "storage_size_mismatch"


class Rebuilt:
    """Pickles as torch.save pickles a tensor, with the sizes, strides and offset given."""

    def __init__(self, data: torch.Tensor, offset: int, size: tuple, stride: tuple) -> None:
        self.data = data
        self.args = (offset, size, stride)

    def __reduce_ex__(self, protocol: int) -> tuple:
        storage = torch.storage.TypedStorage(
            wrap_storage=self.data.untyped_storage(), dtype=self.data.dtype, _internal=True
        )
        return (
            torch._utils._rebuild_tensor_v2,
            (storage, *self.args, False, collections.OrderedDict()),
        )


@pytest.mark.parametrize(
    ("offset", "size", "stride"),
    [(0, (13,), (1,)), (1, (12,), (1,)), (0, (3, 5), (4, 1)), (12, (1,), (1,)), (0, (2,), (12,))],
)
def test_tensors_reaching_past_their_storage(tmp_path: Path, offset, size, stride) -> None:
    path = tmp_path / "oob.pth"
    torch.save({"x": Rebuilt(torch.arange(12.0), offset, size, stride)}, path)
    assert kind_of(path) == "tensor_out_of_bounds"
    with pytest.raises(InvalidTorchZipError, match=r"need .* bytes, but its storage"):
        load_file(path)


def test_sizes_that_overflow(tmp_path: Path) -> None:
    path = tmp_path / "big.pth"
    torch.save({"x": Rebuilt(torch.arange(12.0), 0, (2**40, 2**40), (1, 1))}, path)
    assert kind_of(path) == "size_overflow"


def test_a_tensor_inside_its_storage_loads_as_torch_builds_it(tmp_path: Path) -> None:
    path = tmp_path / "ok.pth"
    torch.save({"x": Rebuilt(torch.arange(12.0), 2, (2, 3), (1, 4)), "e": torch.ones(0)}, path)
    ours = read_pth(path).load()
    theirs = torch.load(path, weights_only=True)
    assert torch.equal(ours["x"], theirs["x"]) and ours["x"].stride() == (1, 4)


# -- cut and corrupted anywhere -------------------------------------------------------------


def test_truncated_at_every_offset_is_corrupt(tmp_path: Path) -> None:
    data = checkpoint(tmp_path / "m.pth").read_bytes()
    path = tmp_path / "cut.pth"
    for cut in range(0, len(data), 7):
        path.write_bytes(data[:cut])
        with pytest.raises(CorruptCheckpointError) as info:
            load_file(path)
        assert str(path) in str(info.value)
        if cut > 22:
            with pytest.raises(InvalidTorchZipError):
                read_pth(path)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=150)
@given(at=st.integers(0, 10**6), value=st.integers(0, 255))
def test_one_damaged_byte_never_escapes_as_another_error(tmp_path_factory, at: int, value: int):
    base = tmp_path_factory.mktemp("flip")
    data = bytearray(checkpoint(base / "m.pth").read_bytes())
    data[at % len(data)] = value
    path = base / "flipped.pth"
    path.write_bytes(data)
    try:
        loaded = load_file(path)
    except (CorruptCheckpointError, UnsafeCheckpointError):
        return
    # Bytes no check covers (tensor data, padding, timestamps) load as torch reads them.
    theirs = torch.load(path, weights_only=True)
    assert list(loaded) == list(theirs)


# -- malicious pickles ----------------------------------------------------------------------------


class Reduce:
    def __init__(self, func: Any, args: tuple) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple:
        return (self.func, self.args)


def payloads(sentinel: Path) -> dict[str, Any]:
    touch = f"touch {sentinel}"
    return {
        "os.system": Reduce(os.system, (touch,)),
        "eval": Reduce(eval, (f"__import__('os').system({touch!r})",)),
        "exec": Reduce(exec, (f"open({str(sentinel)!r}, 'w').close()",)),
        "getattr-chain": Reduce(getattr, (Reduce(__import__, ("os",)), "system")),
        "nested-in-tensor-args": {"x": torch.ones(1), "y": [Reduce(os.system, (touch,))]},
        "import": Reduce(__import__, ("subprocess",)),
    }


def torch_path_error(path: Path, monkeypatch: pytest.MonkeyPatch, **kwargs: Any) -> str:
    with monkeypatch.context() as m:
        m.setattr(pth, "load_fast", lambda *args, **kw: pth.FALLBACK)
        with pytest.raises(UnsafeCheckpointError) as info:
            load_file(path, **kwargs)
    return str(info.value)


@pytest.mark.parametrize("name", sorted(payloads(Path("x"))))
@pytest.mark.parametrize("protocol", [2, 4])
def test_malicious_pickles_never_run_and_fail_as_before(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, protocol: int
) -> None:
    sentinel = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save(
        {"state_dict": {"w": torch.ones(2)}, "x": payloads(sentinel)[name]},
        path,
        pickle_protocol=protocol,
    )
    reason = read_pth(path).fallback_reason or ""
    assert "not in the allowlist" in reason or "torch always refuses" in reason
    with pytest.raises(UnsafeCheckpointError) as info:
        load_file(path)
    assert not sentinel.exists()
    # Exactly the error torch's path gave before the reader existed.
    assert str(info.value) == torch_path_error(path, monkeypatch)
    assert info.value.dangerous or protocol == 4
    # An allowlist for something else widens nothing.
    with pytest.raises(UnsafeCheckpointError):
        load_file(path, allowed_globals=MMENGINE_RUNNER)
    assert not sentinel.exists()


def test_allowlisting_a_dangerous_module_widens_nothing(tmp_path: Path) -> None:
    sentinel = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"x": Reduce(os.system, (f"touch {sentinel}",))}, path)
    # No allowlist can hold os.system (refused before anything is read) ...
    with pytest.raises(UnsafeAllowlistError):
        read_pth(path, allowed_globals=[os.system])
    with pytest.raises(UnsafeAllowlistError):
        load_file(path, allowed_globals=[os.system])
    # ... and the reader hands the file to torch, which refuses it.
    assert "posix.system" in (read_pth(path).fallback_reason or "")
    with pytest.raises(UnsafeCheckpointError):
        load_file(path)
    assert not sentinel.exists()


def test_restricted_getattr_of_the_runner_allowlist_stays_restricted(tmp_path: Path) -> None:
    import builtins

    path = tmp_path / "evil.pth"
    torch.save({"x": Reduce(getattr, (collections.OrderedDict, "fromkeys"))}, path)
    assert read_pth(path, allowed_globals=MMENGINE_RUNNER).fallback_reason is None
    # The reader calls the allowlist's getattr, which refuses; torch then refuses too.
    with pytest.raises(UnsafeCheckpointError, match=r"builtins\.getattr"):
        load_file(path, allowed_globals=MMENGINE_RUNNER)
    assert builtins.getattr is getattr


def test_a_persistent_id_that_is_not_a_storage_goes_to_torch(tmp_path: Path) -> None:
    class Pickler(pickle.Pickler):
        def persistent_id(self, obj: Any) -> Any:
            return ("module", "os", "system") if obj == "marker" else None

    path = tmp_path / "pid.pth"
    with zipfile.ZipFile(path, "w") as z:
        import io

        buf = io.BytesIO()
        Pickler(buf, protocol=2).dump({"x": "marker"})
        z.writestr("archive/data.pkl", buf.getvalue())
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/version", "3\n")
    f = read_pth(path)
    assert f.fallback_reason is not None and "persistent id" in f.fallback_reason
    with pytest.raises(UnsafeCheckpointError):
        load_file(path)
