"""`load_checkpoint` and friends on local files: the seeds' behaviour, typed errors, no damage."""

from __future__ import annotations

import copy
import logging
import os
import pickle
import re
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch
from devices import data_parallel
from probes import mapped_from
from torch import nn

from ckptmap.checkpoint import (
    _load_checkpoint,
    _load_checkpoint_to_model,
    _load_checkpoint_with_prefix,
    find_state_dict,
    load_checkpoint,
    load_model_checkpoint,
)
from ckptmap.errors import (
    CheckpointIsADirectoryError,
    CheckpointNotFoundError,
    NoStateDictError,
    NothingLoadedWarning,
    PrefixNotFoundError,
    StateDictMismatchError,
    UnsafeCheckpointError,
)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2))
        self.head = nn.Linear(2, 3)


def _net(seed: int) -> Net:
    torch.manual_seed(seed)
    return Net()


def _assert_same(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def _save(path: Path, obj: Any) -> str:
    torch.save(obj, path)
    return str(path)


@pytest.fixture
def trained() -> Net:
    return _net(1)


@pytest.mark.parametrize("layout", ["state_dict", "model", "plain", "module_prefix"])
def test_finds_the_weights_and_strips_module(tmp_path, trained, layout):
    sd = trained.state_dict()
    if layout == "module_prefix":
        wrapped = data_parallel(trained)
        obj: Any = {"state_dict": wrapped.state_dict(), "meta": {"epoch": 3}}
    elif layout == "plain":
        obj = sd
    else:
        obj = {layout: sd, "meta": {"epoch": 3}}
    path = _save(tmp_path / "ckpt.pth", obj)
    model = _net(0)
    checkpoint = load_checkpoint(model, path, map_location="cpu", logger="silent")
    _assert_same(model, trained)
    assert isinstance(checkpoint, dict)
    if layout != "plain":
        assert checkpoint["meta"] == {"epoch": 3}


def test_same_model_as_mmengine(tmp_path, trained):
    mm = pytest.importorskip("mmengine.runner.checkpoint")
    path = _save(tmp_path / "ckpt.pth", {"state_dict": data_parallel(trained).state_dict()})
    theirs, ours = _net(0), _net(0)
    mm.load_checkpoint(theirs, path, map_location="cpu", logger="silent")
    load_checkpoint(ours, path, map_location="cpu", logger="silent")
    _assert_same(ours, theirs)
    _assert_same(ours, trained)


class VersionedHead(nn.Linear):
    """Records the version its checkpoint was saved with, as versioned OpenMMLab modules read it."""

    _version = 3

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args):
        self.loaded_version = local_metadata.get("version")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args)


def test_metadata_survives_the_default_rules(tmp_path):
    """Stripping `module.` keeps the modules' versions (the seeds lose them)."""
    saved = nn.Sequential(OrderedDict(head=VersionedHead(2, 2)))
    path = _save(tmp_path / "ckpt.pth", {"state_dict": data_parallel(saved).state_dict()})
    model = nn.Sequential(OrderedDict(head=VersionedHead(2, 2)))
    load_checkpoint(model, path, logger="silent")
    assert model.head.loaded_version == 3
    _assert_same(model, saved)


def test_custom_rules_and_collisions(tmp_path, trained, caplog):
    sd = OrderedDict(trained.state_dict())
    sd["old.head.weight"] = torch.zeros(3, 2)
    path = _save(tmp_path / "ckpt.pth", sd)
    model = _net(0)
    with caplog.at_level(logging.WARNING, logger="ckptmap"):
        load_checkpoint(model, path, revise_keys=[(r"^old\.", "")])
    # Both "head.weight" and "old.head.weight" became "head.weight": the later one is kept
    # (as the seeds' dict comprehension does) and the collision is reported.
    assert torch.equal(model.head.weight, torch.zeros(3, 2))
    (record,) = caplog.records
    text = record.getMessage()
    assert "key collisions after revise_keys (1)" in text
    assert "head.weight <- head.weight, old.head.weight (kept old.head.weight)" in text


