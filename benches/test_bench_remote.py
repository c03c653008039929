"""Remote prefix loads: 10% of a 1 GiB safetensors file over http(s) and S3, by byte range.

Run with ``pytest benches/test_bench_remote.py --benchmark-enable -s`` (skipped otherwise).

The file (1 GiB of random float32 and bfloat16 data, written by safetensors itself) is served
on 127.0.0.1 by an `http.server` with Range support and by a moto S3 server, both counting the
body bytes they send. Per transport:

- ckptmap: ``_load_checkpoint_with_prefix("neck", uri)`` (10% of the bytes, in two runs of the
  file): the header, then the subtree's ranges in parallel. Goal (issue 16): at most 15% of
  the file's bytes transferred, tensors equal to a full load.
- whole download: the same call through the scheme's download cache, as every loader did
  before (and as mmengine does): the whole file is transferred, then read.

Over http both are timed side by side. The S3 figures are bytes only: moto copies the whole
object in memory to answer each ranged GET, so its times measure moto, not the transfer (they
are printed, not benchmarked). The table at the end gives the bytes each transferred, counted at
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
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from servers import (  # tests/servers.py: the counting servers
    SUBTREE,
    checkpoint_server,
    counting_moto_s3_server,
    random_checkpoint,
)

from ckptmap.checkpoint import _load_checkpoint_with_prefix

SIZE = 1 << 30
HTTP = "remote: prefix load of 10% of 1 GiB over http"
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
    if not request.config.getoption("benchmark_enable", False):
        pytest.skip("benchmark: run with --benchmark-enable")
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
def s3_uri(model_file: Path) -> Iterator[tuple[str, Any]]:
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
            yield "s3://bench/model_1gib.safetensors", counter


def check(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(expected)
    assert all(torch.equal(got[k], v) for k, v in expected.items())


def run(
    benchmark: Any,
    name: str,
    load: Callable[[], dict[str, torch.Tensor]],
    sent: Callable[[], int],
    reset: Callable[[], None],
    expected: dict[str, torch.Tensor],
    rounds: int,
    size: int,
    warm: bool = False,
) -> None:
    """Times `load` (or, without `benchmark`, runs it once) and records the bytes sent."""
    if warm:  # the test server hashes the file for its ETag on the first request
        load()
    reset()
    if benchmark is None:
        start = time.perf_counter()
        got = load()
        TIMES[name] = time.perf_counter() - start
    else:
        got = benchmark.pedantic(load, rounds=rounds, warmup_rounds=0)
        benchmark.extra_info["transferred_pct_of_file"] = 100 * sent() / rounds / size
    check(got, expected)
    FIGURES[name] = (sent() // rounds, size)


def whole(uri: str, tmp_path: Path, monkeypatch: Any) -> Callable[[], dict[str, torch.Tensor]]:
    """The prefix load through a fresh download cache each round (a whole download)."""
    from ckptmap import opened

    monkeypatch.setattr(opened, "URI_OPENERS", [])
    counter = iter(range(1000))

    def load() -> dict[str, torch.Tensor]:
        monkeypatch.setenv("CKPTMAP_HOME", str(tmp_path / f"home{next(counter)}"))
        return _load_checkpoint_with_prefix(SUBTREE, uri)

    return load


@pytest.mark.benchmark(group=HTTP)
def test_http_ckptmap_ranges(benchmark, http_url, expected, tmp_path, monkeypatch) -> None:
    url, server = http_url
    monkeypatch.setenv("CKPTMAP_HOME", str(tmp_path / "home"))
    benchmark.extra_info["impl"] = "ckptmap"
    path = "/model_1gib.safetensors"
    load = lambda: _load_checkpoint_with_prefix(SUBTREE, url)  # noqa: E731
    run(benchmark, "http ranges", load, lambda: server.bytes_sent[path], server.reset_counts,
        expected, rounds=3, size=len(server.routes[path].body), warm=True)  # fmt: skip
    assert FIGURES["http ranges"][0] <= 0.15 * FIGURES["http ranges"][1]
    assert not (tmp_path / "home").exists()  # nothing cached


@pytest.mark.benchmark(group=HTTP)
def test_http_whole_download(benchmark, http_url, expected, tmp_path, monkeypatch) -> None:
    url, server = http_url
    benchmark.extra_info["impl"] = "whole download"
    path = "/model_1gib.safetensors"
    run(benchmark, "http whole download", whole(url, tmp_path, monkeypatch),
        lambda: server.bytes_sent[path], server.reset_counts, expected, rounds=1,
        size=len(server.routes[path].body))  # fmt: skip


def test_s3_ckptmap_ranges(model_file, s3_uri, expected, tmp_path, monkeypatch) -> None:
    uri, counter = s3_uri
    monkeypatch.setenv("CKPTMAP_HOME", str(tmp_path / "home"))
    key = "/bench/model_1gib.safetensors"
    load = lambda: _load_checkpoint_with_prefix(SUBTREE, uri)  # noqa: E731
    run(None, "s3 ranges", load, lambda: counter.bytes_sent[key], counter.reset, expected,
        rounds=1, size=model_file.stat().st_size)  # fmt: skip
    assert FIGURES["s3 ranges"][0] <= 0.15 * FIGURES["s3 ranges"][1]
    assert not (tmp_path / "home").exists()


def test_s3_whole_download(model_file, s3_uri, expected, tmp_path, monkeypatch) -> None:
    uri, counter = s3_uri
    key = "/bench/model_1gib.safetensors"
    run(None, "s3 whole download", whole(uri, tmp_path, monkeypatch),
        lambda: counter.bytes_sent[key], counter.reset, expected, rounds=1,
        size=model_file.stat().st_size)  # fmt: skip


def test_report_bytes(capsys: pytest.CaptureFixture[str]) -> None:
    """Prints the bytes each way transferred (runs last in this file)."""
    if not FIGURES:
        pytest.skip("no remote benchmark ran")
    with capsys.disabled():
        print("\nbytes sent by the server for one prefix load of 10% of a 1 GiB file:")
        print(f"  {'(its header)':<22} {HEADER[0]:>14,}")
        for name, (sent, size) in FIGURES.items():
            line = f"  {name:<22} {sent:>14,} of {size:,} ({100 * sent / size:.2f}%)"
            if name in TIMES:
                line += f"  {TIMES[name]:.2f} s on moto"
            print(line)
