"""Saved files as the file system sees them: modes, symlinks, write protection, error names.

`save_checkpoint` replaces a file atomically instead of writing in place, and must still leave
what ``torch.save`` (which writes in place) leaves: the mode of the file it replaces, the
umask's mode for a new one, a symlink still a link to the same file. Each case runs
``torch.save`` beside ckptmap as the reference. Permission checks run in a child process as an
unprivileged user (root may write anything), beside mmengine's own `save_checkpoint`.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import torch

from ckptmap.atomic import TEMP_MARKER, is_temp_file
from ckptmap.errors import CheckpointSaveError, SaveTargetIsADirectoryError
from ckptmap.formats import load_file
from ckptmap.save import save_checkpoint


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def checkpoint(value: float) -> dict:
    return {"meta": {"v": value}, "state_dict": {"w": torch.full((4,), value)}}


def value_of(path: Path) -> float:
    return load_file(path)["state_dict"]["w"][0].item()


@pytest.fixture
def umask():
    """Sets the process umask for one test (and restores it)."""
    old = os.umask(0o022)
    os.umask(old)
    yield lambda mask: os.umask(mask)
    os.umask(old)


# --- modes -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a.pth", "a.safetensors"])
@pytest.mark.parametrize("file_mode", [0o600, 0o640, 0o604, 0o755])
def test_resaving_keeps_the_mode_like_torch_save(tmp_path, name, file_mode):
    ours, theirs = tmp_path / name, tmp_path / f"torch-{name}"
    save_checkpoint(checkpoint(1.0), ours)
    torch.save(checkpoint(1.0), theirs)
    os.chmod(ours, file_mode)
    os.chmod(theirs, file_mode)
    save_checkpoint(checkpoint(2.0), ours)
    torch.save(checkpoint(2.0), theirs)
    assert mode(ours) == mode(theirs) == file_mode
    assert value_of(ours) == 2.0


def test_a_new_file_gets_the_umask_mode_like_torch_save(tmp_path, umask):
    umask(0o027)
    save_checkpoint(checkpoint(1.0), tmp_path / "new.pth")
    torch.save(checkpoint(1.0), tmp_path / "torch.pth")
    assert mode(tmp_path / "new.pth") == mode(tmp_path / "torch.pth") == 0o640


def test_new_shards_take_the_mode_of_the_index_they_replace(tmp_path, umask):
    umask(0o022)
    state = {f"w{i}": torch.full((64,), float(i)) for i in range(3)}
    index = Path(save_checkpoint(state, tmp_path / "m.safetensors", max_shard_size=256))
    for path in tmp_path.iterdir():
        os.chmod(path, 0o600)
    save_checkpoint(state, tmp_path / "m.safetensors", max_shard_size=256)
    modes = {p.name: mode(p) for p in tmp_path.iterdir()}
    assert len(modes) == 4 and set(modes.values()) == {0o600}, modes
    assert list(load_file(index)) == ["w0", "w1", "w2"]


def test_the_mode_is_set_before_any_byte_is_written(tmp_path, umask):
    """A 0600 checkpoint's new content is never readable by others, not even in its temp."""
    umask(0o022)
    target = tmp_path / "secret.pth"
    save_checkpoint(checkpoint(1.0), target)
    os.chmod(target, 0o600)
    seen: list[int] = []

    class Spy:
        def __reduce__(self):
            (temp,) = [p for p in tmp_path.iterdir() if is_temp_file(p)]
            seen.append(mode(temp))
            return (float, (1.0,))

    save_checkpoint({"state_dict": {}, "spy": Spy()}, target)
    assert seen == [0o600]


# --- symlinks ----------------------------------------------------------------------------------


