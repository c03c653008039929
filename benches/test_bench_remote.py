"""Remote prefix loads: 10% of a 1 GiB safetensors or ``.pth`` file over http(s) and S3, by
byte range.

Run with ``python benches/report.py`` (or ``pytest benches/test_bench_remote.py
--benchmark-enable -s``; skipped otherwise).

The file (1 GiB of random float32 and bfloat16 data, written by safetensors itself) is served
on 127.0.0.1 by an `http.server` with Range support and by a moto S3 server, both counting the
body bytes they send. Per transport:

- ckptmap: ``_load_checkpoint_with_prefix("neck", uri)`` (10% of the bytes, in two runs of the
  file): the header, then the subtree's ranges in parallel. Goal (issue 16): at most 15% of
  the file's bytes transferred, tensors equal to a full load.
- whole download: the same call through the scheme's download cache, as every loader did
  before (and as mmengine does): the whole file is transferred, then read.

The same for a ``.pth`` of the same tensors written by `torch.save` (a Runner-style dict
with ``meta`` and ``state_dict``): ckptmap reads the end of the file, then ``data.pkl``, then
the subtree's records (each record's local header fetched with it).

Over http both are timed side by side, with the same rounds, and each row records the share
of the file the server sent. The S3 figures are bytes only: moto copies the whole object in
memory to answer each ranged GET, so its times measure moto, not the transfer (they are
printed, not benchmarked). The table at the end gives the bytes each transferred, counted at
the server.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from harness import Rounds, Side, require_enabled, sized, timed
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from servers import (  # tests/servers.py: the counting servers
    SUBTREE,
    checkpoint_server,
    counting_moto_s3_server,
    random_checkpoint,
    random_state,
)

from ckptmap.checkpoint import _load_checkpoint_with_prefix

SIZE = sized(1 << 30, 64 << 20)
HTTP = f"prefix load of 10% of a {SIZE >> 20:,} MiB safetensors file over http (loopback)"
HTTP_PTH = f"prefix load of 10% of a {SIZE >> 20:,} MiB .pth (torch.save) over http (loopback)"
ROUNDS = Rounds(3, 1)  # the warm-up also lets the test server hash the file for its ETag
FIGURES: dict[str, tuple[int, int]] = {}
TIMES: dict[str, float] = {}
HEADER: list[int] = []
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


@pytest.fixture(scope="module")
def model_file(request: pytest.FixtureRequest, tmp_path_factory: Any) -> Path:
    require_enabled(request)
    path = tmp_path_factory.mktemp("remote") / "model_1gib.safetensors"
    HEADER.append(len(random_checkpoint(path, SIZE, seed=7)))
    return path


@pytest.fixture(scope="module")
def expected(model_file: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(model_file), "pt") as f:
        names = [n for n in f.keys() if n.startswith(SUBTREE + ".")]
        return {n[len(SUBTREE) + 1 :]: f.get_tensor(n) for n in names}


@pytest.fixture(scope="module")
def http_url(model_file: Path) -> Iterator[tuple[str, Any]]:
    with checkpoint_server() as server:
        url = server.add("/model_1gib.safetensors", model_file.read_bytes(), ranges="bytes")
        yield url, server


@pytest.fixture(scope="module")
def pth_file(request: pytest.FixtureRequest, tmp_path_factory: Any) -> Path:
    require_enabled(request)
    path = tmp_path_factory.mktemp("remote") / "model_1gib.pth"
    torch.save({"meta": {"epoch": 12}, "state_dict": random_state(SIZE, seed=7)}, path)
    return path


@pytest.fixture(scope="module")
def expected_pth(pth_file: Path, expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`expected` in the order of the ``.pth`` (torch.save keeps the dict's order; safetensors
    sorts its tensors)."""
    state = torch.load(pth_file, mmap=True, weights_only=True)["state_dict"]
    lead = SUBTREE + "."
    return {k[len(lead) :]: expected[k[len(lead) :]] for k in state if k.startswith(lead)}


@pytest.fixture(scope="module")
def pth_url(pth_file: Path) -> Iterator[tuple[str, Any]]:
    with checkpoint_server() as server:
        url = server.add("/model_1gib.pth", pth_file.read_bytes(), ranges="bytes")
        yield url, server


