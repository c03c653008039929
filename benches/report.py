"""Runs the side-by-side benchmarks and renders them: the report, the chart, the README tables.

    python benches/report.py                 # criterion + every pytest-benchmark suite, then render
    python benches/report.py --readme        # ... and rewrite the README's Benchmarks tables
    python benches/report.py --no-run        # render the stored results again (their machine, date)
    python benches/report.py --no-run --readme   # README tables from the stored results
    python benches/report.py --check-readme  # exit 1 if the README's tables differ from them
    python benches/report.py --small         # every size reduced: proves the machinery, fast
    python benches/report.py -- -k e2e       # extra pytest arguments

The results live in ``benches/results/raw.json``: pytest-benchmark's JSON (every round's time
of every row) with, under ``machine_info["ckptmap"]``, the machine, versions, commit, scale
and load average recorded while the benchmarks ran (``benches/conftest.py``), and under
``"ckptmap_report"`` the Rust criterion estimates and the exit status of the run. Rendering
never reads the current machine: a re-rendered report says where and when it was measured.

Rows come labelled by `benches/harness.py` (who runs what call, with which semantics, of
which kind). The report pairs each ckptmap row with every other row of its group that has the
same semantics, and shows ratio = the other's time / ckptmap's time ("N x faster" when above
1, "N x slower" below), each row's best of its timed rounds. Rows of unequal rounds are
flagged, not hidden; rows with no counterpart are shown alone.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCHES = Path(__file__).resolve().parent
CHECKOUT = BENCHES.parent
RESULTS = BENCHES / "results"
RAW = RESULTS / "raw.json"
LATEST = RESULTS / "latest.md"
CHART = RESULTS / "ratios.png"
README = CHECKOUT / "README.md"
BEGIN = (
    "<!-- benchmarks:begin: generated from benches/results/raw.json by benches/report.py;"
    " edit those, not this -->"
)
END = "<!-- benchmarks:end -->"
# The order the suites run in: quick ones first, the memory-hungry saves last.
SUITES = (
    "test_bench_keys.py",
    "test_bench_load.py",
    "test_bench_e2e.py",
    "test_bench_pth_reader.py",
    "test_bench_safetensors.py",
    "test_bench_remote.py",
    "test_bench_save.py",
)
CRITERION_TIMES = ("--warm-up-time", "1", "--measurement-time", "3")
KINDS = ("end to end", "key work", "format", "remote", "save")
KIND_TITLES = {
    "end to end": "End to end: a checkpoint file into a model",
    "key work": "Key work alone (in memory, no file)",
    "format": "One format's reader",
    "remote": "Remote checkpoints",
    "save": "Saving",
}
KIND_INTROS = {
    "end to end": (
        "From the path to the loaded model, the call a user makes; the model is built "
        "beforehand (not timed) and the file is in the page cache. *copy* rows copy into the "
        "model's parameters, *assign* rows make the parameters the loaded tensors (views of a "
        "memory map where the reader allows it: pages are read when first used, so a model "
        "that reads every weight afterwards pays for them then)."
    ),
    "key work": (
        "One step on data already in memory: what grows with the number of keys. These are "
        "not end-to-end times: the rows above are."
    ),
    "format": "One format's reading alone, into or beside a model built beforehand.",
    "remote": (
        "From a URI served on 127.0.0.1 (no network in the way): what a load transfers and how "
        "long it takes."
    ),
    "save": (
        "A state dict written until durable: ckptmap fsyncs before returning, so every other "
        "row includes an fsync of the files it wrote."
    ),
}
NO_RESULTS = (
    "No benchmark results yet ({path} is missing): run `make bench` (or "
    "`python benches/report.py`) on a quiet machine first."
)


class NoResultsError(Exception):
    """There is no results file to render."""


# --- reading the results -------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One benchmark: who ran what, and how fast."""

    group: str
    kind: str
    impl: str
    call: str
    semantics: str
    note: str
    best_s: float
    rounds: int
    warmup: int
    memory: dict[str, float] = field(default_factory=dict)

    @property
    def ours(self) -> bool:
        return self.impl == "ckptmap"

    @property
    def who(self) -> str:
        return f"{self.impl} {self.call}".strip()


