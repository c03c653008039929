"""Nothing hangs: FIFOs, sockets and devices (and symlinks to them) are refused at once.

Opening a FIFO for reading blocks until a writer appears, and ``/dev/zero`` never ends, so
every case runs in a child process with a timeout: a hang fails the test (naming the case that
hung) instead of hanging the suite. The cases cover every way a local path reaches ckptmap: a
checkpoint path (`load_file`, `load_checkpoint`, `sniff`, `SafetensorsFile`, ``ckptmap
inspect`` / ``diff``), a shard named by an index, the index itself, a `last_checkpoint`
pointer and its target, the candidates of a work-dir scan, and a download cache entry.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint
from safetensors.torch import save_file

CHILD_TIMEOUT_S = 240

# Runs the cases given as JSON in argv[1]; prints one JSON line before and after each, so a
# hang is pinned to the case that started and never finished.
CHILD = textwrap.dedent(
    """
    import json, logging, os, sys, warnings

    import torch
    from torch import nn

    import ckptmap
    from ckptmap.cache import cached_download
    from ckptmap.formats import load_file
    from ckptmap.formats.safetensors import SafetensorsFile
    from ckptmap.formats.sharded import ShardedCheckpoint
    from ckptmap.formats.sniff import sniff
    from ckptmap.latest import find_latest_checkpoint, is_complete_checkpoint

    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    logging.getLogger("ckptmap").addHandler(Keep())
    logging.getLogger("ckptmap").setLevel(logging.INFO)

    def cli(args):
        import contextlib, io
        from ckptmap.cli import main

        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            status = main(args)
        return {"status": status, "stderr": err.getvalue()}

    def latest(path):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            found = find_latest_checkpoint(path)
        return {"found": found, "warnings": [str(w.message) for w in caught], "log": records}

    RUN = {
        "load_file": lambda p: load_file(p),
        "load_checkpoint": lambda p: ckptmap.load_checkpoint(nn.Linear(2, 2), p),
        "sniff": lambda p: sniff(p),
        "safetensors": lambda p: SafetensorsFile(p),
        "sharded": lambda p: ShardedCheckpoint(p),
        "is_complete": lambda p: is_complete_checkpoint(p),
        "latest": latest,
        "cli": cli,
        "cache": lambda p: cached_download(
            "http://127.0.0.1:9/x/" + os.path.basename(p), model_dir=os.path.dirname(p)
        ),
    }

    for name, kind, path in json.loads(sys.argv[1]):
        print(json.dumps({"case": name, "started": True}), flush=True)
        try:
            out = {"ok": True, "result": RUN[kind](path)}
        except Exception as exc:
            out = {
                "ok": False,
                "type": type(exc).__name__,
                "bases": [c.__name__ for c in type(exc).__mro__],
                "message": str(exc),
            }
        out["case"] = name
        print(json.dumps(out, default=repr), flush=True)
    """
)


def run_cases(cases: list[tuple[str, str, object]]) -> dict[str, dict]:
    """Runs `cases` ((name, entry point, path)) in a child; a hang fails naming the case."""
    try:
        proc = subprocess.run(
            [sys.executable, "-c", CHILD, json.dumps(cases)],
            capture_output=True,
            text=True,
            timeout=CHILD_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired as err:
        out = err.stdout.decode() if isinstance(err.stdout, bytes) else err.stdout or ""
        started = [json.loads(line)["case"] for line in out.splitlines() if '"started"' in line]
        pytest.fail(f"hung in case {started[-1] if started else '?'}")
    assert proc.returncode == 0, proc.stderr
    results = [json.loads(line) for line in proc.stdout.splitlines() if '"started"' not in line]
    return {r["case"]: r for r in results}


@pytest.fixture
def specials(tmp_path: Path):
    """A FIFO, a socket, /dev/zero and symlinks to them, each under a checkpoint-like name."""
    directory = tmp_path / "specials"
    directory.mkdir()
    os.mkfifo(directory / "fifo.pth")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(directory / "socket.pth"))
    (directory / "zero.pth").symlink_to("/dev/zero")
    (directory / "fifo-link.pth").symlink_to(directory / "fifo.pth")
    try:
        yield {
            "fifo": (directory / "fifo.pth", "a FIFO"),
            "socket": (directory / "socket.pth", "a socket"),
            "zero": (directory / "zero.pth", "a character device"),
            "fifo-link": (directory / "fifo-link.pth", "a FIFO"),
            "dev-zero": (Path("/dev/zero"), "a character device"),
        }
    finally:
        sock.close()


def assert_refused(result: dict, path: Path, kind: str) -> None:
    assert not result["ok"], result
    assert result["type"] == "NotARegularFileError", result
    assert {"OSError", "CorruptCheckpointError", "CkptmapError"} <= set(result["bases"])
    assert str(path) in result["message"] and kind in result["message"], result


ENTRIES = ["load_file", "load_checkpoint", "sniff", "safetensors", "sharded"]


def test_checkpoint_paths(specials):
    cases = [
        (f"{entry}:{name}", entry, str(path))
        for entry in ENTRIES
        for name, (path, _) in specials.items()
    ]
    results = run_cases(cases)
    for entry in ENTRIES:
        for name, (path, kind) in specials.items():
            assert_refused(results[f"{entry}:{name}"], path, kind)


def test_a_shard_named_by_an_index_and_the_index_itself(tmp_path, specials):
    directory = tmp_path / "sharded"
    directory.mkdir()
    save_file({"a": torch.ones(2)}, str(directory / "good.safetensors"))
    os.mkfifo(directory / "bad.safetensors")
    index = directory / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"a": "good.safetensors", "b": "bad.safetensors"}}))
    os.mkfifo(directory / "fifo.index.json")
    # A torch.distributed.checkpoint directory names its data files in .metadata.
    dcp_dir = tmp_path / "dcp"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process"
        torch.distributed.checkpoint.save({"w": torch.ones(3)}, checkpoint_id=str(dcp_dir))
    (data_file,) = dcp_dir.glob("*.distcp")
    data_file.unlink()
    os.mkfifo(data_file)
    cases = [
        ("shard-load", "load_file", str(index)),
        ("shard-open", "sharded", str(index)),
        ("shard-dir", "load_file", str(directory)),
        ("index-fifo", "load_file", str(directory / "fifo.index.json")),
        ("dcp-data", "load_file", str(dcp_dir)),
    ]
    results = run_cases(cases)
    for name in ("shard-load", "shard-open"):
        assert_refused(results[name], directory / "bad.safetensors", "a FIFO")
        assert "bad.safetensors" in results[name]["message"]
    # A directory with a FIFO named like an index and a real index: the real one is used.
    assert_refused(results["shard-dir"], directory / "bad.safetensors", "a FIFO")
    assert_refused(results["index-fifo"], directory / "fifo.index.json", "a FIFO")
    assert_refused(results["dcp-data"], data_file, "a FIFO")
    assert ".metadata" in results["dcp-data"]["message"]


def test_work_dir_pointer_targets_candidates_and_the_pointer_itself(tmp_path, specials):
    work = tmp_path / "work"
    work.mkdir()
    good = work / "epoch_1.pth"
    torch.save({"state_dict": {"w": torch.ones(1)}}, good)
    os.mkfifo(work / "epoch_9.pth")  # a candidate that sorts above the good one
    (work / "epoch_8.pth").symlink_to("/dev/zero")
    cases = []
    for name, (path, _) in specials.items():
        sub = tmp_path / f"work-{name}"
        sub.mkdir()
        torch.save({"state_dict": {"w": torch.ones(1)}}, sub / "epoch_1.pth")
        (sub / "last_checkpoint").write_text(str(path))
        cases.append((f"target-{name}", "latest", str(sub)))
    pointer_fifo = tmp_path / "work-pointer-fifo"
    pointer_fifo.mkdir()
    torch.save({"state_dict": {"w": torch.ones(1)}}, pointer_fifo / "epoch_1.pth")
    os.mkfifo(pointer_fifo / "last_checkpoint")
    (work / "last_checkpoint").write_text(str(work / "epoch_9.pth"))
    cases += [
        ("pointer-fifo", "latest", str(pointer_fifo)),
        ("scan", "latest", str(work)),
        ("complete-fifo", "is_complete", str(work / "epoch_9.pth")),
        ("complete-zero", "is_complete", str(work / "epoch_8.pth")),
    ]
    results = run_cases(cases)
    for name, (path, kind) in specials.items():
        result = results[f"target-{name}"]["result"]
        assert result["found"] == str(tmp_path / f"work-{name}" / "epoch_1.pth")
        (warning,) = result["warnings"]
        assert str(path) in warning and kind in warning and "not a regular file" in warning
    result = results["pointer-fifo"]["result"]
    assert result["found"] == str(pointer_fifo / "epoch_1.pth")
    assert "can not be read" in result["warnings"][0] and "FIFO" in result["warnings"][0]
    result = results["scan"]["result"]
    assert result["found"] == str(good)  # the FIFO and the device were skipped...
    skipped = [line for line in result["log"] if line.startswith("Skipping")]
    assert any("epoch_9.pth" in line and "FIFO" in line for line in skipped)  # ...with a word
    assert any("epoch_8.pth" in line and "character device" in line for line in skipped)
    assert results["complete-fifo"] == {"ok": True, "result": False, "case": "complete-fifo"}
    assert results["complete-zero"]["result"] is False


def test_a_cache_entry(specials):
    # The port is closed: the entry must be refused before any request is made.
    names = ("fifo", "socket", "fifo-link", "zero")
    results = run_cases([(name, "cache", str(specials[name][0])) for name in names])
    for name in ("fifo", "socket", "fifo-link"):
        path, kind = specials[name]
        assert_refused(results[name], path, kind)
        assert "cache entry" in results[name]["message"]
    # A symlink out of the cache directory is refused before its type matters.
    zero = results["zero"]
    assert zero["type"] == "UnsafePathError" and "/dev/zero" in zero["message"], zero


def test_the_command_line(tmp_path, specials):
    good = tmp_path / "good.pth"
    torch.save({"w": torch.ones(1)}, good)
    commands = {
        "inspect": lambda p: ["inspect", p],
        "diff-source": lambda p: ["diff", p, "--against", str(good)],
        "diff-against": lambda p: ["diff", str(good), "--against", p],
    }
    cases = [
        (f"{command}:{name}", "cli", make(str(specials[name][0])))
        for command, make in commands.items()
        for name in ("fifo", "socket", "zero")
    ]
    results = run_cases(cases)
    for command in commands:
        for name in ("fifo", "socket", "zero"):
            path, kind = specials[name]
            result = results[f"{command}:{name}"]["result"]
            assert result["status"] in (1, 2), result
            assert str(path) in result["stderr"] and kind in result["stderr"], result
            assert "not a regular file" in result["stderr"]