def test_rules_leaving_nothing_warn_loudly(tmp_path, trained, caplog):
    path = _save(tmp_path / "ckpt.pth", {"state_dict": trained.state_dict()})
    model = _net(0)
    before = copy.deepcopy(model)
    with caplog.at_level(logging.WARNING, logger="ckptmap"):
        with pytest.warns(NothingLoadedWarning, match=r"loaded 0 of 9 keys"):
            load_checkpoint(model, path, revise_keys=[(r"^", "encoder.")])
    assert caplog.records[0].getMessage().startswith("loaded 0 of 9 keys")
    _assert_same(model, before)
    with pytest.raises(StateDictMismatchError, match="loaded 0 of 9 keys"):
        load_checkpoint(model, path, strict=True, revise_keys=[(r"^", "encoder.")])


def test_strict_and_flat_report(tmp_path, trained):
    sd = trained.state_dict()
    sd["head.weight"] = torch.zeros(5, 2)
    path = _save(tmp_path / "ckpt.pth", sd)
    with pytest.raises(StateDictMismatchError) as info:
        load_checkpoint(_net(0), path, strict=True, report="flat")
    assert isinstance(info.value, RuntimeError)
    assert str(info.value).startswith(
        "The model and loaded state dict do not match exactly\n\nsize mismatch for head.weight"
    )
    assert info.value.mismatched == [("head.weight", (5, 2), (3, 2))]


def test_bad_rule_fails_before_reading(tmp_path):
    with pytest.raises(re.error):
        load_checkpoint(_net(0), str(tmp_path / "does-not-exist.pth"), revise_keys=[("(", "")])


def test_logs_where_it_loads_from(tmp_path, trained, caplog):
    path = _save(tmp_path / "ckpt.pth", trained.state_dict())
    with caplog.at_level(logging.INFO, logger="ckptmap"):
        load_checkpoint(_net(0), path)
    assert [r.getMessage() for r in caplog.records] == [
        f"Loads checkpoint by local backend from path: {path}"
    ]


def test_map_location_and_pathlike(tmp_path, trained):
    path = tmp_path / "ckpt.pth"
    torch.save(trained.state_dict(), path)
    checkpoint = _load_checkpoint(path, map_location="meta")
    assert all(t.is_meta for t in checkpoint.values())


