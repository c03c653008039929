"""Format sniffing by content, and the typed errors for paths and for files that are no
checkpoint (RELIABILITY.md: "Local files", and the corrupt / confused-format cases)."""

from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import tempfile
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from probes import mapped_from

from ckptmap.errors import (
    CheckpointIsADirectoryError,
    CheckpointNotFoundError,
    CheckpointPermissionError,
    CkptmapError,
    CorruptCheckpointError,
    DanglingSymlinkError,
    TorchScriptArchiveError,
    UnsafeCheckpointError,
)
from ckptmap.formats import Format, load_file, sniff
from ckptmap.formats.sniff import LEGACY_MAGIC


def state_dict() -> dict[str, torch.Tensor]:
    return {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(3)}


def save_zip(path: Path) -> Path:
    torch.save(state_dict(), path)
    return path


def save_legacy(path: Path) -> Path:
    torch.save(state_dict(), path, _use_new_zipfile_serialization=False)
    return path


def save_safetensors(path: Path) -> Path:
    from safetensors.torch import save_file

    save_file(state_dict(), str(path))
    return path


def assert_equal_dicts(a: dict, b: dict, ordered: bool = True) -> None:
    assert list(a) == list(b) if ordered else sorted(a) == sorted(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


# -- sniffing by content ----------------------------------------------------------------------


def test_sniff_recognises_each_format_by_content(tmp_path: Path) -> None:
    names = {
        Format.TORCH_ZIP: save_zip(tmp_path / "a.bin"),
        Format.TORCH_LEGACY: save_legacy(tmp_path / "b.ckpt"),
        Format.SAFETENSORS: save_safetensors(tmp_path / "c.dat"),
    }
    plain = tmp_path / "d.weights"
    plain.write_bytes(pickle.dumps({"x": 1}, protocol=4))
    names[Format.PICKLE] = plain
    for expected, path in names.items():
        sniffed = sniff(path)
        assert sniffed.format is expected, (path, sniffed)
        assert sniffed.size == path.stat().st_size
        assert sniffed.path == str(path)


def test_legacy_magic_is_what_torch_writes(tmp_path: Path) -> None:
    head = save_legacy(tmp_path / "a.pth").read_bytes()[:32]
    assert head[:2] == b"\x80\x02"
    assert head[2:].startswith(LEGACY_MAGIC)


def test_safetensors_named_pth_loads_as_safetensors(tmp_path: Path) -> None:
    path = save_safetensors(tmp_path / "model.pth")
    assert sniff(path).format is Format.SAFETENSORS
    assert_equal_dicts(dict(load_file(path)), state_dict(), ordered=False)


def test_zip_named_safetensors_loads_as_torch_zip_with_mmap(tmp_path: Path) -> None:
    # torch.load itself hands any "*.safetensors" path to safetensors, whatever its content.
    path = save_zip(tmp_path / "model.safetensors")
    assert sniff(path).format is Format.TORCH_ZIP
    loaded = load_file(path)
    assert_equal_dicts(loaded, state_dict())
    assert mapped_from(loaded["w"], path)


def test_legacy_named_safetensors_loads_as_legacy(tmp_path: Path) -> None:
    path = save_legacy(tmp_path / "model.safetensors")
    assert_equal_dicts(load_file(path), state_dict())


def test_torchscript_archive_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "scripted.pth"

    class Mod(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(2, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x)

    with warnings.catch_warnings():
        # TorchScript is deprecated, and making an archive is the point here.
        warnings.filterwarnings("ignore", r".*torch\.jit", FutureWarning)
        traced = torch.jit.trace(Mod(), torch.ones(1, 2))
        torch.jit.save(traced, str(path))
    assert sniff(path).format is Format.TORCHSCRIPT
    with pytest.raises(TorchScriptArchiveError, match=r"torch\.jit\.load") as info:
        load_file(path)
    assert isinstance(info.value, RuntimeError)
    assert str(path) in str(info.value)
    assert "weights_only" not in str(info.value)


@pytest.mark.parametrize(
    ("content", "looks_like"),
    [
        (b"", "empty"),
        (b"<!DOCTYPE html>\n<html><body>403 Forbidden</body></html>", "HTML page"),
        (b"\n  <html><head><title>Sign in</title></head></html>", "HTML page"),
        (b'<?xml version="1.0"?><Error><Code>NoSuchKey</Code></Error>', "XML document"),
        (
            b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n",
            "Git LFS pointer",
        ),
        (b"\x1f\x8b\x08\x00" + bytes(40), "gzip"),
        (b"hello world, not a checkpoint at all" * 3, "unrecognised data"),
        (b"PK\x05\x06" + bytes(18), "empty zip archive"),
        (b"\x80\x02\x8a\x0a", "truncated legacy"),
        (b"abc", "fragment"),
        (b'{"not": "an index"}', "without a 'weight_map'"),
        (b'{"weight_map": {"a": "x.safetensors"', "malformed JSON"),
        (struct.pack("<Q", 10**12) + b'{"a":1}', "damaged safetensors"),
        (struct.pack("<Q", 1000) + b'{"a":', "truncated safetensors"),
    ],
)
def test_not_a_checkpoint_is_one_corrupt_error(tmp_path: Path, content: bytes, looks_like: str):
    path = tmp_path / "model.pth"
    path.write_bytes(content)
    assert sniff(path).format is Format.CORRUPT
    with pytest.raises(CorruptCheckpointError) as info:
        load_file(path)
    message = str(info.value)
    assert looks_like in message
    assert str(path) in message
    assert f"({len(content):,} bytes)" in message
    assert info.value.size == len(content)
    # A file that is not a pickle never gets the "weights_only=False" advice.
    assert "weights_only" not in message


@pytest.mark.parametrize("saver", [save_zip, save_legacy, save_safetensors])
@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.5, 0.9, 0.999])
def test_truncated_checkpoint_is_corrupt_with_size_and_next_step(
    tmp_path: Path, saver, fraction: float
) -> None:
    full = saver(tmp_path / "full.pth").read_bytes()
    cut = tmp_path / "cut.pth"
    cut.write_bytes(full[: max(1, int(len(full) * fraction))])
    with pytest.raises(CorruptCheckpointError) as info:
        load_file(cut)
    message = str(info.value)
    assert "corrupt or truncated" in message
    assert f"{cut.stat().st_size:,} bytes" in message
    assert "download" in message and "cache" in message
    assert "weights_only" not in message


