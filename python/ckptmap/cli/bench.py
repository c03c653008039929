"""``ckptmap bench``: the side-by-side benchmarks of a source checkout (what `make bench` runs).

The benchmark suites live in the repository's ``benches/`` folder, which is not installed with
the package; this command finds it beside an editable install (``make build``) and runs
``benches/report.py``, which writes ``benches/results/latest.md`` and ``ratios.png``. Installed
from a wheel, ``ckptmap`` has no checkout and does not offer the command.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path
from typing import Any


def find_checkout() -> Path | None:
    """The source checkout this package runs from (an editable install), if there is one."""
    root = Path(__file__).resolve().parents[3]  # <checkout>/python/ckptmap/cli/bench.py
    if (root / "pyproject.toml").is_file() and (root / "benches" / "report.py").is_file():
        return root
    return None


def run_bench(args: argparse.Namespace) -> int:
    """Runs the benchmarks (or re-renders the last results with ``--no-run``)."""
    root = find_checkout()
    if root is None:
        raise FileNotFoundError(
            "ckptmap bench needs a source checkout (benches/ is not installed with the "
            "package): clone the repository and run `make bench` there"
        )
    if args.no_run and not (root / "benches" / "results" / "raw.json").is_file():
        raise FileNotFoundError(
            f"no benchmark results to render yet ({root / 'benches' / 'results' / 'raw.json'} "
            "is missing): run `ckptmap bench` without --no-run, or `make bench`, first"
        )
    command = [sys.executable, str(root / "benches" / "report.py")]
    if args.no_run:
        command.append("--no-run")
    if args.pytest_args:
        command += ["--", *args.pytest_args]
    return subprocess.call(command)


def add_bench_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Adds the ``bench`` subcommand to `ckptmap`'s argument parser (only offered where
    `find_checkout` finds a checkout)."""
    parser = subparsers.add_parser(
        "bench",
        help="run the benchmarks side by side with mmengine, torch and safetensors",
        description="Runs every pytest-benchmark suite of the checkout's benches/ folder and "
        "writes benches/results/latest.md (a ratio table) and ratios.png. `make bench` also "
        "builds the release extension and runs the Rust criterion benches first.",
    )
    parser.add_argument("--no-run", action="store_true", help="only re-render the last results")
    parser.add_argument(
        "pytest_args", nargs="*", help="after --: extra pytest arguments, e.g. a bench file"
    )
    parser.set_defaults(run=run_bench)
    return parser
