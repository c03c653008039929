"""find_latest_checkpoint, the last_checkpoint pointer and rotation."""

from __future__ import annotations

import json
import os
import pickle
import time
from pathlib import Path

import pytest
import torch

from ckptmap.atomic import temp_path_for
from ckptmap.errors import CheckpointPointerWarning, IncompleteCheckpointError
from ckptmap.latest import (
    LAST_CHECKPOINT,
    find_latest_checkpoint,
    is_complete_checkpoint,
    list_checkpoints,
    remove_orphan_shards,
    rotate_checkpoints,
    write_last_checkpoint,
)
from ckptmap.save import save_checkpoint


def ckpt(directory: Path, name: str, value: float = 0.0, mtime: float | None = None) -> Path:
    path = directory / name
    save_checkpoint({"state_dict": {"w": torch.full((64,), value)}}, path)
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


def truncated_copy(source: Path, target: Path, keep: int) -> Path:
    target.write_bytes(source.read_bytes()[:keep])
    return target


# --- completeness ------------------------------------------------------------------------------


def test_complete_torch_zip_and_every_truncation_of_it(tmp_path):
    good = ckpt(tmp_path, "good.pth")
    assert is_complete_checkpoint(good)
    size = good.stat().st_size
    for keep in (0, 1, 8, 100, size // 2, size - 22, size - 1):
        cut = truncated_copy(good, tmp_path / f"cut_{keep}.pth", keep)
        assert not is_complete_checkpoint(cut), keep


def test_torch_zip_with_zeroed_pickle_is_not_complete(tmp_path):
    """What a crash can leave after a non-fsynced write: the right size, zeros inside."""
    import zipfile

    good = ckpt(tmp_path, "good.pth")
    data = bytearray(good.read_bytes())
    with zipfile.ZipFile(good) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith("/data.pkl"))
    name_len = int.from_bytes(data[info.header_offset + 26 : info.header_offset + 28], "little")
    extra_len = int.from_bytes(data[info.header_offset + 28 : info.header_offset + 30], "little")
    start = info.header_offset + 30 + name_len + extra_len
    data[start : start + info.compress_size] = bytes(info.compress_size)
    (tmp_path / "zeroed.pth").write_bytes(bytes(data))
    assert not is_complete_checkpoint(tmp_path / "zeroed.pth")


def test_complete_safetensors_and_damaged_ones(tmp_path):
    good = tmp_path / "good.safetensors"
    save_checkpoint({"meta": {"a": 1}, "state_dict": {"w": torch.ones(10)}}, good)
    assert is_complete_checkpoint(good)
    data = good.read_bytes()
    assert not is_complete_checkpoint(
        truncated_copy(good, tmp_path / "cut.safetensors", len(data) - 4)
    )
    (tmp_path / "long.safetensors").write_bytes(data + b"\0\0\0\0")
    assert not is_complete_checkpoint(tmp_path / "long.safetensors")
    (tmp_path / "huge.safetensors").write_bytes((2**62).to_bytes(8, "little") + b"{}")
    assert not is_complete_checkpoint(tmp_path / "huge.safetensors")


def test_complete_sharded_checkpoint_needs_every_shard(tmp_path):
    index = Path(
        save_checkpoint(
            {f"w{i}": torch.ones(64) for i in range(4)}, tmp_path / "s.pth", max_shard_size=256
        )
    )
    assert is_complete_checkpoint(index)
    shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    (tmp_path / shards[1]).unlink()
    assert not is_complete_checkpoint(index)
    escaping = tmp_path / "bad.pth.index.json"
    escaping.write_text(json.dumps({"weight_map": {"w": "../good.pth"}}))
    assert not is_complete_checkpoint(escaping)


def test_other_files_are_not_complete_checkpoints(tmp_path):
    legacy = tmp_path / "legacy.pth"
    torch.save({"w": torch.ones(2)}, legacy, _use_new_zipfile_serialization=False)
    assert is_complete_checkpoint(legacy), "legacy pickles are accepted when not empty"
    (tmp_path / "page.pth").write_text("<html>Not Found</html>")
    (tmp_path / "empty.pth").write_bytes(b"")
    (tmp_path / "dir.pth").mkdir()
    temp = temp_path_for(tmp_path / "epoch_9.pth")
    temp.write_bytes(ckpt(tmp_path, "x.pth").read_bytes())
    for name in ("page.pth", "empty.pth", "dir.pth", "missing.pth", temp.name):
        assert not is_complete_checkpoint(tmp_path / name), name
    (tmp_path / "pickle.pth").write_bytes(pickle.dumps({"a": 1}))
    assert is_complete_checkpoint(tmp_path / "pickle.pth")


# --- find_latest_checkpoint --------------------------------------------------------------------