def load_results(path: Path = RAW) -> dict[str, Any]:
    """The stored results; `NoResultsError` when there are none."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise NoResultsError(NO_RESULTS.format(path=_shown(path))) from None
    return json.loads(text)


def _shown(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(CHECKOUT))
    except ValueError:
        return str(path)


def rows_of(raw: dict[str, Any]) -> list[Row]:
    """Every benchmark of `raw`, in the order it ran."""
    rows = []
    for bench in raw.get("benchmarks", []):
        info = bench.get("extra_info", {})
        stats = bench["stats"]
        memory = {k: float(v) for k, v in info.items() if k.startswith("peak_")}
        rows.append(
            Row(
                group=bench.get("group") or bench["name"],
                kind=info.get("kind", "key work"),
                impl=info.get("impl", "?"),
                call=info.get("call", bench["name"]),
                semantics=info.get("semantics", ""),
                note=info.get("note", ""),
                best_s=float(stats["min"]),
                rounds=int(stats["rounds"]),
                warmup=int(info.get("warmup_rounds", 0)),
                memory=memory,
            )
        )
    return rows


def groups_of(rows: Iterable[Row]) -> dict[str, list[Row]]:
    groups: dict[str, list[Row]] = {}
    for row in rows:
        groups.setdefault(row.group, []).append(row)
    return groups


@dataclass(frozen=True)
class Pair:
    """A ckptmap row and a row it is compared with (either may be absent: shown alone)."""

    group: str
    ours: Row | None
    theirs: Row | None

    @property
    def ratio(self) -> float | None:
        """The other row's best time over ckptmap's: above 1, ckptmap is faster."""
        if self.ours is None or self.theirs is None:
            return None
        return self.theirs.best_s / self.ours.best_s

    @property
    def equal_rounds(self) -> bool:
        if self.ours is None or self.theirs is None:
            return True
        a, b = self.ours, self.theirs
        return (a.rounds, a.warmup) == (b.rounds, b.warmup)


def pairs_of(group: str, rows: list[Row]) -> list[Pair]:
    """Each ckptmap row against every other row of the same semantics; the rest alone."""
    pairs = []
    paired: set[int] = set()
    for ours in rows:
        if not ours.ours:
            continue
        mates = [j for j, r in enumerate(rows) if not r.ours and r.semantics == ours.semantics]
        pairs += [Pair(group, ours, rows[j]) for j in mates]
        if not mates:
            pairs.append(Pair(group, ours, None))
        paired.update(mates)
    pairs += [Pair(group, None, r) for j, r in enumerate(rows) if not r.ours and j not in paired]
    return pairs


# --- formatting ----------------------------------------------------------------------------------


def fmt_time(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds * 1e6:.0f} µs"


def fmt_ratio(ratio: float) -> str:
    """'12x faster', '1.3x slower': ratio = the other's time / ckptmap's time."""
    factor = ratio if ratio >= 1 else 1 / ratio
    if factor >= 10:
        text = f"{factor:.0f}x"
    elif factor >= 2:
        text = f"{factor:.1f}x"
    else:
        text = f"{factor:.2f}x"
    return f"{text} faster" if ratio >= 1 else f"{text} slower"


def fmt_mib(mib: float) -> str:
    if abs(mib) < 1:
        return "0"
    if abs(mib) >= 1024:
        return f"{mib / 1024:.2f} GiB"
    return f"{mib:,.0f} MiB"


def fmt_rounds(pair: Pair) -> str:
    """``3+1`` (timed + warm-up rounds); both sides' when they differ, flagged."""
    texts = [f"{r.rounds}+{r.warmup}" for r in (pair.ours, pair.theirs) if r is not None]
    return texts[0] if pair.equal_rounds else f"{texts[0]} vs {texts[1]} (unequal!)"


def _date(stamp: str | None) -> str:
    if not stamp:
        return "an unrecorded date"
    return stamp.replace("T", " ")[:16] + " UTC"


