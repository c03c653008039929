"""Real faults during a save: a full disk, SIGKILL, exceptions, KeyboardInterrupt, a live mmap.

In every case the previous checkpoint is byte-identical afterwards and whatever the failed save
left behind is never taken for a checkpoint. The disk fills for real (RLIMIT_FSIZE in a child
process) and the kill is a real SIGKILL, sequenced through pipes: the child reports from inside
serialisation that it has started, then blocks on a pipe the parent never writes to.
"""

from __future__ import annotations

import errno
import json
import os
import select
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import ckptmap
from ckptmap.atomic import TEMP_MARKER, is_temp_file, remove_stale_temps
from ckptmap.errors import CheckpointPointerWarning
from ckptmap.formats import load_file
from ckptmap.latest import (
    LAST_CHECKPOINT,
    find_latest_checkpoint,
    is_complete_checkpoint,
    list_checkpoints,
    remove_orphan_shards,
    write_last_checkpoint,
)
from ckptmap.save import is_shard_file, save_checkpoint

CHILD_ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join(
        [str(Path(ckptmap.__file__).parents[1]), os.environ.get("PYTHONPATH", "")]
    ),
}


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def good_checkpoints(directory: Path) -> dict[str, bytes]:
    """A plain, a safetensors and a sharded checkpoint, and the pointer naming the plain one."""
    save_checkpoint(
        {"meta": {"epoch": 1}, "state_dict": {"w": torch.arange(256.0)}}, directory / "epoch_1.pth"
    )
    save_checkpoint({"w": torch.arange(64.0)}, directory / "epoch_1.safetensors")
    save_checkpoint(
        {f"w{i}": torch.full((64,), float(i)) for i in range(3)},
        directory / "epoch_1s.pth",
        max_shard_size=256,
    )
    write_last_checkpoint(directory, directory / "epoch_1.pth")
    return snapshot(directory)


def assert_nothing_mistaken(directory: Path, good: dict[str, bytes]) -> None:
    """The pointer still wins; without it, the fallback ignores temps and stray shards."""
    assert find_latest_checkpoint(directory) == str(directory / "epoch_1.pth")
    found = {Path(p).name for p in list_checkpoints(directory)}
    assert found == {n for n in good if n != LAST_CHECKPOINT and not is_shard_file(n)}
    for path in directory.iterdir():
        if is_temp_file(path):
            assert not is_complete_checkpoint(path)
    pointer = (directory / LAST_CHECKPOINT).read_bytes()
    (directory / LAST_CHECKPOINT).write_text(str(directory / "epoch_2.pth"))
    with pytest.warns(CheckpointPointerWarning, match="is missing"):
        latest = find_latest_checkpoint(directory)
    assert latest is not None and Path(latest).name in found
    (directory / LAST_CHECKPOINT).write_bytes(pointer)


def run_child(code: str, *args: str, pass_fds: tuple[int, ...] = ()) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        env=CHILD_ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        pass_fds=pass_fds,
    )


# --- disk full ---------------------------------------------------------------------------------

DISK_FULL_CHILD = """
    import json, os, resource, signal, sys
    import torch
    from ckptmap.errors import CkptmapError
    from ckptmap.save import save_checkpoint

    directory, limit = sys.argv[1], int(sys.argv[2])
    big = {"w": torch.ones(2**20)}  # 4 MiB, over the file size limit
    # Small shards fit and are written; the big one then fails.
    sharded = {"a": torch.ones(2**14), "b": torch.ones(2**14), "c": torch.ones(2**20)}
    # Without this the kernel kills the process with SIGXFSZ; ignored, write() fails (EFBIG).
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    results = {}
    for name, state, shard in [
        ("epoch_1.pth", big, None),
        ("epoch_1.safetensors", big, None),
        ("epoch_1s.pth", sharded, 2**16 + 1),
        ("epoch_1.safetensors.index.json", sharded, 2**16 + 1),
    ]:
        try:
            save_checkpoint(state, os.path.join(directory, name), max_shard_size=shard)
            results[name] = "saved"
        except OSError as err:
            assert isinstance(err, CkptmapError), repr(err)
            results[name] = [type(err).__name__, err.errno, str(err)]
    print(json.dumps(results))
"""