def test_a_valid_pointer_is_returned(tmp_path):
    target = ckpt(tmp_path, "epoch_1.pth")
    ckpt(tmp_path, "epoch_2.pth")
    write_last_checkpoint(tmp_path, target)
    assert find_latest_checkpoint(tmp_path) == str(target)
    # mmengine writes the full path without a newline; a trailing newline is tolerated.
    (tmp_path / LAST_CHECKPOINT).write_text(str(target) + "\n")
    assert find_latest_checkpoint(str(tmp_path)) == str(target)


def test_no_pointer_means_nothing_to_resume(tmp_path):
    ckpt(tmp_path, "epoch_1.pth")
    assert find_latest_checkpoint(tmp_path) is None
    assert find_latest_checkpoint(tmp_path / "missing_dir") is None


def test_relative_pointer_is_resolved_in_the_work_dir(tmp_path):
    ckpt(tmp_path, "iter_100.pth")
    (tmp_path / LAST_CHECKPOINT).write_text("iter_100.pth")
    assert find_latest_checkpoint(tmp_path) == str(tmp_path / "iter_100.pth")


def test_remote_pointer_is_returned_unchecked(tmp_path):
    (tmp_path / LAST_CHECKPOINT).write_text("s3://bucket/work/epoch_3.pth")
    assert find_latest_checkpoint(tmp_path) == "s3://bucket/work/epoch_3.pth"


def populated(tmp_path: Path) -> Path:
    """epoch_2 < epoch_9 < epoch_10 (not by name), a newer-but-unnumbered file, and traps:
    a truncated epoch_12, a temp file and a shard with higher numbers."""
    now = time.time()
    ckpt(tmp_path, "epoch_10.pth", 10, mtime=now - 300)
    ckpt(tmp_path, "epoch_9.pth", 9, mtime=now - 200)  # newer mtime, lower number
    ckpt(tmp_path, "epoch_2.pth", 2, mtime=now - 400)
    ckpt(tmp_path, "best_acc_epoch_7.pth", 7, mtime=now)
    truncated_copy(tmp_path / "epoch_2.pth", tmp_path / "epoch_12.pth", 200)
    temp_path_for(tmp_path / "epoch_13.pth").write_bytes((tmp_path / "epoch_2.pth").read_bytes())
    (tmp_path / "epoch_14-deadbeef-00001-of-00001.pth").write_bytes(
        (tmp_path / "epoch_2.pth").read_bytes()
    )
    (tmp_path / "notes.txt").write_text("epoch_99")
    return tmp_path / "epoch_10.pth"


@pytest.mark.parametrize(
    ("pointer", "problem"),
    [
        ("{dir}/epoch_11.pth", "is missing"),
        ("{dir}/epoch_12.pth", "incomplete"),
        ("", "is empty"),
        ("{dir}/notes.txt", "incomplete or not a checkpoint"),
    ],
)
def test_bad_pointer_falls_back_to_the_newest_complete_checkpoint(tmp_path, pointer, problem):
    expected = populated(tmp_path)
    (tmp_path / LAST_CHECKPOINT).write_text(pointer.format(dir=tmp_path))
    with pytest.warns(CheckpointPointerWarning, match=problem) as record:
        assert find_latest_checkpoint(tmp_path) == str(expected)
    assert str(expected) in str(record[0].message)


def test_unreadable_pointer_falls_back(tmp_path):
    expected = populated(tmp_path)
    (tmp_path / LAST_CHECKPOINT).write_bytes(b"\xff\xfe\x00bad utf-8")
    with pytest.warns(CheckpointPointerWarning, match="can not be read"):
        assert find_latest_checkpoint(tmp_path) == str(expected)


def test_unnumbered_checkpoints_rank_by_mtime(tmp_path):
    now = time.time()
    ckpt(tmp_path, "b.pth", mtime=now - 10)
    ckpt(tmp_path, "a.safetensors", mtime=now)
    ckpt(tmp_path, "c.pth", mtime=now - 20)
    (tmp_path / LAST_CHECKPOINT).write_text("gone.pth")
    with pytest.warns(CheckpointPointerWarning):
        assert find_latest_checkpoint(tmp_path) == str(tmp_path / "a.safetensors")
    assert [Path(p).name for p in list_checkpoints(tmp_path)] == [
        "c.pth",
        "b.pth",
        "a.safetensors",
    ]


def test_sharded_checkpoints_are_found_through_their_index(tmp_path):
    ckpt(tmp_path, "iter_100.pth")
    index = save_checkpoint(
        {f"w{i}": torch.ones(64) for i in range(3)}, tmp_path / "iter_200.pth", max_shard_size=256
    )
    (tmp_path / LAST_CHECKPOINT).write_text(str(tmp_path / "iter_300.pth"))
    with pytest.warns(CheckpointPointerWarning):
        assert find_latest_checkpoint(tmp_path) == index