def test_saving_through_a_symlink_replaces_its_target_and_keeps_the_link(tmp_path):
    """The README's rule: the link stays, the file it points to is replaced atomically."""
    for who in ("ckptmap", "torch"):
        real_dir, link_dir = tmp_path / who / "store", tmp_path / who / "work"
        real_dir.mkdir(parents=True)
        link_dir.mkdir()
        save_checkpoint(checkpoint(1.0), real_dir / "epoch_1.pth")
        os.chmod(real_dir / "epoch_1.pth", 0o600)
        (link_dir / "latest.pth").symlink_to(Path("..") / "store" / "epoch_1.pth")
        if who == "torch":
            torch.save(checkpoint(2.0), link_dir / "latest.pth")
        else:
            save_checkpoint(checkpoint(2.0), link_dir / "latest.pth")
        assert os.readlink(link_dir / "latest.pth") == os.path.join("..", "store", "epoch_1.pth")
        assert value_of(real_dir / "epoch_1.pth") == 2.0
        assert mode(real_dir / "epoch_1.pth") == 0o600
        assert sorted(os.listdir(real_dir)) == ["epoch_1.pth"]
        assert sorted(os.listdir(link_dir)) == ["latest.pth"]


def test_a_dangling_symlink_gets_its_target_created_like_open_does(tmp_path):
    (tmp_path / "link.safetensors").symlink_to("made.safetensors")
    save_checkpoint(checkpoint(3.0), tmp_path / "link.safetensors")
    assert (tmp_path / "link.safetensors").is_symlink()
    assert value_of(tmp_path / "made.safetensors") == 3.0


def test_a_symlink_loop_is_an_error_naming_the_path(tmp_path):
    (tmp_path / "a.pth").symlink_to("b.pth")
    (tmp_path / "b.pth").symlink_to("a.pth")
    with pytest.raises(CheckpointSaveError, match=r"a\.pth") as info:
        save_checkpoint(checkpoint(1.0), tmp_path / "a.pth")
    assert isinstance(info.value, OSError) and TEMP_MARKER not in str(info.value)
    assert sorted(os.listdir(tmp_path)) == ["a.pth", "b.pth"]


def test_a_directory_is_refused_before_anything_is_serialised(tmp_path):
    (tmp_path / "epoch_1.pth").mkdir()

    class MustNotRun:
        def __reduce__(self):
            raise AssertionError("serialised")

    for target in (tmp_path / "epoch_1.pth", f"{tmp_path}{os.sep}"):
        with pytest.raises(SaveTargetIsADirectoryError) as info:
            save_checkpoint({"x": MustNotRun()}, target)
        assert isinstance(info.value, IsADirectoryError)
    assert os.listdir(tmp_path / "epoch_1.pth") == []


def test_a_name_as_long_as_the_file_system_allows_saves(tmp_path):
    name = "é" * 100 + "x" * 50 + ".pth"
    assert len(os.fsencode(name)) == 254
    save_checkpoint(checkpoint(1.0), tmp_path / name)
    assert value_of(tmp_path / name) == 1.0


# --- write protection, as an unprivileged user --------------------------------------------------

NOBODY = 65534

CHILD = """
    import json, os, sys, torch
    from mmengine.runner.checkpoint import save_checkpoint as mmengine_save
    from ckptmap.save import save_checkpoint

    # Imported as root (the interpreter may live under /root, which nobody can read), and one
    # save each done first so every lazy import has happened; then unprivileged for the saves.
    import tempfile
    warm = tempfile.mkdtemp()
    mmengine_save({"w": torch.ones(1)}, os.path.join(warm, "a.pth"))
    save_checkpoint({"w": torch.ones(1)}, os.path.join(warm, "b.pth"))
    if os.geteuid() == 0:
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)
    results = {}
    for label, path in json.loads(sys.argv[1]).items():
        ckpt = {"state_dict": {"w": torch.ones(4)}}
        try:
            if label.startswith("mmengine"):
                mmengine_save(ckpt, path)
            else:
                save_checkpoint(ckpt, path)
            results[label] = "saved"
        except Exception as err:
            results[label] = {
                "bases": [c.__name__ for c in type(err).__mro__],
                "errno": getattr(err, "errno", None),
                "message": str(err),
            }
    print(json.dumps(results))
"""