def test_disk_full_mid_save_keeps_every_old_checkpoint(tmp_path):
    before = good_checkpoints(tmp_path)
    child = run_child(DISK_FULL_CHILD, str(tmp_path), str(2**20))
    out, err = child.communicate(timeout=120)
    assert child.returncode == 0, err.decode()
    results = json.loads(out)
    for name, result in results.items():
        assert result != "saved", name
        kind, code, message = result
        assert kind == "CheckpointSaveError" and code == errno.EFBIG, (name, result)
        assert str(tmp_path) in message and "File too large" in message, message
        assert TEMP_MARKER not in message, "the error names the target, not the temp file"
    assert snapshot(tmp_path) == before, "old files byte-identical, no temp and no shard left"
    assert_nothing_mistaken(tmp_path, before)


# --- SIGKILL -------------------------------------------------------------------------------------

KILL_CHILD = """
    import os, sys
    import torch
    from ckptmap.save import save_checkpoint

    ready, blocker = int(sys.argv[1]), int(sys.argv[2])
    directory, mode = sys.argv[3], sys.argv[4]

    def started_and_wait():
        os.write(ready, b"1")  # serialisation is under way
        os.read(blocker, 1)  # the parent never writes: SIGKILL arrives while we wait here
        raise SystemExit("not killed")

    class StallPickling:
        def __reduce__(self):
            started_and_wait()

    class StallOnData(torch.Tensor):
        # The safetensors writer reaches `detach` once the header and earlier tensors are out.
        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            if func is torch.Tensor.detach:
                started_and_wait()
            return super().__torch_function__(func, types, args, kwargs or {})

    big = torch.arange(2.0**18)  # 1 MiB
    if mode == "pth":
        save_checkpoint({"state_dict": {"w": big}, "meta": {"x": StallPickling()}},
                        os.path.join(directory, "epoch_1.pth"))
    elif mode == "safetensors":
        save_checkpoint({"w": big, "z": torch.ones(4).as_subclass(StallOnData)},
                        os.path.join(directory, "epoch_1.safetensors"))
    else:
        save_checkpoint({"a": big, "b": big + 1, "b._extra_state": StallPickling()},
                        os.path.join(directory, "epoch_1s.pth"), max_shard_size=2**20)
"""


@pytest.mark.parametrize("mode", ["pth", "safetensors", "sharded"])
def test_sigkill_mid_save_keeps_the_old_checkpoint(tmp_path, mode):
    before = good_checkpoints(tmp_path)
    ready_r, ready_w = os.pipe()
    block_r, block_w = os.pipe()
    try:
        child = run_child(
            KILL_CHILD, str(ready_w), str(block_r), str(tmp_path), mode, pass_fds=(ready_w, block_r)
        )
        os.close(ready_w)
        os.close(block_r)
        # A guard against a child that dies early, not a synchronisation delay.
        readable, _, _ = select.select([ready_r], [], [], 120)
        assert readable and os.read(ready_r, 1) == b"1", child.communicate()[1].decode()
        child.kill()
        child.communicate(timeout=60)  # reaps it and closes its pipes
        assert child.returncode == -9
    finally:
        os.close(ready_r)
        os.close(block_w)

    leftovers = {name: data for name, data in snapshot(tmp_path).items() if name not in before}
    temps = [n for n in leftovers if is_temp_file(n)]
    assert len(temps) == 1, leftovers.keys()  # killed mid-write: the temp is still there
    if mode == "safetensors":
        assert len(leftovers[temps[0]]) > 2**20, "the header and the first tensor were written"
    if mode == "sharded":
        orphans = [n for n in leftovers if is_shard_file(n)]
        assert len(orphans) == 1 and orphans[0].startswith("epoch_1s-")
    assert {n: snapshot(tmp_path)[n] for n in before} == before
    assert_nothing_mistaken(tmp_path, before)
    assert load_file(tmp_path / "epoch_1.pth")["meta"] == {"epoch": 1}
    # The directory's one index is found; the orphan shard and the temp are not read.
    sharded = load_file(tmp_path)
    assert {k: v[0].item() for k, v in sharded.items()} == {"w0": 0, "w1": 1, "w2": 2}

    # Later clean-ups remove what the killed save left.
    assert remove_stale_temps(tmp_path, older_than_s=0) == 1
    assert len(remove_orphan_shards(tmp_path, older_than_s=0)) == (mode == "sharded")
    assert snapshot(tmp_path) == before