def test_nothing_complete_warns_and_returns_none(tmp_path):
    truncated_copy(ckpt(tmp_path, "x.pth"), tmp_path / "epoch_1.pth", 50)
    (tmp_path / "x.pth").unlink()
    (tmp_path / LAST_CHECKPOINT).write_text(str(tmp_path / "epoch_1.pth"))
    with pytest.warns(CheckpointPointerWarning, match="no other complete one"):
        assert find_latest_checkpoint(tmp_path) is None


# --- write_last_checkpoint -------------------------------------------------------------------


def test_write_last_checkpoint_is_atomic_and_refuses_bad_targets(tmp_path):
    good = ckpt(tmp_path, "epoch_1.pth")
    pointer = write_last_checkpoint(tmp_path / "work", good)
    assert Path(pointer).read_text() == str(good)
    assert os.listdir(tmp_path / "work") == [LAST_CHECKPOINT]
    truncated_copy(good, tmp_path / "epoch_2.pth", 100)
    with pytest.raises(IncompleteCheckpointError, match=r"epoch_2\.pth") as info:
        write_last_checkpoint(tmp_path / "work", tmp_path / "epoch_2.pth")
    assert isinstance(info.value, ValueError)
    with pytest.raises(FileNotFoundError, match=r"epoch_3\.pth"):
        write_last_checkpoint(tmp_path / "work", tmp_path / "epoch_3.pth")
    assert Path(pointer).read_text() == str(good)
    assert os.listdir(tmp_path / "work") == [LAST_CHECKPOINT]
    assert write_last_checkpoint(tmp_path, "s3://b/epoch_4.pth") == str(tmp_path / LAST_CHECKPOINT)


# --- rotation ---------------------------------------------------------------------------------


def test_rotation_keeps_the_newest_and_what_the_pointer_names(tmp_path):
    now = time.time()
    for n in range(1, 7):
        ckpt(tmp_path, f"epoch_{n}.pth", n, mtime=now - 100 + n)
    ckpt(tmp_path, "best_acc_epoch_1.pth")
    truncated_copy(tmp_path / "epoch_1.pth", tmp_path / "epoch_0.pth", 10)
    write_last_checkpoint(tmp_path, tmp_path / "epoch_2.pth")
    removed = rotate_checkpoints(tmp_path, keep_last=2)
    assert sorted(Path(p).name for p in removed) == ["epoch_1.pth", "epoch_3.pth", "epoch_4.pth"]
    assert sorted(os.listdir(tmp_path)) == [
        "best_acc_epoch_1.pth",
        "epoch_0.pth",  # incomplete files are not rotation's business
        "epoch_2.pth",
        "epoch_5.pth",
        "epoch_6.pth",
        LAST_CHECKPOINT,
    ]
    assert rotate_checkpoints(tmp_path, keep_last=2) == []


def test_rotation_removes_shards_with_their_index_and_honours_pattern(tmp_path):
    def sharded(name: str) -> str:
        return save_checkpoint(
            {f"w{i}": torch.ones(64) for i in range(2)}, tmp_path / name, max_shard_size=256
        )

    sharded("iter_1.safetensors")
    sharded("iter_2.safetensors")
    ckpt(tmp_path, "iter_3.pth")
    ckpt(tmp_path, "epoch_1.pth")
    removed = rotate_checkpoints(tmp_path, keep_last=1, pattern="iter_*")
    assert sorted(os.listdir(tmp_path)) == ["epoch_1.pth", "iter_3.pth"]
    assert len(removed) == 6


@pytest.mark.parametrize("keep", [0, -1, 1.5, True])
def test_rotation_rejects_bad_keep_last(tmp_path, keep):
    with pytest.raises(ValueError, match="keep_last"):
        rotate_checkpoints(tmp_path, keep_last=keep)


def test_remove_orphan_shards_keeps_indexed_and_fresh_ones(tmp_path):
    index = save_checkpoint(
        {f"w{i}": torch.ones(64) for i in range(2)}, tmp_path / "a.pth", max_shard_size=256
    )
    orphan = tmp_path / "a-0badf00d-00001-of-00002.pth"
    orphan.write_bytes(b"partial")
    fresh = tmp_path / "a-0badf00e-00001-of-00002.pth"
    fresh.write_bytes(b"partial")
    old = time.time() - 7200
    os.utime(orphan, (old, old))
    for shard in json.loads(Path(index).read_text())["weight_map"].values():
        os.utime(tmp_path / shard, (old, old))
    assert remove_orphan_shards(tmp_path) == [str(orphan)]
    assert is_complete_checkpoint(index) and fresh.exists()