def environment_lines(raw: dict[str, Any]) -> list[str]:
    """Where, when and with what the results were measured, as stored in them."""
    env = raw.get("machine_info", {}).get("ckptmap")
    if not env:
        return [
            f"Measured {_date(raw.get('datetime'))}; the results record no machine details "
            "(they predate benches/conftest.py): treat them as unverified."
        ]
    v = env.get("versions", {})
    mm = v.get("mmengine-lite") or v.get("mmengine")
    versions = ", ".join(
        f"{name} {version}"
        for name, version in (
            ("Python", v.get("python")),
            ("torch", v.get("torch")),
            ("mmengine", mm),
            ("safetensors", v.get("safetensors")),
        )
        if version
    )
    commit = (env.get("commit") or "unknown")[:10]
    if env.get("uncommitted_changes"):
        commit += " with uncommitted changes"
    ram = f", {env['ram_gib']:g} GiB RAM" if env.get("ram_gib") else ""
    lines = [
        f"Measured {_date(env.get('started') or raw.get('datetime'))} on {env.get('cpu')} "
        f"({env.get('cores')} cores{ram}, {env.get('system')}), by `{_command(raw)}`.",
        f"{versions}; ckptmap {v.get('ckptmap', '?')} at commit {commit}.",
    ]
    load = env.get("load_1min")
    if load:
        busy = load["max"] > 0.5 * (env.get("cores") or 1)
        lines.append(
            f"Load average (1 min) during the run: {load['min']:.1f} to {load['max']:.1f}"
            + (
                f" on {env.get('cores')} cores: **the machine was busy**, so times are "
                "inflated and noisy; each ratio still compares two sides of the same run."
                if busy
                else "."
            )
        )
    if env.get("scale") != "full":
        lines.append(
            "**Smoke run at reduced sizes** (`--small`): these figures show that the "
            "benchmarks run, not how ckptmap compares at the sizes named in the suites."
        )
    return lines


def _command(raw: dict[str, Any]) -> str:
    return raw.get("ckptmap_report", {}).get("command") or "python benches/report.py"


def render_pairs_table(pairs: list[Pair], kind: str) -> list[str]:
    first = "checkpoint" if kind == "end to end" else "scenario"
    lines = [
        f"| {first} | semantics | ckptmap | time | compared with | time | ckptmap is | rounds |",
        "|---|---|---|---:|---|---:|---|---:|",
    ]
    last_group, last_ours = None, None
    for pair in pairs:
        group = pair.group if pair.group != last_group else ""
        ours_cells = ["—", ""]
        if pair.ours is not None:
            ours_cells = [pair.ours.call, fmt_time(pair.ours.best_s)]
            if pair.ours is last_ours and not group:
                ours_cells = ["″", ""]
        theirs_cells = ["—", ""]
        if pair.theirs is not None:
            theirs_cells = [pair.theirs.who, fmt_time(pair.theirs.best_s)]
        verdict = fmt_ratio(pair.ratio) if pair.ratio is not None else "no counterpart"
        semantics = (pair.ours or pair.theirs).semantics or "—"  # type: ignore[union-attr]
        lines.append(
            f"| {group} | {semantics} | {ours_cells[0]} | {ours_cells[1]} | {theirs_cells[0]} "
            f"| {theirs_cells[1]} | {verdict} | {fmt_rounds(pair)} |"
        )
        last_group, last_ours = pair.group, pair.ours
    return lines


def render_memory_table(groups: dict[str, list[Row]]) -> list[str]:
    rows = [r for rs in groups.values() for r in rs if r.memory]
    if not rows:
        return []
    lines = [
        "",
        "Peak memory of one call in a fresh process, beyond the model or data it starts with "
        "(anonymous: memory the process owns; RSS also counts file pages a memory map read):",
        "",
        "| scenario | who | extra anonymous | extra RSS |",
        "|---|---|---:|---:|",
    ]
    last = None
    for r in rows:
        group = r.group if r.group != last else ""
        anon = fmt_mib(r.memory.get("peak_extra_anon_mib", float("nan")))
        rss = fmt_mib(r.memory.get("peak_extra_rss_mib", float("nan")))
        lines.append(f"| {group} | {r.who} | {anon} | {rss} |")
        last = r.group
    return lines


def render_criterion(raw: dict[str, Any]) -> list[str]:
    estimates = raw.get("ckptmap_report", {}).get("criterion") or []
    if not estimates:
        return []
    lines = [
        "",
        "### Rust core alone (`cargo bench`, criterion, one thread)",
        "",
        "| benchmark | median | 95% interval |",
        "|---|---:|---|",
    ]
    for e in estimates:
        low, high = e["median_ci_ns"]
        lines.append(
            f"| {e['id']} | {fmt_time(e['median_ns'] / 1e9)} | "
            f"{fmt_time(low / 1e9)} to {fmt_time(high / 1e9)} |"
        )
    return lines