@pytest.fixture(scope="module")
def s3_uri(model_file: Path, pth_file: Path) -> Iterator[tuple[str, Any]]:
    import boto3

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    with pytest.MonkeyPatch.context() as patch:
        for name, value in CREDENTIALS.items():
            patch.setenv(name, value)
        with counting_moto_s3_server() as (endpoint, counter):
            patch.setenv("AWS_ENDPOINT_URL", endpoint)
            client = boto3.client("s3", endpoint_url=endpoint)
            client.create_bucket(Bucket="bench")
            client.upload_file(str(model_file), "bench", "model_1gib.safetensors")
            client.upload_file(str(pth_file), "bench", "model_1gib.pth")
            yield "s3://bench/model_1gib.safetensors", counter


def check(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(expected)
    assert all(torch.equal(got[k], v) for k, v in expected.items())


def run(
    benchmark: Any,
    side: Side | None,
    name: str,
    load: Callable[[], dict[str, torch.Tensor]],
    sent: Callable[[], int],
    reset: Callable[[], None],
    expected: dict[str, torch.Tensor],
    size: int,
) -> None:
    """Times `load` (or, without `benchmark`, runs it once) and records the bytes sent by
    the last run."""
    if benchmark is None:
        reset()
        start = time.perf_counter()
        got = load()
        TIMES[name] = time.perf_counter() - start
    else:
        got = timed(benchmark, side, load, ROUNDS, kind="remote", setup=reset)
    check(got, expected)
    FIGURES[name] = (sent(), size)
    if benchmark is not None:
        benchmark.extra_info["note"] = (
            f"{side.impl}: the server sent {FIGURES[name][0]:,} of the file's {size:,} bytes "
            f"({100 * FIGURES[name][0] / size:.2f}%) per load"
        )


def whole(
    uri: str, tmp_path: Path, monkeypatch: Any, reset: Callable[[], None]
) -> tuple[Callable[[], dict[str, torch.Tensor]], Callable[[], None]]:
    """The prefix load through the download cache, and a setup that empties the cache (and
    resets the byte counts) before each round, so that every round downloads the whole file."""
    import shutil

    from ckptmap import opened

    monkeypatch.setattr(opened, "URI_OPENERS", [])
    home = tmp_path / "home"
    monkeypatch.setenv("CKPTMAP_HOME", str(home))

    def setup() -> None:
        shutil.rmtree(home, ignore_errors=True)
        reset()

    return lambda: _load_checkpoint_with_prefix(SUBTREE, uri), setup


@pytest.mark.benchmark(group=HTTP)
def test_http_ckptmap_ranges(benchmark, http_url, expected, tmp_path, monkeypatch) -> None:
    url, server = http_url
    monkeypatch.setenv("CKPTMAP_HOME", str(tmp_path / "home"))
    side = Side("ckptmap", "`_load_checkpoint_with_prefix('neck', url)`: byte ranges", "prefix")
    path = "/model_1gib.safetensors"
    load = lambda: _load_checkpoint_with_prefix(SUBTREE, url)  # noqa: E731
    run(benchmark, side, "http ranges", load, lambda: server.bytes_sent[path],
        server.reset_counts, expected, size=len(server.routes[path].body))  # fmt: skip
    assert FIGURES["http ranges"][0] <= 0.15 * FIGURES["http ranges"][1]
    assert not (tmp_path / "home").exists()  # nothing cached


@pytest.mark.benchmark(group=HTTP)
def test_http_whole_download(benchmark, http_url, expected, tmp_path, monkeypatch) -> None:
    url, server = http_url
    side = Side(
        "whole download",
        "the same call through the download cache: the file whole, then read",
        "prefix",
        "whole download: what loaders without byte ranges do (mmengine's `load_from_http` "
        "downloads the whole file too, and does not read safetensors)",
    )
    path = "/model_1gib.safetensors"
    load, setup = whole(url, tmp_path, monkeypatch, server.reset_counts)
    run(benchmark, side, "http whole download", load, lambda: server.bytes_sent[path], setup,
        expected, size=len(server.routes[path].body))  # fmt: skip


@pytest.mark.benchmark(group=HTTP_PTH)
def test_http_pth_ckptmap_ranges(benchmark, pth_url, expected_pth, tmp_path, monkeypatch) -> None:
    url, server = pth_url
    monkeypatch.setenv("CKPTMAP_HOME", str(tmp_path / "home"))
    side = Side(
        "ckptmap",
        "`_load_checkpoint_with_prefix('neck', url)`: the zip directory, data.pkl, then the "
        "subtree's records",
        "prefix",
    )
    path = "/model_1gib.pth"
    load = lambda: _load_checkpoint_with_prefix(SUBTREE, url)  # noqa: E731
    run(benchmark, side, "http .pth ranges", load, lambda: server.bytes_sent[path],
        server.reset_counts, expected_pth, size=len(server.routes[path].body))  # fmt: skip
    assert FIGURES["http .pth ranges"][0] <= 0.15 * FIGURES["http .pth ranges"][1]
    assert not (tmp_path / "home").exists()  # nothing cached


@pytest.mark.benchmark(group=HTTP_PTH)
def test_http_pth_whole_download(benchmark, pth_url, expected_pth, tmp_path, monkeypatch) -> None:
    url, server = pth_url
    side = Side(
        "whole download",
        "the same call through the download cache: the file whole, then read",
        "prefix",
        "whole download: what mmengine's `_load_checkpoint_with_prefix` does with an http "
        "`.pth` (`load_from_http` downloads the whole file, then `torch.load`s it)",
    )
    path = "/model_1gib.pth"
    load, setup = whole(url, tmp_path, monkeypatch, server.reset_counts)
    run(benchmark, side, "http .pth whole download", load, lambda: server.bytes_sent[path],
        setup, expected_pth, size=len(server.routes[path].body))  # fmt: skip


def test_s3_pth_ckptmap_ranges(pth_file, s3_uri, expected_pth, tmp_path, monkeypatch) -> None:
    uri, counter = s3_uri
    uri = uri.replace(".safetensors", ".pth")
    monkeypatch.setenv("CKPTMAP_HOME", str(tmp_path / "home"))
    load = lambda: _load_checkpoint_with_prefix(SUBTREE, uri)  # noqa: E731
    run(None, None, "s3 .pth ranges", load, lambda: counter.bytes_sent["/bench/model_1gib.pth"],
        counter.reset, expected_pth, size=pth_file.stat().st_size)  # fmt: skip
    assert FIGURES["s3 .pth ranges"][0] <= 0.15 * FIGURES["s3 .pth ranges"][1]
    assert not (tmp_path / "home").exists()


def test_s3_ckptmap_ranges(model_file, s3_uri, expected, tmp_path, monkeypatch) -> None:
    uri, counter = s3_uri
    monkeypatch.setenv("CKPTMAP_HOME", str(tmp_path / "home"))
    key = "/bench/model_1gib.safetensors"
    load = lambda: _load_checkpoint_with_prefix(SUBTREE, uri)  # noqa: E731
    run(None, None, "s3 ranges", load, lambda: counter.bytes_sent[key], counter.reset,
        expected, size=model_file.stat().st_size)  # fmt: skip
    assert FIGURES["s3 ranges"][0] <= 0.15 * FIGURES["s3 ranges"][1]
    assert not (tmp_path / "home").exists()


def test_s3_whole_download(model_file, s3_uri, expected, tmp_path, monkeypatch) -> None:
    uri, counter = s3_uri
    key = "/bench/model_1gib.safetensors"
    load, setup = whole(uri, tmp_path, monkeypatch, counter.reset)
    run(None, None, "s3 whole download", load, lambda: counter.bytes_sent[key], setup,
        expected, size=model_file.stat().st_size)  # fmt: skip


def test_report_bytes(capsys: pytest.CaptureFixture[str]) -> None:
    """Prints the bytes each way transferred (runs last in this file)."""
    if not FIGURES:
        pytest.skip("no remote benchmark ran")
    with capsys.disabled():
        print(f"\nbytes sent by the server for one prefix load of 10% of {SIZE >> 20:,} MiB:")
        print(f"  {'(its header)':<22} {HEADER[0]:>14,}")
        for name, (sent, size) in FIGURES.items():
            line = f"  {name:<22} {sent:>14,} of {size:,} ({100 * sent / size:.2f}%)"
            if name in TIMES:
                line += f"  {TIMES[name]:.2f} s on moto"
            print(line)
