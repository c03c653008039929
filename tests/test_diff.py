"""`ckptmap diff`: keys and shapes from headers, rules, prefix, --json, exit codes."""

import json
import os
import textwrap

import pytest
import torch
from torch import nn

import ckptmap
import ckptmap.shapes
from ckptmap.cli import main
from ckptmap.cli.common import parse_rule
from ckptmap.formats.safetensors import SafetensorsFile
from ckptmap.shapes import checkpoint_shapes, diff_checkpoint

MODELS = textwrap.dedent(
    """
    import torch
    from torch import nn

    BUILT_ON = []

    def build():
        model = nn.Sequential(
            nn.Linear(4, 8), nn.BatchNorm1d(8), *[nn.Linear(8, 8) for _ in range(3)]
        )
        BUILT_ON.append(next(model.parameters()).device.type)
        return model

    def build_wide():
        return nn.Sequential(
            nn.Linear(4, 16), nn.BatchNorm1d(8), *[nn.Linear(8, 8) for _ in range(3)]
        )

    def build_on_cpu_only():
        model = build()
        model[0].weight.data.numpy()  # impossible on the meta device
        return model

    def not_a_module():
        return 42
    """
)


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), *[nn.Linear(8, 8) for _ in range(3)])


@pytest.fixture
def models(tmp_path):
    path = tmp_path / "diff_models.py"
    path.write_text(MODELS)
    return str(path)


@pytest.fixture
def ddp_pth(tmp_path):
    """A DDP-style torch zip checkpoint of `_model`, num_batches_tracked left out."""
    sd = {f"module.{k}": v for k, v in _model().state_dict().items()}
    del sd["module.1.num_batches_tracked"]
    path = tmp_path / "ddp.pth"
    torch.save({"meta": {"epoch": 1}, "state_dict": sd}, path)
    return str(path)


def test_parse_rule():
    assert parse_rule(r"^module\.=>") == (r"^module\.", "")
    assert parse_rule(r"a(\d)=>b\1=>c") == (r"a(\d)", r"b\1=>c")
    with pytest.raises(ValueError, match="PATTERN=>REPLACEMENT"):
        parse_rule("no-arrow")


def test_match_exit_0_with_rules(ddp_pth, models, capsys):
    assert main(["diff", ddp_pth, "--model", f"{models}:build", "--revise", r"^module\.=>"]) == 0
    out = capsys.readouterr().out
    assert "keys and shapes match exactly" in out
    assert "header only" in out


