"""The command line: `ckptmap demo` and error handling."""

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ckptmap.cli import main, synthetic_keys


def test_demo_runs_and_matches_re_sub(capsys):
    assert main(["demo", "--keys", "3000", "--repeat", "1"]) == 0
    out = capsys.readouterr().out
    assert "3,000 keys" in out
    assert "results identical to re.sub: yes" in out
    assert "[rust]" in out
    # Rules as the user types them: one backslash, not repr's two.
    assert "rule '^module\\.' -> ''  [rust]" in out and "\\\\" not in out
    assert len(RATIO.findall(out)) == 2


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


# --- demo, help, errors and the console script ------------------------------------------------

CONSOLE = str(Path(sys.executable).with_name("ckptmap"))


# "ckptmap 12x faster", "ckptmap 1.05x slower": who, by how much, which way.
RATIO = re.compile(r"ckptmap \d+(\.\d+)?x (faster|slower)$", re.MULTILINE)


def _timed_lines(out: str, section: str) -> list[str]:
    """The lines of one section of the demo's output (up to the next blank line)."""
    after = out.split(section, 1)[1]
    return after.split("\n\n", 1)[0].splitlines()[1:]


def test_demo_tiny_loads_and_checks_equal(capsys, tmp_path):
    assert main(["demo", "--size", "tiny", "--keep", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "results identical (parameters equal): yes" in out
    assert "encoder.layers.{0,1}.aux.weight  [2 keys]" in out
    assert "torch's load_state_dict agrees: 4 unexpected, 0 missing" in out
    for rule in (
        "'^module\\.' -> ''",
        "'^backbone\\.' -> 'encoder.'",
        "'\\.w(\\d)\\.' -> '.proj\\1.'",
    ):
        assert f"  {rule}  [rust]" in out
    # End to end: each file, ckptmap first, then each other loader with its ratio to ckptmap.
    lines = _timed_lines(out, "end to end: from the file to the loaded model")
    loaders = [line.split()[0] for line in lines if line.startswith("    ")]
    mmengine = importlib.util.find_spec("mmengine") is not None
    # Without mmengine, a line after torch's says how to install it.
    expected = ["ckptmap", "mmengine", "torch"] if mmengine else ["ckptmap", "torch", "mmengine"]
    assert loaders[:3] == expected and loaders[3:] == ["ckptmap", "torch", "mmengine"]
    assert "load_checkpoint(model, 'epoch_12.pth', revise_keys=rules)" in out
    assert "load_checkpoint(model, 'epoch_12.safetensors', revise_keys=rules)" in out
    assert "torch.load(mmap=True, weights_only=True), re.sub, load_state_dict" in out
    timed = [line for line in lines if re.search(r"\d s( |$)", line)]
    assert len(timed) == (5 if mmengine else 4)
    assert all(bool(RATIO.search(line)) == (line.split()[0] != "ckptmap") for line in timed)
    # Key work, labelled as such, with its own ratios.
    key_work = _timed_lines(out, "key work alone")
    assert len(key_work) == 2 and all(RATIO.search(line) for line in key_work)
    assert "load_state_dict of 65 tensors" in key_work[0]
    assert (tmp_path / "epoch_12.pth").is_file()
    # The kept checkpoint diffs clean against the inference model under the demo's rules.
    args = [
        "diff",
        str(tmp_path / "epoch_12.safetensors"),
        "--against",
        str(tmp_path / "epoch_12.pth"),
    ]
    assert main(args) == 0


def test_demo_fails_when_a_loaded_model_differs(capsys, monkeypatch):
    from ckptmap.cli import demo

    real = demo._torch_load

    def off_by_one(model, path, out):
        parts = real(model, path, out)
        with torch.no_grad():
            next(model.parameters()).add_(1)  # one tensor no longer the source's
        return parts

    monkeypatch.setattr(demo, "_torch_load", off_by_one)
    assert main(["demo", "--size", "tiny"]) == 1
    out = capsys.readouterr().out
    assert "results identical (parameters equal): NO (torch .pth; torch .safetensors)" in out


def test_demo_wording():
    from ckptmap.cli.demo import typed, verdict

    assert verdict(10.0, 1.0) == "ckptmap 10x faster"
    assert verdict(3.3, 1.0) == "ckptmap 3.3x faster"
    assert verdict(1.02, 1.0) == "ckptmap 1.02x faster"
    assert verdict(1.0, 2.0) == "ckptmap 2.0x slower"
    assert typed(r"^module\.") == r"'^module\.'"
    assert typed("") == "''"
    assert typed("it's") == '"it\'s"'
    assert typed("""'"'""") == repr("""'"'""")


def test_demo_size_argument():
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--size", "huge"])
    assert exc.value.code == 2


@pytest.mark.parametrize("command", ["demo", "inspect", "diff", "convert"])
def test_help_everywhere(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--debug" in out
    if command == "diff":
        assert "exit status" in out and "2  usage error" in out


def test_debug_shows_the_traceback(tmp_path):
    missing = str(tmp_path / "missing.pth")
    with pytest.raises(FileNotFoundError):
        main(["convert", missing, str(tmp_path / "o.pth"), "--debug"])
    with pytest.raises(FileNotFoundError):
        main(["--debug", "diff", missing, "--against", missing])


def test_console_script_end_to_end(tmp_path):
    import torch

    assert os.access(CONSOLE, os.X_OK)
    sd = {"module.w": torch.ones(2, 3), "module.b": torch.zeros(2)}
    src = tmp_path / "a.pth"
    torch.save({"meta": {"epoch": 1}, "state_dict": sd}, src)
    out = tmp_path / "a.safetensors"
    proc = subprocess.run(
        [CONSOLE, "convert", str(src), str(out), "--revise", r"^module\.=>", "--dtype", "bf16"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "2 floating-point cast to bfloat16" in proc.stdout
    proc = subprocess.run(
        [CONSOLE, "diff", str(src), "--against", str(out), "--json"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 1 and proc.stderr == ""
    doc = json.loads(proc.stdout)
    assert doc["missing"] == ["w", "b"] or sorted(doc["missing"]) == ["b", "w"]
    proc = subprocess.run(
        [CONSOLE, "diff", str(tmp_path / "nope.pth"), "--against", str(out)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("ckptmap: error:") and proc.stderr.count("\n") == 1
    assert "Traceback" not in proc.stderr


def test_allow_takes_named_allowlists_and_dotted_names():
    from ckptmap.cli import build_parser
    from ckptmap.formats import allowlist

    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name in ("inspect", "diff", "convert"):
        allow = next(a for a in commands.choices[name]._actions if a.dest == "allow")
        assert allow.choices is None, name
        for good in (*allowlist.BY_NAME, "argparse.Namespace"):
            assert allow.type(good) == good
        for bad in ("os.system", "builtins.eval", "no_such_module.Thing", "Namespace"):
            with pytest.raises(argparse.ArgumentTypeError):
                allow.type(bad)
    assert allowlist.globals_for(["numpy"]) == list(allowlist.numpy_globals())


def test_bench_runs_the_checkouts_report(capsys, monkeypatch, tmp_path):
    from ckptmap.cli import bench

    root = bench.find_checkout()
    assert root is not None and (root / "benches" / "report.py").is_file()
    # A checkout of our own whose report script records how it was called.
    (tmp_path / "pyproject.toml").write_text("")
    (tmp_path / "benches" / "results").mkdir(parents=True)
    calls = tmp_path / "calls.txt"
    (tmp_path / "benches" / "report.py").write_text(
        f"import sys\nopen({str(calls)!r}, 'a').write(' '.join(sys.argv[1:]) + '\\n')\n"
    )
    monkeypatch.setattr(bench, "find_checkout", lambda: tmp_path)
    # --no-run before any run: a clear message, nothing run.
    assert main(["bench", "--no-run"]) == 1
    err = capsys.readouterr().err
    assert "no benchmark results to render yet" in err and "Traceback" not in err
    assert not calls.exists()
    (tmp_path / "benches" / "results" / "raw.json").write_text("{}")
    assert main(["bench", "--no-run"]) == 0
    assert main(["bench", "--", "-k", "keys"]) == 0
    assert calls.read_text().splitlines() == ["--no-run", "-- -k keys"]


def test_bench_is_not_offered_without_a_checkout(capsys, monkeypatch):
    # Installed from a wheel there is no benches/ folder to run.
    from ckptmap.cli import bench

    monkeypatch.setattr(bench, "find_checkout", lambda: None)
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    assert "bench" not in capsys.readouterr().out
    with pytest.raises(SystemExit) as info:
        main(["bench"])
    assert info.value.code == 2
    assert "invalid choice: 'bench'" in capsys.readouterr().err
