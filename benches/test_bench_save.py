"""Saving a 2 GiB checkpoint until it is durable: ckptmap vs torch.save vs mmengine vs safetensors.

Run with ``python benches/report.py`` (or ``pytest benches/test_bench_save.py
--benchmark-enable``; skipped otherwise). The checkpoint is ``{"meta": {...}, "state_dict":
...}`` with 128 float32 tensors of 16 MiB, resident before the save starts.

ckptmap's `save_checkpoint` returns once the file and its directory are fsynced (it writes a
temporary file and renames it over the target); the other rows fsync what they wrote, and its
directory, inside the timed call, so every row measures "until durable". Before each round the
previous round's files are deleted (not timed). Imports and lazy initialisation are paid by a
tiny untimed save of each kind before the rounds; every row has the same rounds.

Peak memory comes from one more save in a fresh process (`harness.peak_memory`): mmengine
builds the whole file in memory before writing it.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from harness import Rounds, Side, child_memory, peak_memory, require_enabled, sized, timed

import ckptmap

N_TENSORS = sized(128, 8)
TENSOR_NUMEL = 4 * 2**20  # 16 MiB of float32
ROUNDS = Rounds(3, 0)
GROUP = (
    f"save a {N_TENSORS * TENSOR_NUMEL * 4 / 2**30:g} GiB checkpoint "
    f"({N_TENSORS} float32 tensors) until durable"
)


def make_checkpoint(n: int = N_TENSORS, numel: int = TENSOR_NUMEL) -> dict[str, Any]:
    # ones() touches every page, so the state dict is resident before the save starts.
    state = {f"layer{i}.weight": torch.ones(numel) for i in range(n)}
    return {"meta": {"epoch": 1}, "state_dict": state}


def fsync_dir_and_files(directory: Path) -> None:
    """What a durable save needs beyond writing: every file and the directory on disk."""
    for path in directory.iterdir():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _torch_save(checkpoint: dict, directory: Path) -> None:
    torch.save(checkpoint, directory / "w.pth")
    fsync_dir_and_files(directory)


def _mmengine_save(checkpoint: dict, directory: Path) -> None:
    from mmengine.runner.checkpoint import save_checkpoint

    save_checkpoint(checkpoint, str(directory / "w.pth"))
    fsync_dir_and_files(directory)


def _safetensors_save(checkpoint: dict, directory: Path) -> None:
    from safetensors.torch import save_file

    meta = {"meta": json.dumps(checkpoint["meta"])}
    save_file(checkpoint["state_dict"], str(directory / "w.safetensors"), metadata=meta)
    fsync_dir_and_files(directory)


@dataclass(frozen=True)
class Saver:
    side: Side
    run: Callable[[dict, Path], Any]


FSYNC = "then `os.fsync` of the files and the directory"
SAVERS: dict[str, Saver] = {
    "ckptmap-pth": Saver(
        Side("ckptmap", "`save_checkpoint(ckpt, 'w.pth')`", ".pth"),
        lambda c, d: ckptmap.save_checkpoint(c, d / "w.pth"),
    ),
    "torch": Saver(Side("torch", f"`torch.save(ckpt, 'w.pth')`, {FSYNC}", ".pth"), _torch_save),
    "mmengine": Saver(
        Side("mmengine", f"`save_checkpoint(ckpt, 'w.pth')`, {FSYNC}", ".pth"), _mmengine_save
    ),
    "ckptmap-safetensors": Saver(
        Side("ckptmap", "`save_checkpoint(ckpt, 'w.safetensors')`", ".safetensors"),
        lambda c, d: ckptmap.save_checkpoint(c, d / "w.safetensors"),
    ),
    "safetensors": Saver(
        Side("safetensors", f"`save_file(sd, 'w.safetensors', metadata)`, {FSYNC}", ".safetensors"),
        _safetensors_save,
    ),
    "ckptmap-sharded": Saver(
        Side(
            "ckptmap",
            "`save_checkpoint(ckpt, 'w.safetensors', max_shard_size='512MiB')`",
            "sharded .safetensors",
        ),
        lambda c, d: ckptmap.save_checkpoint(c, d / "w.safetensors", max_shard_size="512MiB"),
    ),
}


def empty(directory: Path) -> None:
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir()


@pytest.fixture(scope="module")
def checkpoint(request: pytest.FixtureRequest) -> dict[str, Any]:
    require_enabled(request)
    return make_checkpoint()


@pytest.mark.benchmark(group=GROUP)
@pytest.mark.parametrize("saver_id", list(SAVERS))
def test_save(benchmark, checkpoint, saver_id, tmp_path):
    saver = SAVERS[saver_id]
    if saver.side.impl == "mmengine":
        pytest.importorskip("mmengine.runner.checkpoint")
    directory = tmp_path / "out"
    empty(directory)
    saver.run(make_checkpoint(2, 16), directory)  # imports and lazy initialisation
    memory = child_memory(__file__, saver_id, str(tmp_path / "child"))
    timed(
        benchmark,
        saver.side,
        lambda: saver.run(checkpoint, directory),
        ROUNDS,
        kind="save",
        setup=lambda: empty(directory),
        **memory,
    )
    # safetensors' own writer orders tensors by dtype and name; every other side keeps order.
    check(directory, checkpoint, ordered=saver_id != "safetensors")
    shutil.rmtree(directory)


def check(directory: Path, checkpoint: dict[str, Any], *, ordered: bool = True) -> None:
    """What the last round wrote loads back as the state dict that was saved (in its order,
    where the writer keeps it)."""
    files = sorted(directory.iterdir())
    index = [p for p in files if p.name.endswith(".index.json")]
    path = index[0] if index else files[0]
    assert index or len(files) == 1, files
    sd = ckptmap.find_state_dict(ckptmap.load_file(path), str(path))
    expected = checkpoint["state_dict"]
    assert list(sd) == list(expected) if ordered else sorted(sd) == sorted(expected)
    assert all(torch.equal(sd[k], v) for k, v in expected.items())


def _child(saver_id: str, directory: str) -> dict[str, float]:
    target = Path(directory)
    empty(target)
    saver = SAVERS[saver_id]
    saver.run(make_checkpoint(2, 16), target)  # imports and lazy initialisation
    empty(target)
    try:
        return peak_memory(make_checkpoint, lambda ckpt: saver.run(ckpt, target))
    finally:
        shutil.rmtree(target, ignore_errors=True)


if __name__ == "__main__":
    if sys.argv[1:2] != ["--memory"]:
        raise SystemExit("usage: test_bench_save.py --memory SAVER DIRECTORY")
    print(json.dumps(_child(*sys.argv[2:4])))
