"""`ckptmap convert`: round trips keep values and metadata, sharding, dtype, rules, in place."""

import json
from collections import OrderedDict

import pytest
import torch
from torch import nn

import ckptmap
from ckptmap.cli import main
from ckptmap.cli.convert import convert, parse_dtype


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 8))
    model[1].num_batches_tracked.fill_(5)
    return model


@pytest.fixture
def pth(tmp_path):
    sd = _model().state_dict()
    path = tmp_path / "in.pth"
    torch.save({"meta": {"epoch": 3, "classes": ("a", "b")}, "state_dict": sd}, path)
    return path


def _equal(a, b):
    # safetensors files order their tensors by the writer's layout, not the state dict's.
    return sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_pth_to_safetensors_and_back(pth, tmp_path, capsys):
    st = tmp_path / "out.safetensors"
    assert main(["convert", str(pth), str(st)]) == 0
    assert "entries kept beside the weights: meta" in capsys.readouterr().out
    with ckptmap.formats.safetensors.SafetensorsFile(st) as f:
        # Plain JSON for other tools (which see the tuple as a list) ...
        assert json.loads(f.metadata["meta"]) == {"epoch": 3, "classes": ["a", "b"]}
    back = tmp_path / "back.pth"
    assert main(["convert", str(st), str(back)]) == 0
    original = torch.load(pth, weights_only=True)
    loaded = torch.load(back, weights_only=True)
    assert list(loaded) == ["meta", "state_dict"]
    # ... and the same values, tuples included, for ckptmap.
    assert loaded["meta"] == {"epoch": 3, "classes": ("a", "b")}
    assert list(loaded["state_dict"]) == list(original["state_dict"])
    assert _equal(loaded["state_dict"], original["state_dict"])
    assert loaded["state_dict"]._metadata == original["state_dict"]._metadata


def test_sharded_bf16_loadable(pth, tmp_path):
    result = convert(pth, tmp_path / "s.safetensors", dtype="bf16", max_shard_size=200)
    assert result.target.endswith("s.safetensors.index.json")
    assert result.shards and result.shards > 1
    loaded = ckptmap.load_file(result.target)
    assert loaded["meta"] == {"epoch": 3, "classes": ("a", "b")}
    loaded = loaded["state_dict"]
    original = torch.load(pth, weights_only=True)["state_dict"]
    assert list(loaded) == list(original)
    for key, value in original.items():
        if value.is_floating_point():
            assert loaded[key].dtype == torch.bfloat16
            assert torch.equal(loaded[key], value.to(torch.bfloat16))
        else:  # num_batches_tracked stays an integer
            assert loaded[key].dtype == value.dtype and torch.equal(loaded[key], value)
    # ... and back to one .pth with the metadata.
    back = convert(result.target, tmp_path / "back.pth")
    assert torch.load(back.target, weights_only=True)["meta"]["epoch"] == 3


def test_rules_prefix_and_drop(tmp_path, capsys):
    sd = OrderedDict((f"module.backbone.{k}", v) for k, v in _model().state_dict().items())
    src = tmp_path / "ddp.pth"
    torch.save({"state_dict": sd, "optimizer": {"state": {0: torch.ones(1)}}, "meta": {}}, src)
    out = tmp_path / "bb.safetensors"
    # The optimizer's int keys and tensors can't be safetensors metadata: --drop suggested.
    assert main(["convert", str(src), str(out)]) == 1
    assert "--drop 'optimizer'" in capsys.readouterr().err
    argv = ["convert", str(src), str(out), "--revise", r"^module\.=>", "--prefix", "backbone"]
    assert main([*argv, "--drop", "optimizer"]) == 0
    loaded = ckptmap.load_file(out)
    assert list(loaded) == ["state_dict", "meta"] and loaded["meta"] == {}
    assert _equal(loaded["state_dict"], _model().state_dict())
    assert main([*argv, "--drop", "nothing"]) == 1
    assert "no such entry" in capsys.readouterr().err
    assert main(["convert", str(src), str(out), "--prefix", "nope"]) == 1
    assert "nope." in capsys.readouterr().err


def test_in_place(pth):
    before = torch.load(pth, weights_only=True)
    result = convert(pth, pth, dtype="fp16")
    assert result.in_place and result.cast == 8
    after = torch.load(pth, weights_only=True)
    assert after["meta"] == before["meta"]
    for key, value in before["state_dict"].items():
        expected = value.half() if value.is_floating_point() else value
        assert torch.equal(after["state_dict"][key], expected)


def test_bad_arguments_fail_before_reading(tmp_path, capsys):
    missing = str(tmp_path / "missing.pth")
    out = str(tmp_path / "o.pth")
    assert main(["convert", missing, out, "--dtype", "int8"]) == 1
    assert "unknown dtype 'int8'" in capsys.readouterr().err
    assert main(["convert", missing, out, "--max-shard-size", "lots"]) == 1
    assert "is not a size" in capsys.readouterr().err
    assert main(["convert", missing, out, "--revise", "[=>"]) == 1
    assert "bad regular expression" in capsys.readouterr().err
    assert main(["convert", missing, out]) == 1
    assert "can not be found" in capsys.readouterr().err
    assert parse_dtype("BFloat16") is torch.bfloat16