def render_markdown(raw: dict[str, Any]) -> str:
    """The whole report: environment, one table per kind, memory, criterion, notes."""
    rows = rows_of(raw)
    groups = groups_of(rows)
    lines = environment_lines(raw)
    lines += [
        "",
        "Times are each row's best of its timed rounds; *rounds* is timed + warm-up rounds, "
        "the same for both sides of a comparison. *ckptmap is N x faster* means the other "
        "side took N times as long.",
    ]
    status = raw.get("ckptmap_report", {})
    if status.get("pytest_exit", 0) != 0:
        lines += [
            "",
            f"**Incomplete run** (pytest exit status {status['pytest_exit']}): rows that "
            "failed or were skipped are missing.",
        ]
    for kind in KINDS:
        kind_groups = {g: rs for g, rs in groups.items() if rs[0].kind == kind}
        if not kind_groups:
            continue
        pairs = [p for g, rs in kind_groups.items() for p in pairs_of(g, rs)]
        lines += ["", f"### {KIND_TITLES[kind]}", "", KIND_INTROS[kind], ""]
        lines += render_pairs_table(pairs, kind)
        lines += render_memory_table(kind_groups)
        notes = sorted({r.note for rs in kind_groups.values() for r in rs if r.note})
        if notes:
            lines += [""] + [f"- {note}" for note in notes]
    lines += render_criterion(raw)
    return "\n".join(lines) + "\n"


# --- the README ----------------------------------------------------------------------------------


def readme_section(text: str) -> tuple[int, int]:
    """The span between the markers (exclusive), or ValueError naming what is missing."""
    start = text.find(BEGIN)
    end = text.find(END)
    if start < 0 or end < start:
        raise ValueError(
            f"README.md lacks the markers `{BEGIN}` ... `{END}` around the Benchmarks tables"
        )
    return start + len(BEGIN), end


def with_readme_section(text: str, body: str) -> str:
    start, end = readme_section(text)
    return text[:start] + "\n" + body + text[end:]


def current_readme_body(text: str) -> str:
    start, end = readme_section(text)
    return text[start:end].removeprefix("\n")


def stored_body(path: Path = RAW) -> str:
    """What the README section must hold: the stored results rendered, or the notice that
    there are none."""
    try:
        return render_markdown(load_results(path))
    except NoResultsError as err:
        return f"{err}\n"


# --- the chart -----------------------------------------------------------------------------------


def render_chart(raw: dict[str, Any], path: Path) -> bool:
    """A horizontal bar chart of the ratios (log scale); False if matplotlib is missing."""
    try:
        import matplotlib
        import matplotlib.ticker

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    pairs = [
        p
        for g, rs in groups_of(rows_of(raw)).items()
        for p in pairs_of(g, rs)
        if p.ratio is not None
    ]
    if not pairs:
        return False
    labels = [
        f"{p.group[:60]} ({p.ours.semantics})\n{p.ours.call} vs {p.theirs.who}".replace("`", "")  # type: ignore[union-attr]
        for p in pairs
    ]
    ratios = [p.ratio for p in pairs]
    fig, ax = plt.subplots(figsize=(11, 0.6 * len(pairs) + 1.5))
    ax.barh(range(len(pairs)), ratios, color=["tab:green" if r >= 1 else "tab:red" for r in ratios])
    ax.set_yticks(range(len(pairs)), labels, fontsize=6)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xlabel("the other's time / ckptmap's time (log scale; right of 1: ckptmap faster)")
    for i, r in enumerate(ratios):
        ax.text(r, i, " " + fmt_ratio(r), va="center", fontsize=6)  # type: ignore[arg-type]
    env = raw.get("machine_info", {}).get("ckptmap", {})
    ax.set_title(f"ckptmap side by side, {_date(env.get('started'))}, {env.get('cpu', '')}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# --- running -------------------------------------------------------------------------------------


def run_criterion() -> tuple[int, list[dict[str, Any]]]:
    """``cargo bench`` into a fresh criterion directory; its estimates, in run order."""
    with tempfile.TemporaryDirectory(prefix="ckptmap-criterion-") as home:
        env = {**os.environ, "CRITERION_HOME": home}
        # Shorter than criterion's defaults (3 s + 5 s per benchmark): these rows are
        # reference figures, and `make bench` should stay within about 20 minutes.
        command = ["cargo", "bench", "-q", "--", *CRITERION_TIMES]
        status = subprocess.call(command, cwd=CHECKOUT, env=env)
        found = []
        for meta in Path(home).rglob("new/benchmark.json"):
            info = json.loads(meta.read_text())
            est = json.loads((meta.parent / "estimates.json").read_text())["median"]
            ci = est["confidence_interval"]
            found.append(
                {
                    "id": info["full_id"],
                    "median_ns": est["point_estimate"],
                    "median_ci_ns": [ci["lower_bound"], ci["upper_bound"]],
                    "mtime": meta.stat().st_mtime,
                }
            )
    found.sort(key=lambda e: e.pop("mtime"))
    return status, found


def run_benchmarks(json_path: Path, pytest_args: list[str]) -> int:
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        *(str(BENCHES / suite) for suite in SUITES),
        "-q",
        "-p",
        "no:cacheprovider",
        "--benchmark-enable",
        "--benchmark-columns=min,median,max,rounds",
        f"--benchmark-json={json_path}",
        *pytest_args,
    ]
    return subprocess.call(cmd, cwd=CHECKOUT)