# --- exceptions and KeyboardInterrupt during serialisation ---------------------------------------


class RaisesOnPickle:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    def __reduce__(self):
        raise self.exc


def raises_on_data(exc: BaseException) -> torch.Tensor:
    """A tensor whose data can't be read: `detach` is the safetensors writer's first step on it,
    after the header and the tensors before it are written."""

    class RaisesOnData(torch.Tensor):
        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            if func is torch.Tensor.detach:
                raise exc
            return super().__torch_function__(func, types, args, kwargs or {})

    return torch.ones(4).as_subclass(RaisesOnData)


def failing_saves(exc: BaseException):
    big = torch.arange(2.0**16)
    yield "epoch_1.pth", {"state_dict": {"w": big}, "meta": RaisesOnPickle(exc)}, None
    yield "epoch_1.safetensors", {"w": big, "z": raises_on_data(exc)}, None
    yield "epoch_1s.pth", {"a": big, "b": big, "c._extra_state": RaisesOnPickle(exc)}, 2**18
    yield "epoch_1s.safetensors", {"a": big, "b": big, "z": raises_on_data(exc)}, 2**18


@pytest.mark.parametrize(
    "exc", [RuntimeError("boom"), KeyboardInterrupt()], ids=["error", "ctrl-c"]
)
def test_exception_mid_serialisation_keeps_the_old_checkpoint(tmp_path, exc):
    good_checkpoints(tmp_path)
    save_checkpoint(
        {f"w{i}": torch.ones(64) for i in range(3)},
        tmp_path / "epoch_1s.safetensors",
        max_shard_size=256,
    )
    before = snapshot(tmp_path)
    for name, checkpoint, shard in failing_saves(exc):
        with pytest.raises(type(exc)):
            save_checkpoint(checkpoint, tmp_path / name, max_shard_size=shard)
        assert snapshot(tmp_path) == before, name
    assert_nothing_mistaken(tmp_path, before)


# --- saving over a file that is mapped ---------------------------------------------------------


def test_saving_over_a_live_mmap_keeps_the_mapped_tensors_valid(tmp_path):
    old = torch.arange(2.0**16)
    new = -torch.arange(2.0**16)
    pth, st = tmp_path / "epoch_1.pth", tmp_path / "epoch_1.safetensors"
    save_checkpoint({"state_dict": {"w": old}}, pth)
    save_checkpoint({"w": old}, st)
    old_pth_bytes = pth.read_bytes()
    mapped = torch.load(pth, mmap=True, weights_only=True)["state_dict"]["w"]
    with safe_open(st, framework="pt") as handle:
        save_checkpoint({"state_dict": {"w": new}}, pth)
        save_checkpoint({"w": new}, st)
        from_st = handle.get_tensor("w")  # read through the map after the replace
        assert torch.equal(from_st, old)
    assert torch.equal(mapped, old)
    # The map still shows the old file's bytes (the old inode lives on until unmapped).
    raw = bytes(mapped.numpy().view("uint8"))
    assert raw in old_pth_bytes and raw not in pth.read_bytes()
    assert torch.equal(torch.load(pth, weights_only=True)["state_dict"]["w"], new)
    assert sorted(os.listdir(tmp_path)) == ["epoch_1.pth", "epoch_1.safetensors"]
