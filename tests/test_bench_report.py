"""benches/report.py: what the benchmark report says, and that the README shows exactly that.

No benchmark runs here: the results are small files written by the tests (or the committed
``benches/results/raw.json``), rendered by the report's own functions.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

CHECKOUT = Path(__file__).resolve().parents[1]
SCRIPT = CHECKOUT / "benches" / "report.py"


def _load_report() -> Any:
    spec = importlib.util.spec_from_file_location("bench_report", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


report = _load_report()


def bench(
    group: str,
    impl: str,
    call: str,
    best: float,
    *,
    semantics: str = "copy",
    kind: str = "end to end",
    rounds: int = 3,
    warmup: int = 1,
    **extra: Any,
) -> dict[str, Any]:
    """One pytest-benchmark entry, labelled as benches/harness.py labels it."""
    return {
        "group": group,
        "name": f"test_{impl}",
        "stats": {"min": best, "median": best * 1.1, "rounds": rounds},
        "extra_info": {
            "impl": impl,
            "call": call,
            "semantics": semantics,
            "kind": kind,
            "rounds": rounds,
            "warmup_rounds": warmup,
            **extra,
        },
    }


def fake_results(**env: Any) -> dict[str, Any]:
    environment = {
        "cpu": "Test CPU 9000",
        "cores": 2,
        "ram_gib": 23.5,
        "system": "Linux 6.1 x86_64",
        "versions": {
            "python": "3.11.7",
            "torch": "2.15.0",
            "mmengine-lite": "0.10.7",
            "safetensors": "0.8.0",
            "ckptmap": "0.1.0",
        },
        "commit": "abcdef1234567890",
        "uncommitted_changes": False,
        "scale": "full",
        "started": "2001-02-03T04:05:06+00:00",
        "load_1min": {"min": 0.1, "max": 0.3, "mean": 0.2, "samples": 9},
        **env,
    }
    return {
        "datetime": "2001-02-03T05:00:00+00:00",
        "machine_info": {"ckptmap": environment},
        "benchmarks": [
            bench("moe .pth", "ckptmap", "`load_checkpoint(model, f)`", 1.0),
            bench(
                "moe .pth",
                "ckptmap",
                "`load_checkpoint(model, f, assign=True)`",
                1.0,
                semantics="assign",
            ),
            bench(
                "moe .pth",
                "mmengine",
                "`load_checkpoint(model, f)`",
                10.0,
                peak_extra_anon_mib=2048.0,
                peak_extra_rss_mib=2050.0,
            ),
            bench(
                "moe .pth",
                "torch",
                "`torch.load` + `load_state_dict(sd, assign=True)`",
                0.5,
                semantics="assign",
                note="torch: the best practice",
            ),
            bench("rules", "ckptmap", "`KeyRules.apply`", 0.1, kind="key work"),
            bench("rules", "ckptmap", "`revise_keys`", 0.2, kind="key work"),
            bench("rules", "python", "`re.sub` loop", 1.0, kind="key work"),
            bench(
                "save 2 GiB",
                "ckptmap",
                "`save_checkpoint(sharded)`",
                3.0,
                kind="save",
                semantics="sharded",
            ),
            bench(
                "save 2 GiB",
                "ckptmap",
                "`save_checkpoint('w.pth')`",
                3.0,
                kind="save",
                semantics=".pth",
            ),
            bench(
                "save 2 GiB",
                "torch",
                "`torch.save` + fsync",
                6.0,
                kind="save",
                semantics=".pth",
                rounds=1,
                warmup=0,
            ),
        ],
        "ckptmap_report": {
            "command": "python benches/report.py",
            "pytest_exit": 0,
            "criterion": [
                {
                    "id": "rules/apply 3 rules to 1M keys",
                    "median_ns": 2.21e8,
                    "median_ci_ns": [2.1e8, 2.3e8],
                },
            ],
        },
    }


def table_rows(text: str) -> list[list[str]]:
    """The comparison tables' rows: scenario, semantics, ckptmap call and time, the other
    side and its time, the verdict, the rounds."""
    rows = [
        [cell.strip() for cell in line.strip("|").split("|")]
        for line in text.splitlines()
        if line.startswith("| ") and not line.startswith("|---")
    ]
    return [row for row in rows if len(row) == 8]


def test_renders_the_stored_machine_versions_and_date():
    text = report.render_markdown(fake_results())
    assert "Measured 2001-02-03 04:05 UTC on Test CPU 9000 (2 cores, 23.5 GiB RAM" in text
    assert "Python 3.11.7, torch 2.15.0, mmengine 0.10.7, safetensors 0.8.0" in text
    assert "ckptmap 0.1.0 at commit abcdef1234" in text
    assert "0.1 to 0.3" in text and "busy" not in text and "Smoke run" not in text


def test_ratio_is_the_others_time_over_ckptmaps_and_says_which_way():
    assert report.fmt_ratio(33.1) == "33x faster"
    assert report.fmt_ratio(2.5) == "2.5x faster"
    assert report.fmt_ratio(1.0) == "1.00x faster"
    assert report.fmt_ratio(0.5) == "2.0x slower"
    assert report.fmt_ratio(0.04) == "25x slower"


def test_rows_pair_by_semantics_and_every_variant_is_its_own_row():
    rows = table_rows(report.render_markdown(fake_results()))
    verdicts = {(r[2], r[4]): r[6] for r in rows}
    # copy against copy only: mmengine's copying load is never set against an assign row.
    assert verdicts[("`load_checkpoint(model, f)`", "mmengine `load_checkpoint(model, f)`")] == (
        "10x faster"
    )
    assign = "torch `torch.load` + `load_state_dict(sd, assign=True)`"
    assert verdicts[("`load_checkpoint(model, f, assign=True)`", assign)] == "2.0x slower"
    assert sum(assign in r for r in rows for r in r) == 1
    # Two ckptmap variants: two rows, each with its own ratio (never the best of the two).
    assert verdicts[("`KeyRules.apply`", "python `re.sub` loop")] == "10x faster"
    assert verdicts[("`revise_keys`", "python `re.sub` loop")] == "5.0x faster"


def test_unequal_rounds_are_flagged_and_rows_without_a_counterpart_shown():
    rows = table_rows(report.render_markdown(fake_results()))
    save = next(r for r in rows if r[4].startswith("torch `torch.save`"))
    assert save[6] == "2.0x faster" and "unequal!" in save[7]
    sharded = next(r for r in rows if r[2] == "`save_checkpoint(sharded)`")
    assert sharded[6] == "no counterpart" and sharded[7] == "3+1"


def test_memory_criterion_and_notes_are_rendered():
    text = report.render_markdown(fake_results())
    assert "| moe .pth | mmengine `load_checkpoint(model, f)` | 2.00 GiB | 2.00 GiB |" in text
    assert "| rules/apply 3 rules to 1M keys | 221.0 ms | 210.0 ms to 230.0 ms |" in text
    assert "- torch: the best practice" in text
    for title in ("End to end", "Key work alone", "Saving", "Rust core alone"):
        assert f"### {title}" in text


def test_busy_machines_small_sizes_and_incomplete_runs_are_said():
    busy = fake_results(load_1min={"min": 9.5, "max": 11.2, "mean": 10.0, "samples": 3})
    assert "**the machine was busy**" in report.render_markdown(busy)
    assert "**Smoke run at reduced sizes**" in report.render_markdown(fake_results(scale="small"))
    failed = fake_results()
    failed["ckptmap_report"]["pytest_exit"] = 1
    assert "**Incomplete run** (pytest exit status 1)" in report.render_markdown(failed)
    old = {"datetime": "2001-02-03T05:00:00+00:00", "benchmarks": []}
    assert "record no machine details" in report.render_markdown(old)


def test_no_run_renders_stored_results_not_todays_machine(tmp_path, capsys):
    path = tmp_path / "raw.json"
    path.write_text(json.dumps(fake_results()))
    assert report.main(["--no-run", "--results", str(path)]) == 0
    out = capsys.readouterr().out
    assert "2001-02-03 04:05 UTC on Test CPU 9000" in out


def test_no_run_without_results_says_what_to_do(tmp_path):
    missing = tmp_path / "raw.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--no-run", "--results", str(missing)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 1
    assert "No benchmark results yet" in proc.stderr and "make bench" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_readme_section_is_rewritten_between_the_markers(tmp_path, capsys):
    results = tmp_path / "raw.json"
    results.write_text(json.dumps(fake_results()))
    readme = tmp_path / "README.md"
    head = "# x\n\n## Benchmarks\n\nhand-written\n\n"
    readme.write_text(f"{head}{report.BEGIN}\nold\n{report.END}\n\n## Next\n")
    args = ["--no-run", "--results", str(results), "--readme-path", str(readme)]
    assert report.main([*args, "--check-readme"]) == 1
    assert report.main([*args, "--readme"]) == 0
    text = readme.read_text()
    assert text.startswith(head) and text.endswith(f"{report.END}\n\n## Next\n")
    assert "old" not in text and report.render_markdown(fake_results()) in text
    assert report.main([*args, "--check-readme"]) == 0
    assert report.main([*args, "--readme"]) == 0 and readme.read_text() == text  # idempotent
    readme.write_text("# no markers\n")
    capsys.readouterr()
    assert report.main([*args, "--readme"]) == 1
    assert "lacks the markers" in capsys.readouterr().err


def test_the_readme_shows_the_committed_results():
    readme = (CHECKOUT / "README.md").read_text()
    assert report.current_readme_body(readme) == report.stored_body(report.RAW), (
        "README.md's Benchmarks tables differ from benches/results/raw.json: run "
        "`python benches/report.py --no-run --readme`"
    )


def test_every_benchmark_row_is_labelled_through_the_harness():
    # A row timed with benchmark.pedantic directly would carry no impl, call, semantics or
    # rounds: the report could not pair it honestly.
    for path in sorted((CHECKOUT / "benches").glob("test_bench_*.py")):
        source = path.read_text()
        assert not re.search(r"(?<![.\w])benchmark(\.pedantic)?\(", source), path.name
        assert re.search(r"\btimed\(", source), path.name


def test_the_report_knows_every_kind_a_row_can_have():
    spec = importlib.util.spec_from_file_location(
        "bench_harness", CHECKOUT / "benches" / "harness.py"
    )
    assert spec is not None and spec.loader is not None
    harness = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = harness  # its dataclasses look their module up there
    try:
        spec.loader.exec_module(harness)
    finally:
        del sys.modules[spec.name]
    assert harness.KINDS == report.KINDS
    assert set(report.KIND_TITLES) == set(report.KIND_INTROS) == set(report.KINDS)
