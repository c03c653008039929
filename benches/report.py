"""Runs the side-by-side benchmarks and writes the ratio table and chart.

    python benches/report.py            # run every pytest-benchmark suite, then render
    python benches/report.py --no-run   # render benches/results/raw.json again

Each benchmark group compares ckptmap with the tools it replaces (mmengine, torch,
safetensors, plain Python) in the same run. A benchmark says which it is through
`benchmark.extra_info["impl"]` (else its test name is used); it may add figures such as
`extra_info["peak_rss_mib"]`, which are shown beside the times. Writes
`benches/results/latest.md` (the table the README shows) and `benches/results/ratios.png`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
IMPLS = ("ckptmap", "mmengine", "torch", "safetensors", "python")


@dataclass
class Entry:
    name: str
    impl: str
    min_s: float
    extra: dict[str, float] = field(default_factory=dict)


def impl_of(bench: dict) -> str:
    impl = bench.get("extra_info", {}).get("impl")
    if impl:
        return str(impl)
    name = bench["name"].lower()
    for candidate in IMPLS:
        if candidate in name:
            return candidate
    if any(word in name for word in ("keyrules", "revise_keys", "ours")):
        return "ckptmap"
    return "python"


def load_groups(raw: dict) -> dict[str, list[Entry]]:
    groups: dict[str, list[Entry]] = {}
    for bench in raw.get("benchmarks", []):
        extra = {
            k: float(v)
            for k, v in bench.get("extra_info", {}).items()
            if k != "impl" and isinstance(v, int | float)
        }
        entry = Entry(bench["name"], impl_of(bench), float(bench["stats"]["min"]), extra)
        groups.setdefault(bench.get("group") or bench["name"], []).append(entry)
    return groups


def fmt_time(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds * 1e6:.0f} µs"


def fmt_extra(extra: dict[str, float]) -> str:
    # Memory figures only; other extra_info (key counts, helper timings) stays in raw.json.
    shown = {k: v for k, v in extra.items() if "mib" in k or "pct" in k}
    return ", ".join(f"{k.replace('_', ' ')} {v:,.0f}" for k, v in sorted(shown.items()))


def ratio_rows(groups: dict[str, list[Entry]]) -> list[tuple[str, Entry, Entry, float]]:
    """(group, ckptmap entry, other entry, other time / ckptmap time) for every pair."""
    rows = []
    for group, entries in sorted(groups.items()):
        ours = [e for e in entries if e.impl == "ckptmap"]
        if not ours:
            continue
        best = min(ours, key=lambda e: e.min_s)
        for other in entries:
            if other.impl != "ckptmap":
                rows.append((group, best, other, other.min_s / best.min_s))
    return rows


def machine_line(raw: dict) -> str:
    info = raw.get("machine_info", {})
    cpu = info.get("cpu", {}).get("brand_raw") or platform.processor() or "unknown CPU"
    cores = os.cpu_count()
    try:
        import torch

        torch_version = torch.__version__
    except ImportError:
        torch_version = "absent"
    when = raw.get("datetime", time.strftime("%Y-%m-%d"))[:10]
    return (
        f"{when}, {cpu}, {cores} cores, Python {platform.python_version()}, "
        f"torch {torch_version}, {platform.system()} {platform.machine()}"
    )


def render_markdown(raw: dict) -> str:
    groups = load_groups(raw)
    lines = [
        f"Measured {machine_line(raw)}.",
        "",
        "| scenario | ckptmap | compared with | its time | ckptmap is |",
        "|---|---:|---|---:|---:|",
    ]
    for group, ours, other, ratio in ratio_rows(groups):
        ours_cell = fmt_time(ours.min_s)
        other_cell = fmt_time(other.min_s)
        if fmt_extra(ours.extra):
            ours_cell += f" ({fmt_extra(ours.extra)})"
        if fmt_extra(other.extra):
            other_cell += f" ({fmt_extra(other.extra)})"
        speed = f"{ratio:.1f}x faster" if ratio >= 1 else f"{1 / ratio:.2f}x slower"
        lines.append(f"| {group} | {ours_cell} | {other.impl} | {other_cell} | {speed} |")
    lines.append("")
    lines.append("Times are the best of each benchmark's rounds; `make bench` reproduces them.")
    return "\n".join(lines) + "\n"


def render_chart(raw: dict, path: Path) -> bool:
    """A horizontal bar chart of the ratios (log scale); False if matplotlib is missing."""
    try:
        import matplotlib
        import matplotlib.ticker

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = ratio_rows(load_groups(raw))
    if not rows:
        return False
    labels = [f"{group}\nvs {other.impl}" for group, _, other, _ in rows]
    ratios = [ratio for *_, ratio in rows]
    fig, ax = plt.subplots(figsize=(9, 0.55 * len(rows) + 1.2))
    colors = ["tab:green" if r >= 1 else "tab:red" for r in ratios]
    ax.barh(range(len(rows)), ratios, color=colors)
    ax.set_yticks(range(len(rows)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xlabel("speed-up of ckptmap (reference time / ckptmap time, log scale)")
    for i, r in enumerate(ratios):
        ax.text(r, i, f" {r:.1f}x", va="center", fontsize=7)
    ax.set_title("ckptmap vs mmengine / torch / safetensors / Python")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def run_benchmarks(raw_path: Path, pytest_args: list[str]) -> int:
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        str(Path(__file__).parent),
        "-q",
        "-p",
        "no:cacheprovider",
        "--benchmark-enable",
        f"--benchmark-json={raw_path}",
        *pytest_args,
    ]
    return subprocess.call(cmd)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-run", action="store_true", help="only render the last results")
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    args = parser.parse_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    raw_path = RESULTS / "raw.json"
    if not args.no_run:
        status = run_benchmarks(raw_path, args.pytest_args)
        if status != 0:
            print(f"benchmarks failed (pytest exit {status}); rendering what ran", file=sys.stderr)
    raw = json.loads(raw_path.read_text())
    table = render_markdown(raw)
    (RESULTS / "latest.md").write_text(table)
    print(table)
    if render_chart(raw, RESULTS / "ratios.png"):
        print(f"chart: {RESULTS / 'ratios.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
