"""Distributed downloads: a real 2-process gloo group fetching from a server on 127.0.0.1.

Local rank 0 downloads while rank 1 waits; rank 1 then reads the cache, so the server sees one
download. When rank 0's download fails, both ranks raise the same error promptly instead of
rank 1 hanging in a barrier. A download slower than the process group's timeout (3 s here)
succeeds on both ranks: the waiting goes through the store with its own deadline, not a
collective. The scenarios run in one process group to spawn torch once.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from servers import checkpoint_bytes, checkpoint_server, free_port

WORLD_SIZE = 2
JOIN_TIMEOUT_S = 180
#: The process group's timeout: shorter than the slow download below.
GROUP_TIMEOUT_S = 3
SLOW_CHUNKS, SLOW_DELAY_S = 10, 0.7


def _rank_main(rank: int, port: int, urls: list[str], home: str, out_dir: str, ready: Any) -> None:
    os.environ.update(
        CKPTMAP_HOME=home,
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        GLOO_SOCKET_IFNAME="lo",
    )
    import torch.distributed as dist

    from ckptmap.schemes import CheckpointLoader

    # Both ranks have imported torch before either starts the short-timeout rendezvous.
    ready.wait(JOIN_TIMEOUT_S)
    dist.init_process_group(
        "gloo", rank=rank, world_size=WORLD_SIZE, timeout=timedelta(seconds=GROUP_TIMEOUT_S)
    )
    results = []
    try:
        for url in urls:
            started = time.monotonic()
            try:
                checkpoint = CheckpointLoader.load_checkpoint(url, logger="silent")
                result = {"ok": True, "sum": float(checkpoint["state_dict"]["weight"].sum())}
            except Exception as exc:
                result = {
                    "ok": False,
                    "type": type(exc).__name__,
                    "bases": [cls.__name__ for cls in type(exc).__mro__],
                    "message": str(exc),
                }
            result["elapsed"] = time.monotonic() - started
            results.append(result)
    finally:
        Path(out_dir, f"{rank}.json").write_text(json.dumps(results))
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    body = checkpoint_bytes(7)
    with checkpoint_server() as server:
        good = server.add("/dist/model.pth", body, kind="slow", chunks=4, delay_s=0.05)
        missing = server.add("/dist/missing.pth", kind="status", status=404)
        slow = server.add(
            "/dist/slow.pth",
            checkpoint_bytes(8),
            kind="slow",
            chunks=SLOW_CHUNKS,
            delay_s=SLOW_DELAY_S,
        )
        ctx = multiprocessing.get_context("spawn")
        ready = ctx.Barrier(WORLD_SIZE)
        port = free_port()
        procs = [
            ctx.Process(
                target=_rank_main,
                args=(rank, port, [good, missing, slow], str(root / "home"), str(root), ready),
            )
            for rank in range(WORLD_SIZE)
        ]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join(JOIN_TIMEOUT_S)
        hung = [proc for proc in procs if proc.is_alive()]
        for proc in hung:
            proc.kill()
            proc.join(10)
        assert not hung, "a rank did not finish"
        assert [proc.exitcode for proc in procs] == [0] * WORLD_SIZE
        hits = dict(server.hits)
    results = [json.loads((root / f"{rank}.json").read_text()) for rank in range(WORLD_SIZE)]
    return {"results": results, "hits": hits, "home": root / "home"}


def test_one_download_for_the_whole_group(runs):
    first = [rank_results[0] for rank_results in runs["results"]]
    assert all(r["ok"] for r in first), first
    assert first[0]["sum"] == first[1]["sum"]
    assert runs["hits"]["/dist/model.pth"] == 1
    cached = sorted(p.name for p in runs["home"].rglob("*") if p.is_file())
    assert cached == ["model.pth", "model.pth.sha256", "slow.pth", "slow.pth.sha256"]


def test_a_failed_download_raises_on_every_rank_promptly(runs):
    second = [rank_results[1] for rank_results in runs["results"]]
    for result in second:
        assert not result["ok"]
        assert result["type"] == "RemoteNotFoundError"
        assert "FileNotFoundError" in result["bases"]
        assert "/dist/missing.pth" in result["message"]
        assert result["elapsed"] < 15
    assert runs["hits"]["/dist/missing.pth"] == 1  # only rank 0 asked


def test_a_download_slower_than_the_group_timeout_succeeds_on_every_rank(runs):
    third = [rank_results[2] for rank_results in runs["results"]]
    assert all(r["ok"] for r in third), third  # rank 0 included: no failure after success
    assert third[0]["sum"] == third[1]["sum"]
    # The download really outlasted the group's timeout, on both ranks.
    assert all(r["elapsed"] > GROUP_TIMEOUT_S for r in third), third
    assert runs["hits"]["/dist/slow.pth"] == 1
