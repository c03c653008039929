"""ckptmap.integrations.mmengine: an OpenMMLab project on ckptmap without code changes.

These tests run mmengine (from PyPI) through the patched path and compare with mmengine
unpatched.
"""

from __future__ import annotations

import copy
import importlib

import pytest
import torch
from torch import nn

mmengine_checkpoint = pytest.importorskip("mmengine.runner.checkpoint")

import ckptmap  # noqa: E402
from ckptmap.integrations import mmengine as dropin  # noqa: E402

# mmengine emits these on import paths we exercise; they are mmengine's, not ours.
pytestmark = pytest.mark.filterwarnings(
    "ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning:mmengine"
)


class Backbone(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))


class Detector(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = Backbone()
        self.head = nn.Linear(4, 2)


def trained_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = Detector()
    for p in model.parameters():
        nn.init.normal_(p)
    state = nn.DataParallel(model).state_dict()  # keys under "module."
    path = tmp_path / "epoch_3.pth"
    torch.save({"state_dict": state, "meta": {"epoch": 3}}, path)
    return model, path


def fresh_model():
    torch.manual_seed(1)
    return Detector()


def assert_same_state(a: nn.Module, b: nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


@pytest.fixture
def patched():
    dropin.patch()
    try:
        yield
    finally:
        dropin.unpatch()


def test_patch_replaces_mmengine_functions_everywhere_and_unpatch_restores():
    runner_pkg = importlib.import_module("mmengine.runner")
    runner_mod = importlib.import_module("mmengine.runner.runner")
    originals = (
        mmengine_checkpoint.load_checkpoint,
        runner_pkg.load_checkpoint,
        runner_mod._load_checkpoint,
        mmengine_checkpoint.CheckpointLoader.__dict__["load_checkpoint"],
    )
    with dropin.patched():
        assert dropin.is_patched()
        assert mmengine_checkpoint.load_checkpoint is not originals[0]
        assert runner_pkg.load_checkpoint is mmengine_checkpoint.load_checkpoint
        assert runner_mod._load_checkpoint is mmengine_checkpoint._load_checkpoint
        assert runner_mod._load_checkpoint.__module__ == dropin.__name__
        assert runner_mod.save_checkpoint is ckptmap.save.save_checkpoint
    assert not dropin.is_patched()
    assert (
        mmengine_checkpoint.load_checkpoint,
        runner_pkg.load_checkpoint,
        runner_mod._load_checkpoint,
        mmengine_checkpoint.CheckpointLoader.__dict__["load_checkpoint"],
    ) == originals


def test_runner_style_load_with_revise_keys_equals_unpatched_mmengine(tmp_path, patched):
    _, path = trained_checkpoint(tmp_path)
    rules = [(r"^module\.", ""), (r"^backbone\.layers\.2\.", "backbone.layers.1.")]
    ours = fresh_model()
    ckpt = mmengine_checkpoint.load_checkpoint(ours, str(path), revise_keys=rules)
    assert ckpt["meta"] == {"epoch": 3}
    dropin.unpatch()
    theirs = fresh_model()
    mmengine_checkpoint.load_checkpoint(theirs, str(path), revise_keys=rules)
    dropin.patch()
    assert_same_state(ours, theirs)


def test_prefix_load_and_strict_raise_like_mmengine(tmp_path, patched):
    model, path = trained_checkpoint(tmp_path)
    stripped = tmp_path / "plain.pth"
    torch.save({"state_dict": model.state_dict()}, stripped)
    backbone = mmengine_checkpoint._load_checkpoint_with_prefix("backbone", str(stripped))
    assert set(backbone) == set(model.backbone.state_dict())
    broken = fresh_model()
    broken.head = nn.Linear(4, 3)  # shape mismatch
    with pytest.raises(RuntimeError, match=r"size mismatch for head\.weight"):
        mmengine_checkpoint.load_checkpoint(broken, str(path), strict=True)


def test_custom_schemes_keep_working(tmp_path):
    _, path = trained_checkpoint(tmp_path)
    loader = mmengine_checkpoint.CheckpointLoader
    calls: list[str] = []

    def load_from_before(filename, map_location=None):
        calls.append(filename)
        return torch.load(path, map_location=map_location, weights_only=True)

    def load_from_after(filename, map_location=None):
        calls.append(filename)
        return torch.load(path, map_location=map_location, weights_only=True)

    saved = dict(loader._schemes)
    try:
        loader.register_scheme("before://", load_from_before)
        with dropin.patched():
            loader.register_scheme("after://", load_from_after)
            for uri in ("before://x.pth", "after://y.pth"):
                model = fresh_model()
                mmengine_checkpoint.load_checkpoint(model, uri)
            with pytest.raises(KeyError, match="already registered"):
                loader.register_scheme("after://", load_from_before)
        assert calls == ["before://x.pth", "after://y.pth"]
        assert "after://" not in ckptmap.CheckpointLoader.registered_schemes()
        assert "before://" not in ckptmap.CheckpointLoader.registered_schemes()
    finally:
        loader._schemes = saved


def test_patched_save_and_find_latest(tmp_path, patched):
    model, _ = trained_checkpoint(tmp_path)
    target = tmp_path / "work" / "iter_10.pth"
    target.parent.mkdir()
    mmengine_checkpoint.save_checkpoint({"state_dict": model.state_dict()}, str(target))
    (target.parent / "last_checkpoint").write_text(str(target))
    assert mmengine_checkpoint.find_latest_checkpoint(str(target.parent)) == str(target)
    reloaded = fresh_model()
    mmengine_checkpoint.load_checkpoint(reloaded, str(target))
    assert_same_state(reloaded, copy.deepcopy(model))


def test_flat_message_matches_mmengine(tmp_path, patched, caplog):
    _, path = trained_checkpoint(tmp_path)
    model = fresh_model()
    del model.head
    with caplog.at_level("WARNING", logger="ckptmap"):
        mmengine_checkpoint.load_checkpoint(model, str(path))
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "The model and loaded state dict do not match exactly" in text
    assert "unexpected key in source state_dict: head.weight, head.bias" in text