def test_expands_user(tmp_path, trained, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    _save(tmp_path / "ckpt.pth", trained.state_dict())
    model = _net(0)
    load_checkpoint(model, "~/ckpt.pth", logger="silent")
    _assert_same(model, trained)


# --- errors ---------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    path = str(tmp_path / "nope.pth")
    with pytest.raises(CheckpointNotFoundError) as info:
        load_checkpoint(_net(0), path)
    assert isinstance(info.value, FileNotFoundError)
    assert path in str(info.value) and info.value.filename == path
    assert not (tmp_path / "nope.pth").exists()


def test_directory(tmp_path):
    with pytest.raises(CheckpointIsADirectoryError) as info:
        load_checkpoint(_net(0), str(tmp_path))
    assert isinstance(info.value, IsADirectoryError)
    assert not isinstance(info.value, FileNotFoundError)


def test_dangling_symlink(tmp_path):
    link = tmp_path / "latest.pth"
    link.symlink_to(tmp_path / "epoch_3.pth")
    with pytest.raises(CheckpointNotFoundError, match="is a symlink to") as info:
        load_checkpoint(_net(0), str(link))
    assert "epoch_3.pth" in str(info.value)


_AS_NOBODY = """
import io, os, sys
import torch
from ckptmap.checkpoint import _load_checkpoint
buffer = io.BytesIO()
torch.save({"w": torch.zeros(1)}, buffer)
torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)  # imports what loading needs
if os.geteuid() == 0:  # root reads mode-000 files: drop privileges once imports are done
    os.setgid(65534)
    os.setuid(65534)
try:
    _load_checkpoint(sys.argv[1], None, 'silent')
except Exception as err:
    print(type(err).__name__, isinstance(err, PermissionError), str(err))
"""


@pytest.mark.parametrize("where", ["unreadable_file", "unsearchable_dir"])
def test_permission_denied(trained, where):
    """Not flattened to "not found", also when a directory on the way is locked."""
    import shutil
    import subprocess
    import sys
    import tempfile

    # Under /tmp (searchable by everyone), so that only the locked part is in the way.
    top = Path(tempfile.mkdtemp(prefix="ckptmap-perm-"))
    try:
        top.chmod(0o711)
        home = top / "ckpts"
        home.mkdir(mode=0o711)
        path = home / "ckpt.pth"
        torch.save(trained.state_dict(), path)
        (path if where == "unreadable_file" else home).chmod(0)
        out = subprocess.run(
            [sys.executable, "-c", _AS_NOBODY, str(path)],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        ).stdout
    finally:
        home.chmod(0o700)
        shutil.rmtree(top)
    assert out.startswith(f"CheckpointPermissionError True checkpoint file {str(path)!r}"), out


@pytest.mark.parametrize(
    ("obj", "type_name", "where"),
    [
        ([torch.zeros(1)], "list", "top-level object"),
        (torch.zeros(3), "torch.Tensor", "top-level object"),
        (7, "int", "top-level object"),
        ({"state_dict": [1, 2]}, "list", "'state_dict' entry"),
        ({"model": "resnet"}, "str", "'model' entry"),
    ],
)
def test_no_state_dict_names_the_type(tmp_path, obj, type_name, where):
    path = _save(tmp_path / "ckpt.pth", obj)
    model = _net(0)
    before = copy.deepcopy(model)
    with pytest.raises(NoStateDictError) as info:
        load_checkpoint(model, path)
    assert isinstance(info.value, RuntimeError)
    text = str(info.value)
    assert text.startswith(f"No state_dict found in checkpoint file {path}")
    assert f"its {where} is a {type_name}," in text
    _assert_same(model, before)


def test_tensor_named_model_is_a_weight():
    sd = {"model": torch.zeros(1), "other": torch.ones(1)}
    assert find_state_dict(sd) is sd


def test_unsafe_pickle_is_refused_and_never_runs(tmp_path):
    sentinel = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {sentinel}",))

    path = _save(tmp_path / "evil.pth", {"state_dict": {"w": torch.zeros(1)}, "x": Payload()})
    with pytest.raises(UnsafeCheckpointError, match=r"posix\.system") as info:
        load_checkpoint(_net(0), path)
    assert isinstance(info.value, pickle.UnpicklingError)
    assert "nothing from it was executed" in str(info.value)
    assert not sentinel.exists()


def test_checkpoint_to_model_returns_it(trained):
    checkpoint = {"state_dict": data_parallel(trained).state_dict(), "epoch": 2}
    model = _net(0)
    assert _load_checkpoint_to_model(model, checkpoint, logger="silent") is checkpoint
    _assert_same(model, trained)


# --- prefix ---------------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["backbone", "backbone."])
def test_prefix_loading(tmp_path, trained, prefix):
    path = _save(tmp_path / "ckpt.pth", {"state_dict": trained.state_dict()})
    sd = _load_checkpoint_with_prefix(prefix, path)
    assert list(sd) == [k[len("backbone.") :] for k in trained.state_dict() if "backbone" in k]
    target = _net(0).backbone
    from ckptmap.module_load import load_state_dict

    assert load_state_dict(target, sd).ok  # the BatchNorm version came along
    _assert_same(target, trained.backbone)


def test_prefix_not_found(tmp_path, trained):
    path = _save(tmp_path / "ckpt.pth", {"state_dict": trained.state_dict()})
    with pytest.raises(PrefixNotFoundError) as info:
        _load_checkpoint_with_prefix("neck", path)
    err = info.value
    assert isinstance(err, AssertionError) and isinstance(err, ValueError)
    assert str(err).startswith("neck. is not in the pretrained model")
    assert "'backbone', 'head'" in str(err)
    with pytest.raises(PrefixNotFoundError):
        _load_checkpoint_with_prefix("back", path)  # whole components only


# --- vis4d ------------------------------------------------------------------------------------


def test_load_model_checkpoint(tmp_path, trained):
    path = _save(tmp_path / "ckpt.pth", {"model": data_parallel(trained).state_dict()})
    model = _net(0)
    assert load_model_checkpoint(model, path) is None
    _assert_same(model, trained)
    other = _net(0)
    load_model_checkpoint(other, path, rev_keys=[(r"^module\.backbone\.", "backbone.")])
    _assert_same(other.backbone, trained.backbone)
    assert not torch.equal(other.head.weight, trained.head.weight)
    with pytest.raises(StateDictMismatchError):
        load_model_checkpoint(_net(0), path, strict=True, rev_keys=[])


def test_assign_makes_parameters_the_mapped_tensors(tmp_path, trained):
    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict": trained.state_dict()}, path)
    model = _net(0)
    load_checkpoint(model, path, assign=True, logger="silent")
    _assert_same(model, trained)
    # The parameters are now views of the memory-mapped file, not copies.
    for name, param in model.named_parameters():
        assert isinstance(param, nn.Parameter)
        assert mapped_from(param, path.resolve()), name
