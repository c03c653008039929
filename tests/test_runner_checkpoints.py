"""Checkpoints written by a real mmengine Runner load safely, by default, everywhere.

A tiny model is trained for two epochs by mmengine's own Runner (CPU, CheckpointHook), once per
session. Its `epoch_2.pth` then goes through every ckptmap entry point with no opt-in, and
through the patched Runner (`load_from=`, `resume=True`), compared with stock mmengine loading
the same file unrestricted.
"""

from __future__ import annotations

import copy
import io
import itertools
import json
import logging
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
from mmengine.hooks import Hook
from mmengine.logging import HistoryBuffer
from mmengine.model import BaseModel, BaseTTAModel
from mmengine.runner import Runner
from torch import nn

import ckptmap
from ckptmap.cli import main as cli_main
from ckptmap.formats import load_file
from ckptmap.formats.pickled import pickle_globals
from ckptmap.formats.pth import read_pth
from ckptmap.integrations import mmengine as dropin
from ckptmap.opened import walk_tensors

pytestmark = pytest.mark.filterwarnings(
    "ignore::DeprecationWarning",
    "ignore::FutureWarning",
    "ignore::UserWarning:mmengine",
    "ignore::UserWarning:torch",
)

#: Every global the pickle of a Runner checkpoint references (mmengine 0.10, numpy 2, torch 2).
RUNNER_GLOBALS = {
    "_codecs.encode",
    "builtins.getattr",
    "collections.Counter",
    "collections.OrderedDict",
    "mmengine.logging.history_buffer.HistoryBuffer",
    "numpy._core.multiarray._reconstruct",
    "numpy._core.multiarray.scalar",
    "numpy.dtype",
    "numpy.ndarray",
    "torch.FloatStorage",
    "torch.LongStorage",
    "torch._utils._rebuild_tensor_v2",
}


class ToyModel(BaseModel):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 4)
        self.bn = nn.BatchNorm1d(4)
        self.head = nn.Linear(4, 1)

    def forward(self, inputs: torch.Tensor, labels: torch.Tensor, mode: str = "tensor") -> Any:
        out = self.head(self.bn(self.linear(inputs)))
        if mode == "loss":
            return {"loss": ((out - labels) ** 2).mean()}
        return out


class ToyDataset(torch.utils.data.Dataset):
    METAINFO: ClassVar[dict[str, Any]] = {
        "classes": ("cat", "dog"),
        "palette": np.array([[255, 0, 0], [0, 255, 0]]),
    }

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(16, 3, generator=g)
        self.y = torch.randn(16, 1, generator=g)

    @property
    def metainfo(self) -> dict[str, Any]:
        return self.METAINFO

    def __len__(self) -> int:
        return 16

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"inputs": self.x[i], "labels": self.y[i]}


class Snapshot(Hook):
    """Records the Runner's state right after it loaded or resumed (before training)."""

    def __init__(self) -> None:
        self.seen: dict[str, Any] = {}

    def before_train(self, runner: Runner) -> None:
        self.seen = {
            "epoch": runner.epoch,
            "iter": runner.iter,
            "optimizer": copy.deepcopy(runner.optim_wrapper.state_dict()),
            "schedulers": [s.state_dict() for s in runner.param_schedulers],
            "scalars": {
                k: (v.data[0].copy(), v.data[1].copy())
                for k, v in runner.message_hub.log_scalars.items()
            },
            "weights": copy.deepcopy(runner.model.state_dict()),
        }


_names = itertools.count()


