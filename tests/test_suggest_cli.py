"""Tests of ``ckptmap suggest``: a real `torch.save` file, a model factory, text and JSON output,
exit codes and one-line errors."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
import torch
from torchvision.models import resnet18

from ckptmap.cli import main


def rename(key: str) -> str:
    key = re.sub(r"^layer(\d)\.", lambda m: f"stages.{int(m[1]) - 1}.blocks.", key)
    return "model." + re.sub(r"\.bn(\d)\.", r".norm\1.", key)


@pytest.fixture
def timm_pth(tmp_path: Any) -> str:
    path = tmp_path / "renamed.pth"
    with torch.device("meta"):
        model = resnet18()
    state = {rename(k): torch.zeros(v.shape, dtype=v.dtype) for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "meta": {"epoch": 3}}, path)
    return str(path)


def test_text_output_and_exit_status(timm_pth: str, capsys: Any) -> None:
    assert main(["suggest", timm_pth, "--model", "torchvision.models:resnet18"]) == 0
    out = capsys.readouterr().out
    assert "model:      torchvision.models:resnet18 (built on meta)" in out
    assert "coverage: 122 of 122 model tensors (100.0%)" in out
    assert "(r'^model\\.stages\\.0\\.blocks\\.', 'layer1.')," in out
    assert "load check: matched 122, missing 0, unexpected 0" in out


def test_json_output(timm_pth: str, capsys: Any) -> None:
    assert main(["suggest", timm_pth, "--model", "torchvision.models:resnet18", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["coverage"] == doc["model_tensors"] == 122
    assert doc["model_device"] == "meta"
    assert doc["check"]["match"] is True
    assert doc["mapping"]["model.stages.3.blocks.1.norm2.weight"] == "layer4.1.bn2.weight"


def test_partial_coverage_exits_1(tmp_path: Any, capsys: Any) -> None:
    path = tmp_path / "partial.pth"
    with torch.device("meta"):
        model = resnet18()
    state = {
        "module." + k: torch.zeros(v.shape, dtype=v.dtype)
        for k, v in model.state_dict().items()
        if not k.startswith("fc.")
    }
    torch.save(state, path)
    argv = ["suggest", str(path), "--model", "torchvision.models:resnet18"]
    assert main(argv) == 1
    out = capsys.readouterr().out
    assert "unmatched in the model (2):" in out
    assert "fc.weight  (no candidate)" in out


def test_errors_are_one_line(tmp_path: Any, capsys: Any) -> None:
    assert (
        main(["suggest", str(tmp_path / "missing.pth"), "--model", "torchvision.models:resnet18"])
        == 2
    )
    err = capsys.readouterr().err
    assert err.startswith("ckptmap: error:") and err.count("\n") == 1
    assert main(["suggest", str(tmp_path / "x.pth"), "--model", "no_such_module_xyz:build"]) == 2
    assert "no_such_module_xyz" in capsys.readouterr().err


def test_help_mentions_the_exit_status(capsys: Any) -> None:
    with pytest.raises(SystemExit):
        main(["suggest", "--help"])
    assert "exit status:" in capsys.readouterr().out