def test_foreign_zip_says_what_it_holds(tmp_path: Path) -> None:
    path = tmp_path / "model.pth"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("weights/readme.txt", "hi")
    with pytest.raises(CorruptCheckpointError, match=r"zip archive that torch\.save did not write"):
        load_file(path)


def test_corrupt_error_is_a_runtime_error_like_torchs(tmp_path: Path) -> None:
    path = tmp_path / "model.pth"
    path.write_bytes(save_zip(tmp_path / "ok.pth").read_bytes()[:100])
    with pytest.raises(RuntimeError):
        load_file(path)
    with pytest.raises(CkptmapError):
        load_file(path)


@given(st.binary(max_size=300), st.sampled_from([b"", b"PK\x03\x04", b"\x80\x02", b"\x80\x04"]))
def test_arbitrary_bytes_never_escape_as_untyped_errors(prefix_free: bytes, magic: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "x.pth"
        path.write_bytes(magic + prefix_free)
        try:
            load_file(path)
        except CkptmapError:
            pass


@given(st.binary(max_size=200))
def test_damaged_legacy_pickles_are_corrupt_or_unsafe(garbage: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "x.pth"
        path.write_bytes(b"\x80\x02" + LEGACY_MAGIC + b"\x80\x02M\xe9\x03." + garbage)
        try:
            load_file(path)
        except CkptmapError:
            pass


# -- sharded: recognised by content (loading is ckptmap.formats.sharded's) --------------------


def test_index_json_and_directory_are_sharded(tmp_path: Path) -> None:
    index = tmp_path / "weights.json"  # any name: the content decides
    index.write_text(json.dumps({"metadata": {}, "weight_map": {"a": "s1.safetensors"}}))
    assert sniff(index).format is Format.SHARDED
    assert sniff(index).index_path == str(index)

    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("pytorch_model.bin.index.json", "model.safetensors.index.json"):
        (repo / name).write_text(json.dumps({"weight_map": {}}))
    sniffed = sniff(repo)
    assert sniffed.format is Format.SHARDED
    assert sniffed.index_path == str(repo / "model.safetensors.index.json")


def test_load_file_dispatches_sharded_checkpoints(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    sd = state_dict()
    save_file({"w": sd["w"]}, str(tmp_path / "part-1.safetensors"))
    torch.save({"b": sd["b"]}, tmp_path / "part-2.bin")
    weight_map = {"w": "part-1.safetensors", "b": "part-2.bin"}
    (tmp_path / "model.index.json").write_text(json.dumps({"weight_map": weight_map}))
    for path in (tmp_path, tmp_path / "model.index.json"):
        assert_equal_dicts(dict(load_file(path)), sd, ordered=False)


def test_sharded_torch_shards_load_safely(tmp_path: Path) -> None:
    # weights_only and the allowlist reach the .bin shards through the dispatcher.
    torch.save({"w": torch.ones(1), "args": argparse.Namespace(a=1)}, tmp_path / "s.bin")
    (tmp_path / "m.index.json").write_text(json.dumps({"weight_map": {"w": "s.bin"}}))
    with pytest.raises(UnsafeCheckpointError, match=r"argparse\.Namespace"):
        load_file(tmp_path)
    loaded = load_file(tmp_path, allowed_globals=[argparse.Namespace])
    assert torch.equal(loaded["w"], torch.ones(1))


# -- paths: each failure its own type ---------------------------------------------------------


def test_missing_path(tmp_path: Path) -> None:
    path = tmp_path / "nope.pth"
    with pytest.raises(CheckpointNotFoundError, match="can not be found") as info:
        load_file(path)
    assert type(info.value) is CheckpointNotFoundError
    assert isinstance(info.value, FileNotFoundError)
    assert str(path) in str(info.value)


def test_dangling_symlink_is_its_own_error(tmp_path: Path) -> None:
    link = tmp_path / "latest.pth"
    link.symlink_to(tmp_path / "epoch_3.pth")
    with pytest.raises(DanglingSymlinkError) as info:
        load_file(link)
    assert isinstance(info.value, FileNotFoundError)  # old except clauses keep working
    assert "epoch_3.pth" in str(info.value) and "symlink" in str(info.value)
    assert info.value.target == str(tmp_path / "epoch_3.pth")


def test_directory_without_index(tmp_path: Path) -> None:
    with pytest.raises(CheckpointIsADirectoryError) as info:
        load_file(tmp_path)
    assert isinstance(info.value, IsADirectoryError)
    assert not isinstance(info.value, FileNotFoundError)
    assert str(tmp_path) in str(info.value)


def test_symlink_to_a_good_file_loads(tmp_path: Path) -> None:
    link = tmp_path / "latest.pth"
    link.symlink_to(save_zip(tmp_path / "epoch_1.pth"))
    assert_equal_dicts(load_file(link), state_dict())


def test_tilde_is_expanded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    save_zip(tmp_path / "home.pth")
    assert_equal_dicts(load_file("~/home.pth"), state_dict())


_PERMISSION_CHILD = """
import os, sys
from ckptmap.errors import CheckpointPermissionError
from ckptmap.formats import load_file
os.setgid(65534)
os.setuid(65534)
for path in sys.argv[1:]:
    try:
        load_file(path)
    except CheckpointPermissionError as err:
        assert isinstance(err, PermissionError), type(err).__mro__
        assert path in str(err), str(err)
        print("OK", err)
    else:
        print("LOADED", path)
"""


def test_permission_denied(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        path = save_zip(tmp_path / "secret.pth")
        path.chmod(0o000)
        with pytest.raises(CheckpointPermissionError) as info:
            load_file(path)
        assert isinstance(info.value, PermissionError)
        return
    # As root a mode-000 file is still readable: drop privileges in a child process. The
    # file sits in a directory the child may search; a second one sits in a directory it may
    # not (tmp_path's parents are private to root).
    shared = Path(tempfile.mkdtemp(prefix="ckptmap-perm-"))
    try:
        shared.chmod(0o755)
        unreadable = save_zip(shared / "secret.pth")
        unreadable.chmod(0o000)
        unreachable = save_zip(tmp_path / "hidden.pth")
        result = subprocess.run(
            [sys.executable, "-c", _PERMISSION_CHILD, str(unreadable), str(unreachable)],
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        shutil.rmtree(shared)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("OK") == 2, result.stdout