def make_runner(work_dir: Path, max_epochs: int, **kwargs: Any) -> Runner:
    torch.manual_seed(0)
    return Runner(
        model=kwargs.pop("model", None) or ToyModel(),
        work_dir=str(work_dir),
        experiment_name=f"ckptmap_runner_{next(_names)}",
        train_dataloader={
            "dataset": ToyDataset(),
            "sampler": {"type": "DefaultSampler", "shuffle": True},
            "batch_size": 4,
            "num_workers": 0,
            "collate_fn": {"type": "default_collate"},
        },
        optim_wrapper={"optimizer": {"type": "SGD", "lr": 0.01, "momentum": 0.9}},
        param_scheduler={"type": "MultiStepLR", "milestones": [1]},
        train_cfg={"by_epoch": True, "max_epochs": max_epochs},
        default_hooks={"checkpoint": {"type": "CheckpointHook", "interval": 1}},
        randomness={"seed": 0},
        default_scope=None,
        log_level="WARNING",
        **kwargs,
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A real Runner's work dir after two epochs, and its final weights."""
    work_dir = tmp_path_factory.mktemp("runner")
    runner = make_runner(work_dir, max_epochs=2)
    runner.train()
    assert (work_dir / "epoch_2.pth").is_file()
    return work_dir / "epoch_2.pth", copy.deepcopy(runner.model.state_dict())


def unrestricted(path: Path) -> Any:
    """The reference: the file unpickled without restrictions (we wrote it ourselves)."""
    return torch.load(path, map_location="cpu", weights_only=False)


def assert_same(ours: Any, ref: Any, where: str = "checkpoint") -> None:
    """Deep equality, with types: tensors by value, numpy by dtype and value, buffers by data."""
    assert type(ours) is type(ref), f"{where}: {type(ours)} != {type(ref)}"
    if isinstance(ref, torch.Tensor):
        assert ours.dtype == ref.dtype and torch.equal(ours, ref), where
    elif isinstance(ref, np.ndarray):
        assert ours.dtype == ref.dtype and np.array_equal(ours, ref), where
    elif isinstance(ref, HistoryBuffer):
        assert ours.max_length == ref.max_length, where
        for a, b in zip(ours.data, ref.data, strict=True):
            assert_same(a, b, f"{where}.data")
    elif isinstance(ref, dict):
        assert list(ours) == list(ref), where
        for key in ref:
            assert_same(ours[key], ref[key], f"{where}[{key!r}]")
    elif isinstance(ref, (list, tuple)):
        assert len(ours) == len(ref), where
        for i, (a, b) in enumerate(zip(ours, ref, strict=True)):
            assert_same(a, b, f"{where}[{i}]")
    else:
        assert ours == ref, where


# -- what the file holds -------------------------------------------------------------------------


def test_runner_checkpoint_references_exactly_these_globals(trained) -> None:
    path, _ = trained
    with zipfile.ZipFile(path) as archive:
        data = archive.read(next(n for n in archive.namelist() if n.endswith("/data.pkl")))
    assert pickle_globals(io.BytesIO(data)) == RUNNER_GLOBALS
    checkpoint = unrestricted(path)
    assert set(checkpoint) == {"meta", "state_dict", "message_hub", "optimizer", "param_schedulers"}
    # What makes it more than weights: numpy in the message hub and meta, HistoryBuffers.
    assert isinstance(checkpoint["message_hub"]["runtime_info"]["eta"], np.floating)
    assert isinstance(checkpoint["meta"]["dataset_meta"]["palette"], np.ndarray)
    assert all(
        isinstance(v, HistoryBuffer) for v in checkpoint["message_hub"]["log_scalars"].values()
    )


def test_it_loads_through_ckptmaps_reader_by_default(trained, caplog) -> None:
    # Everything a Runner writes is in the default allowlist, so the Rust reader builds it
    # (calling the allowlist's checked stand-ins), and torch's unpickler is never needed.
    path, _ = trained
    opened = read_pth(path)
    assert opened.fallback_reason is None
    assert len(opened.table) == len(unrestricted(path)["state_dict"]) + sum(
        1 for _ in walk_tensors(unrestricted(path)["optimizer"])
    )
    with caplog.at_level(logging.INFO, logger="ckptmap"):
        loaded = load_file(path)
    assert "instead of ckptmap's reader" not in caplog.text
    assert opened.fallback_reason is None
    assert_same(loaded, unrestricted(path))


# -- every entry point, no opt-in ------------------------------------------------------------------


def test_default_load_checkpoint_loads_the_weights(trained) -> None:
    path, weights = trained
    model = ToyModel()
    checkpoint = ckptmap.load_checkpoint(model, str(path), map_location="cpu", strict=True)
    for key, value in weights.items():
        assert torch.equal(model.state_dict()[key], value), key
    assert_same(checkpoint, unrestricted(path))


@pytest.mark.parametrize(
    "load",
    [
        lambda p: ckptmap._load_checkpoint(p),
        lambda p: ckptmap.CheckpointLoader.load_checkpoint(p, "cpu"),
        lambda p: ckptmap.load_from_local(p),
        lambda p: load_file(p),
        lambda p: load_file(p, mmap=False),
    ],
    ids=["_load_checkpoint", "CheckpointLoader", "load_from_local", "load_file", "no_mmap"],
)
def test_every_entry_point_gives_what_torch_load_gives(trained, load) -> None:
    path, _ = trained
    assert_same(load(str(path)), unrestricted(path))


def test_prefix_and_vis4d_entry_points(trained) -> None:
    path, weights = trained
    linear = ckptmap._load_checkpoint_with_prefix("linear", str(path))
    assert set(linear) == {"weight", "bias"} and torch.equal(linear["bias"], weights["linear.bias"])
    model = ToyModel()
    ckptmap.load_model_checkpoint(model, str(path), strict=True)
    assert torch.equal(model.head.weight, weights["head.weight"])


def test_command_line_reads_it(trained, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path, _ = trained
    assert cli_main(["inspect", str(path), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["tensor_count"] > 7
    assert cli_main(["diff", str(path), "--against", str(path)]) == 0
    copied = tmp_path / "copy.pth"
    assert cli_main(["convert", str(path), str(copied)]) == 0
    assert_same(ckptmap._load_checkpoint(str(copied)), unrestricted(path))
    weights = tmp_path / "epoch_2.safetensors"
    drops = ["--drop", "meta", "--drop", "message_hub", "--drop", "optimizer"]
    assert cli_main(["convert", str(path), str(weights), *drops, "--drop", "param_schedulers"]) == 0
    ckptmap.load_checkpoint(ToyModel(), str(weights), strict=True)


def test_buffers_without_mmengine_imported_are_stand_ins(trained) -> None:
    # A fresh interpreter: ckptmap alone never imports mmengine, and the buffers it loads
    # then hold the same data and statistics.
    path, _ = trained
    script = f"""
import sys, ckptmap
from ckptmap.formats.allowlist import HistoryBufferState
ckpt = ckptmap._load_checkpoint({str(path)!r})
assert "mmengine" not in sys.modules, sorted(m for m in sys.modules if "mmengine" in m)
buffers = ckpt["message_hub"]["log_scalars"]
assert all(type(b) is HistoryBufferState for b in buffers.values())
print({{k: float(b.mean()) for k, b in buffers.items()}})
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    means = eval(run.stdout)  # a dict of floats printed by the child
    ref = unrestricted(path)["message_hub"]["log_scalars"]
    assert means == {k: float(b.mean()) for k, b in ref.items()}


def test_stand_in_buffers_pickle_back_as_mmengine_buffers(trained, monkeypatch) -> None:
    from ckptmap.formats import safe_mmengine

    path, _ = trained
    monkeypatch.setattr(safe_mmengine, "_real_class", lambda: None)
    loaded = ckptmap._load_checkpoint(str(path))
    buffer = loaded["message_hub"]["log_scalars"]["train/loss"]
    assert type(buffer) is safe_mmengine.HistoryBufferState
    again = copy.deepcopy(buffer)
    assert type(again) is HistoryBuffer
    assert np.array_equal(again.data[0], buffer.data[0]) and again.mean() == buffer.mean()


# -- the patched Runner --------------------------------------------------------------------------


def resumed(work_dir: Path, checkpoint: Path, *, patched: bool, monkeypatch) -> Snapshot:
    """A new Runner resuming from `checkpoint` for a third epoch; what it saw after resuming."""
    snapshot = Snapshot()
    runner = make_runner(
        work_dir, max_epochs=3, load_from=str(checkpoint), resume=True, custom_hooks=[snapshot]
    )
    if patched:
        with dropin.patched():
            runner.train()
    else:
        # Stock mmengine calls torch.load without weights_only, which torch >= 2.6 reads as
        # True; this is how stock mmengine loads its own files unrestricted.
        with monkeypatch.context() as m:
            m.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
            runner.train()
    snapshot.seen["final"] = copy.deepcopy(runner.model.state_dict())
    return snapshot


def test_patched_runner_resumes_like_stock_mmengine(trained, tmp_path: Path, monkeypatch) -> None:
    path, weights = trained
    ours = resumed(tmp_path / "ours", path, patched=True, monkeypatch=monkeypatch).seen
    theirs = resumed(tmp_path / "theirs", path, patched=False, monkeypatch=monkeypatch).seen
    assert ours["epoch"] == theirs["epoch"] == 2
    assert ours["iter"] == theirs["iter"] == 8
    for key, value in weights.items():
        assert torch.equal(ours["weights"][key], value), key
    assert_same(ours["optimizer"], theirs["optimizer"], "optimizer")
    assert ours["optimizer"]["state"], "the momentum buffers were resumed"
    assert_same(ours["schedulers"], theirs["schedulers"], "param_schedulers")
    assert ours["scalars"].keys() == theirs["scalars"].keys()
    for key, (logs, counts) in theirs["scalars"].items():
        assert np.array_equal(ours["scalars"][key][0], logs), key
        assert np.array_equal(ours["scalars"][key][1], counts), key
    # The third epoch, trained on from the same state, ends in the same weights.
    assert_same(ours["final"], theirs["final"], "weights after epoch 3")


def test_patched_runner_load_from_loads_the_weights(trained, tmp_path: Path) -> None:
    path, weights = trained
    runner = make_runner(tmp_path, max_epochs=1, load_from=str(path))
    with dropin.patched():
        runner.load_or_resume()
    for key, value in weights.items():
        assert torch.equal(runner.model.state_dict()[key], value), key
    assert runner.epoch == 0  # load_from without resume starts afresh


class ToyTTA(BaseTTAModel):
    def merge_preds(self, data_samples_list: Any) -> Any:
        return data_samples_list


def test_patched_runner_loads_every_key_into_a_tta_model(trained, tmp_path: Path) -> None:
    # What tools/test.py --tta does: the Runner's model is a BaseTTAModel around the detector.
    path, weights = trained
    runner = make_runner(tmp_path, max_epochs=1, model=ToyTTA(module=ToyModel()))
    with dropin.patched():
        runner.load_checkpoint(str(path), strict=True)
    inner = runner.model.module
    for key, value in weights.items():
        assert torch.equal(inner.state_dict()[key], value), key


def test_runner_checkpoint_with_a_project_class_needs_patch_allowed_globals(
    trained, tmp_path: Path
) -> None:
    import argparse

    path, _ = trained
    checkpoint = unrestricted(path)
    checkpoint["meta"]["args"] = argparse.Namespace(lr=0.1)
    custom = tmp_path / "custom.pth"
    torch.save(checkpoint, custom)
    model = ToyModel()
    with dropin.patched():
        from mmengine.runner import load_checkpoint

        with pytest.raises(ckptmap.UnsafeCheckpointError) as info:
            load_checkpoint(model, str(custom))
        message = str(info.value)
        assert "patch(allowed_globals=[argparse.Namespace])" in message
        assert "--allow" not in message
        dropin.patch(allowed_globals=[argparse.Namespace])
        assert load_checkpoint(model, str(custom))["meta"]["args"].lr == 0.1
    assert not dropin.is_patched()
    dropin.patch()  # a fresh patch forgets what an earlier one allowed
    try:
        with pytest.raises(ckptmap.UnsafeCheckpointError):
            load_checkpoint(model, str(custom))
    finally:
        dropin.unpatch()