def measure(args: argparse.Namespace) -> int:
    """Runs everything and stores the results in RAW; the exit status of the run."""
    env_scale = "small" if args.small else os.environ.get("CKPTMAP_BENCH_SCALE", "full")
    os.environ["CKPTMAP_BENCH_SCALE"] = env_scale
    command = " ".join(["python benches/report.py", *(a for a in args.argv if a != "--readme")])
    cargo_status, criterion = (0, [])
    if not args.no_cargo:
        print("==> cargo bench (criterion)", flush=True)
        cargo_status, criterion = run_criterion()
    print("==> pytest-benchmark suites: " + ", ".join(SUITES), flush=True)
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="ckptmap-bench-") as tmp:
        json_path = Path(tmp) / "raw.json"
        status = run_benchmarks(json_path, args.pytest_args)
        if not json_path.exists():
            print(f"benchmarks failed (pytest exit {status}) before any result", file=sys.stderr)
            return status or 1
        raw = json.loads(json_path.read_text())
    raw["ckptmap_report"] = {
        "command": command.strip(),
        "pytest_exit": status,
        "cargo_exit": cargo_status,
        "criterion": criterion,
        "pytest_wall_s": round(time.time() - started, 1),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    RAW.write_text(json.dumps(raw, indent=1, sort_keys=False) + "\n")
    if status != 0 or cargo_status != 0:
        print(
            f"benchmarks incomplete (pytest exit {status}, cargo exit {cargo_status}); "
            "rendering what ran",
            file=sys.stderr,
        )
        return status or cargo_status
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--no-run", action="store_true", help="render the stored results only")
    parser.add_argument("--readme", action="store_true", help="rewrite README.md's tables")
    parser.add_argument(
        "--check-readme", action="store_true", help="exit 1 if README.md's tables differ"
    )
    parser.add_argument("--small", action="store_true", help="reduced sizes (a smoke run)")
    parser.add_argument("--no-cargo", action="store_true", help="skip the criterion benches")
    parser.add_argument("--results", type=Path, default=RAW, help=argparse.SUPPRESS)
    parser.add_argument("--readme-path", type=Path, default=README, help=argparse.SUPPRESS)
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    args.argv = argv

    try:
        return run(parser, args)
    except ValueError as err:  # the README lacks its markers
        print(err, file=sys.stderr)
        return 1


def run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """Does what the arguments ask; main() turns a README without markers into a message."""
    if args.check_readme:
        text = args.readme_path.read_text()
        if current_readme_body(text) != stored_body(args.results):
            print(
                f"{_shown(args.readme_path)}: the Benchmarks tables differ from "
                f"{_shown(args.results)}; run `python benches/report.py --no-run --readme`",
                file=sys.stderr,
            )
            return 1
        return 0

    status = 0
    if not args.no_run:
        if args.results != RAW:
            parser.error("--results goes with --no-run")
        status = measure(args)
    try:
        raw = load_results(args.results)
    except NoResultsError as err:
        print(err, file=sys.stderr)
        return 1
    table = render_markdown(raw)
    print(table)
    if args.results == RAW:
        LATEST.write_text(table)
        if render_chart(raw, CHART):
            print(f"chart: {_shown(CHART)}")
    if args.readme:
        text = args.readme_path.read_text()
        args.readme_path.write_text(with_readme_section(text, table))
        print(f"rewrote the Benchmarks tables of {_shown(args.readme_path)}")
    return status


if __name__ == "__main__":
    sys.exit(main())
