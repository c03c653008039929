"""The command line: `ckptmap demo` and error handling."""

import subprocess
import sys

from ckptmap.cli import main, synthetic_keys


def test_demo_runs_and_matches_re_sub(capsys):
    assert main(["demo", "--keys", "3000", "--repeat", "1"]) == 0
    out = capsys.readouterr().out
    assert "3,000 keys" in out
    assert "results identical to re.sub: yes" in out
    assert "[rust]" in out


def test_synthetic_keys_are_unique_and_sized():
    keys = synthetic_keys(1000)
    assert len(keys) == len(set(keys)) == 1000
    assert keys[0] == "module.backbone.layers.0.experts.0.w1.weight"


def test_console_script_help():
    proc = subprocess.run(
        [sys.executable, "-m", "ckptmap.cli", "--help"], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0
    assert "demo" in proc.stdout


def test_bad_arguments_exit_nonzero(capsys):
    try:
        main(["demo", "--keys", "many"])
    except SystemExit as exc:
        assert exc.code == 2
    else:
        raise AssertionError("argparse should reject --keys many")


def test_inspect_subcommand(tmp_path, capsys):
    import torch

    path = tmp_path / "m.pth"
    model = torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(3)])
    torch.save({"state_dict": model.state_dict()}, path)
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "tensors: 6" in out
    assert main(["inspect", str(tmp_path / "missing.pth")]) == 1
    err = capsys.readouterr().err
    assert "missing.pth" in err and "can not be found" in err
