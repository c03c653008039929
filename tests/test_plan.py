"""Open, plan, load: the plan reports exactly what the load will, and changes nothing.

The property test reuses the module-tree generator of `test_load_state_dict` (overriding
modules, pre- and post-hooks, BatchNorm-style version metadata, extra states, damaged state
dicts): for every tree and state dict, `plan_load` on one copy of the model must predict the
`LoadResult` of a real load into another copy, and leave its copy untouched.
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from collections import OrderedDict

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from test_load_state_dict import build, perturbed_state_dicts, snapshot, specs
from torch import nn

import ckptmap
from ckptmap import Checkpoint, LoadPlan, open_checkpoint, plan_load
from ckptmap.cli import main
from ckptmap.errors import NothingLoadedWarning, PrefixNotFoundError


def _same_snapshot(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    for key, va in a.items():
        vb = b[key]
        if isinstance(va, tuple) and isinstance(va[0], torch.Tensor):
            if va[1:] != vb[1:] or not torch.equal(va[0], vb[0]):
                return False
        elif key.endswith("#seen"):
            continue  # post-hooks record what they saw: the plan runs them too
        elif va != vb:
            return False
    return True


def _real_load(spec, sd):
    model = build(spec, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NothingLoadedWarning)
        return ckptmap.load_state_dict(model, copy.copy(sd), logger="silent")


@given(spec=specs, data=st.data())
def test_plan_predicts_the_load_and_changes_nothing(spec, data):
    sd = data.draw(perturbed_state_dicts(spec))
    model = build(spec, seed=0)
    before = snapshot(model)
    plan = plan_load(Checkpoint.of(sd), model, revise_keys=[])
    assert _same_snapshot(before, snapshot(model))
    result = _real_load(spec, sd)
    assert plan.result.missing_keys == result.missing_keys
    assert plan.result.unexpected_keys == result.unexpected_keys
    assert plan.result.mismatched == result.mismatched
    # Errors other than shape mismatches come from copying values, which a plan never does
    # (a float64 tensor into an int buffer, say); the plan reports every other one.
    assert set(plan.result.error_msgs) <= set(result.error_msgs)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.norm = nn.BatchNorm2d(4)


class Net(nn.Module):
    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.backbone = nn.Sequential(Block(), Block())
        self.head = nn.Linear(4, classes)


def _ddp_file(tmp_path, suffix=".pth"):
    source = Net()
    sd = {f"module.{k}": v for k, v in source.state_dict().items()}
    path = tmp_path / f"ddp{suffix}"
    if suffix == ".pth":
        torch.save({"meta": {"epoch": 3}, "state_dict": sd}, path)
    else:
        ckptmap.save_checkpoint(sd, path)
    return str(path), source


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_dry_run_reports_what_the_load_does(tmp_path, suffix):
    path, source = _ddp_file(tmp_path, suffix)
    model = Net(classes=7)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = ckptmap.load_checkpoint(model, path, dry_run=True)
    assert isinstance(plan, LoadPlan)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert [m.name for m in plan.result.mismatched] == ["head.weight", "head.bias"]
    assert "module.head.weight" not in plan.reads and "module.backbone.0.conv.weight" in plan.reads
    expected_bytes = sum(
        v.nbytes for k, v in source.state_dict().items() if not k.startswith("head.")
    )
    assert plan.bytes_to_read == expected_bytes
    assert plan.header_only

    loaded = Net(classes=7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ckptmap.load_checkpoint(loaded, path, logger="silent")
    real = ckptmap.load_state_dict(Net(classes=7), source.state_dict(), logger="silent")
    assert plan.result.mismatched == real.mismatched
    assert plan.report() == real.report()


def test_overriding_module_plans_as_it_loads(tmp_path):
    class Renaming(nn.Module):
        _version = 2

        def __init__(self) -> None:
            super().__init__()
            self.conv0 = nn.Conv2d(3, 3, 1)

        def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args):
            if (local_metadata.get("version") or 0) < 2:
                for key in [k for k in state_dict if k.startswith(prefix + "conv1.")]:
                    state_dict[key.replace("conv1.", "conv0.")] = state_dict.pop(key)
            super()._load_from_state_dict(state_dict, prefix, local_metadata, *args)

    old = nn.Module()
    old.conv1 = nn.Conv2d(3, 3, 1)
    path = tmp_path / "v1.pth"
    torch.save(old.state_dict(), path)
    # A key-name diff would call conv1 unexpected and conv0 missing; the load renames them.
    plan = ckptmap.load_checkpoint(Renaming(), str(path), dry_run=True)
    assert plan.ok, plan.report()
    assert sorted(plan.reads) == ["conv1.bias", "conv1.weight"]


def test_prefix_plan_and_prefix_load_read_only_that_subtree(tmp_path):
    source = Net()
    path = tmp_path / "net.safetensors"
    ckptmap.save_checkpoint(source.state_dict(), path)
    with open_checkpoint(path) as opened:
        assert opened.header_only and opened.format.value == "safetensors"
        plan = plan_load(opened, Block(), revise_keys=[], prefix="backbone.1")
    assert plan.ok, plan.report()
    assert all(name.startswith("backbone.1.") for name in plan.reads)
    assert plan.bytes_to_read == sum(v.nbytes for v in source.backbone[1].state_dict().values())

    loaded = ckptmap._load_checkpoint_with_prefix("backbone.1", path)
    expected = source.backbone[1].state_dict()
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)
    with pytest.raises(PrefixNotFoundError, match="backbone"):
        ckptmap._load_checkpoint_with_prefix("nothing", path)


def test_diff_of_a_ddp_checkpoint_that_loads_cleanly_is_clean(tmp_path, capsys):
    path, _ = _ddp_file(tmp_path)
    models = tmp_path / "plan_models.py"
    models.write_text(
        "import sys\n"
        f"sys.path.insert(0, {os.path.dirname(__file__)!r})\n"
        "from test_plan import Net\n"
        "def build():\n    return Net()\n"
    )
    assert main(["diff", path, "--model", f"{models}:build", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["matched"] == doc["source_keys"] == len(Net().state_dict())
    assert doc["missing"] == [] and doc["unexpected"] == []


def test_a_state_dict_in_memory_plans_too():
    source = Net()
    plan = plan_load(OrderedDict(source.state_dict()), Net(classes=2), revise_keys=[])
    assert [m.name for m in plan.result.mismatched] == ["head.weight", "head.bias"]
    assert not plan.ok and "size mismatch" in plan.report()