def test_model_built_on_meta_device(ddp_pth, models, capsys):
    # load_checkpoint's default rule strips `module.`: the DDP checkpoint that loads cleanly
    # diffs cleanly.
    assert main(["diff", ddp_pth, "--model", f"{models}:build", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["model_device"] == "meta"
    assert doc["rules"] == [[r"^module\.", ""]]
    assert doc["matched"] == doc["source_keys"] == 12


def test_factory_that_needs_real_tensors_falls_back_to_cpu(ddp_pth, models, capsys):
    args = ["diff", ddp_pth, "--model", f"{models}:build_on_cpu_only", "--json"]
    assert main([*args, "--revise", r"^module\.=>"]) == 0
    assert json.loads(capsys.readouterr().out)["model_device"] == "cpu"


def test_differences_folded_and_json(ddp_pth, models, capsys):
    # Rules given replace the default, as in load_checkpoint: `module.` stays.
    assert main(["diff", ddp_pth, "--model", f"{models}:build", "--revise", "^nothing=>"]) == 1
    out = capsys.readouterr().out
    assert "module.{0,2..4}.weight" in out or "module.{0..4}.weight" in out
    assert "[5 keys]" in out
    assert "hint: no key matches" in out

    argv = ["diff", ddp_pth, "--model", f"{models}:build_wide", "--revise", r"^module\.=>"]
    assert main([*argv, "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["match"] is False
    assert doc["missing"] == [] and doc["unexpected"] == []
    assert doc["shape_mismatched"] == [
        {"key": "0.weight", "checkpoint": [8, 4], "expected": [16, 4]},
        {"key": "0.bias", "checkpoint": [8], "expected": [16]},
    ]
    assert doc["rules"] == [[r"^module\.", ""]]
    assert doc["source_keys"] == 12 and doc["matched"] == 10


def test_against_other_checkpoint_with_prefix_and_collisions(tmp_path, capsys):
    a = tmp_path / "a.pth"
    b = tmp_path / "b.safetensors"
    torch.save({"backbone.x.weight": torch.zeros(2), "backbone.y": torch.zeros(3)}, a)
    ckptmap.save_checkpoint({"x.weight": torch.zeros(2), "y": torch.zeros(4)}, b)
    assert main(["diff", str(a), "--against", str(b), "--prefix", "backbone", "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["against_header_only"] is True
    assert doc["shape_mismatched"] == [{"key": "y", "checkpoint": [3], "expected": [4]}]

    # Two keys revised onto one: a collision, reported, exit 1.
    argv = ["diff", str(a), "--against", str(b), "--revise", r"^backbone\.(x\.weight|y)=>y"]
    assert main([*argv, "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["collisions"] == [
        {"key": "y", "sources": ["backbone.x.weight", "backbone.y"], "kept": "backbone.y"}
    ]
    assert main(argv) == 1
    assert "collisions after the rules (1)" in capsys.readouterr().out


def test_prefix_not_found_is_exit_2(ddp_pth, models, capsys):
    assert main(["diff", ddp_pth, "--model", f"{models}:build", "--prefix", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ckptmap: error:") and "nope." in err and err.count("\n") == 1


def test_bad_pattern_fails_before_any_file_is_read(tmp_path, models, capsys):
    missing = str(tmp_path / "never.pth")
    assert main(["diff", missing, "--model", f"{models}:build", "--revise", "(=>x"]) == 2
    err = capsys.readouterr().err
    assert "bad regular expression" in err and "never.pth" not in err


@pytest.mark.parametrize(
    "spec, words",
    [
        ("no_colon", "MODULE:FACTORY"),
        ("surely_not_a_module_xyz:f", "importing"),
        ("{models}:missing", "no attribute"),
        ("{models}:not_a_module", "not a torch.nn.Module"),
    ],
)
def test_bad_model_spec_is_exit_2(ddp_pth, models, capsys, spec, words):
    assert main(["diff", ddp_pth, "--model", spec.format(models=models)]) == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1


def test_model_as_importable_module(ddp_pth, tmp_path, monkeypatch, capsys):
    (tmp_path / "diff_pkg_models.py").write_text(MODELS)
    monkeypatch.syspath_prepend(str(tmp_path))
    argv = ["diff", ddp_pth, "--model", "diff_pkg_models:build", "--revise", r"^module\.=>"]
    assert main(argv) == 0


def test_usage_errors_exit_2(ddp_pth):
    for argv in (["diff", ddp_pth], ["diff", ddp_pth, "--against", "x", "--model", "m:f"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        main(["diff", ddp_pth, "--against", ddp_pth, "--revise", "no-arrow"])
    assert exc.value.code == 2


def test_safetensors_header_only(tmp_path, monkeypatch, capsys):
    """The data section is garbage and reading any tensor fails: diff still works."""
    model = _model()
    path = tmp_path / "m.safetensors"
    ckptmap.save_checkpoint({"meta": {"a": 1}, "state_dict": model.state_dict()}, path)
    header_end = 8 + int.from_bytes(path.read_bytes()[:8], "little")
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.seek(header_end)
        f.write(b"\xde\xad" * ((size - header_end) // 2))
    assert os.path.getsize(path) == size

    def no_data(self, i):
        raise AssertionError("tensor data was read")

    monkeypatch.setattr(SafetensorsFile, "_tensor", no_data)
    sharded = ckptmap.save_checkpoint(model.state_dict(), tmp_path / "s.safetensors",
                                      max_shard_size=200)  # fmt: skip
    shapes, fmt, header_only = checkpoint_shapes(path)
    assert header_only and fmt == "safetensors"
    assert shapes["0.weight"] == ((8, 4), "float32")
    assert main(["diff", str(path), "--against", sharded, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["header_only"] and doc["against_header_only"] and doc["match"]


def test_diff_checkpoint_api_skips_num_batches_tracked():
    source = ckptmap.shapes.model_shapes(_model())
    del source["1.num_batches_tracked"]
    result = diff_checkpoint(source, ckptmap.shapes.model_shapes(_model()))
    assert result.match and result.matched == len(source)