@pytest.fixture
def unprivileged_dirs():
    """A directory the child may not write (holding files it may write) and one it may."""
    base = Path(tempfile.mkdtemp(prefix="ckptmap-perm-"))
    os.chmod(base, 0o755)
    locked_dir, open_dir = base / "locked", base / "open"
    locked_dir.mkdir()
    open_dir.mkdir()
    for directory in (locked_dir, open_dir):
        for name in ("mmengine.pth", "ours.pth", "mmengine-ro.pth", "ours-ro.pth"):
            torch.save({"state_dict": {"w": torch.zeros(4)}}, directory / name)
            os.chmod(directory / name, 0o444 if "-ro" in name else 0o644)
    root = os.geteuid() == 0
    for path in [open_dir, *open_dir.iterdir(), *locked_dir.iterdir()]:
        if root:
            os.chown(path, NOBODY, NOBODY)
    os.chmod(locked_dir, 0o555)
    try:
        yield locked_dir, open_dir
    finally:
        os.chmod(locked_dir, 0o755)
        shutil.rmtree(base)


def run_unprivileged(targets: dict[str, Path]) -> dict:
    home = str(next(iter(targets.values())).parent.parent)
    child = subprocess.run(
        [
            sys.executable,
            "-c",
            textwrap.dedent(CHILD).replace("NOBODY", str(NOBODY)),
            json.dumps({k: str(v) for k, v in targets.items()}),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HOME": home},
        check=False,
    )
    assert child.returncode == 0, child.stderr
    return json.loads(child.stdout.strip().splitlines()[-1])  # mmengine logs to stdout too


def test_write_protection_is_honoured_and_errors_name_the_target(unprivileged_dirs):
    locked_dir, open_dir = unprivileged_dirs
    before = {p: p.read_bytes() for d in unprivileged_dirs for p in d.iterdir()}
    results = run_unprivileged(
        {
            # A read-only file in a writable directory: mmengine can not open it.
            "mmengine-ro": open_dir / "mmengine-ro.pth",
            "ours-ro": open_dir / "ours-ro.pth",
            # A writable file in a read-only directory: mmengine writes in place, ckptmap
            # needs the directory for its temp file and says so.
            "mmengine-dir": locked_dir / "mmengine.pth",
            "ours-dir": locked_dir / "ours.pth",
            # A new file in a read-only directory: neither can create it.
            "mmengine-new": locked_dir / "mmengine-new.pth",
            "ours-new": locked_dir / "ours-new.pth",
        }
    )
    assert results["mmengine-ro"]["bases"][:2] == ["PermissionError", "OSError"]
    ours = results["ours-ro"]
    assert "SavePermissionError" in ours["bases"] and "PermissionError" in ours["bases"]
    assert "CkptmapError" in ours["bases"] and ours["errno"] == 13
    assert str(open_dir / "ours-ro.pth") in ours["message"] and "write-protected" in ours["message"]

    assert results["mmengine-dir"] == "saved"
    for label, name in (("ours-dir", "ours.pth"), ("ours-new", "ours-new.pth")):
        ours = results[label]
        assert "SavePermissionError" in ours["bases"] and "PermissionError" in ours["bases"]
        assert str(locked_dir / name) in ours["message"], ours
        assert TEMP_MARKER not in ours["message"] and "needs write access" in ours["message"]
    assert "PermissionError" in results["mmengine-new"]["bases"]

    after = {p: p.read_bytes() for d in unprivileged_dirs for p in d.iterdir()}
    changed = {p.name for p in after if after[p] != before.get(p)}
    assert changed == {"mmengine.pth"}, "only mmengine's in-place write changed a file"
    assert not any(is_temp_file(p) for p in after)
