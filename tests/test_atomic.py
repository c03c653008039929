"""atomic_write: the target is replaced whole or not at all."""

import os
import time

import pytest

from ckptmap.atomic import atomic_write, is_temp_file, remove_stale_temps, temp_path_for


def test_replaces_target_and_leaves_no_temp(tmp_path):
    target = tmp_path / "ckpt.pth"
    target.write_bytes(b"old")
    with atomic_write(target) as f:
        f.write(b"new")
    assert target.read_bytes() == b"new"
    assert os.listdir(tmp_path) == ["ckpt.pth"]


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()])
def test_failure_keeps_old_file_and_removes_temp(tmp_path, exc):
    target = tmp_path / "ckpt.pth"
    target.write_bytes(b"old")
    with pytest.raises(type(exc)), atomic_write(target) as f:
        f.write(b"half")
        raise exc
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["ckpt.pth"]


def test_missing_directory_is_an_oserror_naming_the_path(tmp_path):
    with pytest.raises(FileNotFoundError) as info, atomic_write(tmp_path / "nope" / "x.pth"):
        pass
    assert "nope" in str(info.value)


def test_temp_names_are_recognisable_and_unique(tmp_path):
    a, b = temp_path_for(tmp_path / "x.pth"), temp_path_for(tmp_path / "x.pth")
    assert a != b and a.parent == tmp_path
    assert a.name.startswith(".") and is_temp_file(a) and not is_temp_file(tmp_path / "x.pth")


def test_remove_stale_temps_keeps_fresh_ones(tmp_path):
    stale, fresh = temp_path_for(tmp_path / "a"), temp_path_for(tmp_path / "b")
    stale.write_bytes(b"")
    fresh.write_bytes(b"")
    (tmp_path / "keep.pth").write_bytes(b"")
    old = time.time() - 7200
    os.utime(stale, (old, old))
    assert remove_stale_temps(tmp_path) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([fresh.name, "keep.pth"])
