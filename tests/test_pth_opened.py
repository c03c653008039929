"""torch zip checkpoints opened by ckptmap's reader: inspect, diff, plans and prefix loads read
the tensor table from ``data.pkl`` alone; torch's unpickler is never involved, and only the
tensors a prefix load asks for are built."""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import ckptmap
from ckptmap import open_checkpoint, plan_load
from ckptmap.cli.summary import inspect_checkpoint
from ckptmap.formats import pth
from ckptmap.opened import Checkpoint, walk_tensors
from ckptmap.shapes import checkpoint_shapes


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 2)


def old_bn_state_dict() -> collections.OrderedDict[str, Any]:
    """A state dict as torch < 0.4.1 wrote it: BatchNorm version 1, no num_batches_tracked.

    BatchNorm's own `_load_from_state_dict` adds the missing key for version 1, so a plan
    that lost ``_metadata`` would report it missing.
    """
    sd = Net().state_dict()
    del sd["bn.num_batches_tracked"]
    sd._metadata["bn"]["version"] = 1  # type: ignore[attr-defined]
    return sd


@pytest.fixture
def no_torch_unpickler(monkeypatch: pytest.MonkeyPatch) -> None:
    """Makes any use of torch's loader or unpickler fail the test."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("torch's unpickler was used")

    from torch import _weights_only_unpickler

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(_weights_only_unpickler, "load", refuse)
    monkeypatch.setattr(_weights_only_unpickler, "Unpickler", refuse)


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    path = tmp_path / "epoch_3.pth"
    checkpoint = {
        "meta": {"epoch": 3, "classes": ("cat", "dog")},
        "state_dict": old_bn_state_dict(),
        "optimizer": {"state": {0: {"momentum_buffer": torch.ones(4, 3, 3, 3)}}},
    }
    torch.save(checkpoint, path)
    return path


def reference(path: Path) -> Checkpoint:
    return Checkpoint.of(torch.load(path, weights_only=True), str(path))


def test_tables_come_from_the_reader(saved: Path, no_torch_unpickler: None) -> None:
    expected = Checkpoint.of(
        {
            "meta": {"epoch": 3, "classes": ("cat", "dog")},
            "state_dict": old_bn_state_dict(),
            "optimizer": {"state": {0: {"momentum_buffer": torch.ones(4, 3, 3, 3)}}},
        }
    )
    with open_checkpoint(saved) as opened:
        assert opened.header_only
        assert [(e.name, e.dtype, e.shape, e.nbytes) for e in opened.entries()] == [
            (e.name, e.dtype, e.shape, e.nbytes) for e in expected.entries()
        ]
        assert [(e.name, e.dtype, e.shape, e.nbytes) for e in opened.all_entries()] == [
            (e.name, e.dtype, e.shape, e.nbytes) for e in expected.all_entries()
        ]
        assert all(e.file == str(saved) and e.start is not None for e in opened.entries())
        assert opened.keys() == expected.keys()
        meta = opened.meta_state_dict()
        assert all(v.is_meta for v in meta.values() if isinstance(v, torch.Tensor))
        assert meta._metadata == expected.state_dict()._metadata  # type: ignore[attr-defined]


def test_byte_ranges_point_at_the_tensors(saved: Path) -> None:
    loaded = torch.load(saved, weights_only=True)["state_dict"]
    data = saved.read_bytes()
    with open_checkpoint(saved) as opened:
        for e in opened.entries():
            tensor = loaded[e.name]
            assert e.start is not None
            raw = data[e.start : e.start + e.nbytes]
            assert raw == tensor.contiguous().numpy().tobytes(), e.name


def test_plans_equal_those_of_the_loaded_checkpoint(saved: Path, monkeypatch) -> None:
    expected = plan_load(reference(saved), Net())
    # BatchNorm version 1 makes the load add num_batches_tracked: nothing is missing.
    assert expected.ok and expected.reads
    with monkeypatch.context() as m:
        m.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load was used"))
        with open_checkpoint(saved) as opened:
            plan = plan_load(opened, Net(), prefix=None)
    assert plan.result == expected.result
    assert plan.reads == expected.reads
    assert plan.bytes_to_read == expected.bytes_to_read
    assert plan.header_only


def test_inspect_and_diff_never_use_torchs_unpickler(saved: Path, no_torch_unpickler: None) -> None:
    summary = inspect_checkpoint(str(saved))
    assert summary["tensor_count"] == len(old_bn_state_dict()) + 1
    shapes, fmt, header_only = checkpoint_shapes(str(saved))
    assert fmt == "torch-zip" and header_only
    assert list(shapes) == list(old_bn_state_dict())


def test_a_prefix_load_builds_only_its_tensors(saved: Path, monkeypatch) -> None:
    asked: list[list[str] | None] = []
    original = pth.PthFile.load

    def spy(self: pth.PthFile, names: Any = None, *args: Any, **kwargs: Any) -> Any:
        asked.append(None if names is None else list(names))
        return original(self, names, *args, **kwargs)

    monkeypatch.setattr(pth.PthFile, "load", spy)
    monkeypatch.setattr("ckptmap.opened.load_file", lambda *a, **k: pytest.fail("loaded whole"))
    head = ckptmap._load_checkpoint_with_prefix("head", str(saved))
    assert asked == [["state_dict.head.weight", "state_dict.head.bias"]]
    expected = torch.load(saved, weights_only=True)["state_dict"]
    assert list(head) == ["weight", "bias"]
    assert torch.equal(head["weight"], expected["head.weight"])


def test_a_prefix_with_other_values_loads_the_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "m.pth"
    torch.save({"a.w": torch.ones(2), "a.note": "text", "b.w": torch.zeros(1)}, path)
    got = ckptmap._load_checkpoint_with_prefix("a", str(path))
    assert list(got) == ["w", "note"] and got["note"] == "text"
    assert torch.equal(got["w"], torch.ones(2))


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_files_only_torch_reads_open_as_before(tmp_path: Path) -> None:
    # A quantized tensor: the reader hands the file to torch's safe loader, and says why.
    path = tmp_path / "q.pth"
    q = torch.quantize_per_tensor(torch.ones(3), 0.5, 0, torch.quint8)
    torch.save({"q": q, "w": torch.randn(2)}, path)
    assert pth.read_pth(path).fallback_reason is not None
    with open_checkpoint(path) as opened:
        names = [e.name for e in opened.all_entries()]
        assert names == [name for name, _ in walk_tensors(torch.load(path, weights_only=True))]
        assert opened.header_only
