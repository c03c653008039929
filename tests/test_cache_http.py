"""The download cache and http(s) loading, against a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from servers import checkpoint_bytes, checkpoint_server, download_worker

from ckptmap.atomic import is_temp_file
from ckptmap.cache import (
    cache_home,
    cached_download,
    expected_hash_from_name,
    url_cache_dir,
)
from ckptmap.errors import (
    ChecksumMismatchError,
    DownloadError,
    IncompleteDownloadError,
    RemoteAccessDenied,
    RemoteNotFoundError,
    RemoteUnavailableError,
    UnexpectedContentError,
    UnsafePathError,
)
from ckptmap.magic import checkpoint_kind
from ckptmap.schemes import CheckpointLoader, load_from_http

FAST = {"backoff_s": 0.0, "max_backoff_s": 0.0, "timeout_s": 10.0}
BODY = checkpoint_bytes(0)
SHA = hashlib.sha256(BODY).hexdigest()


@pytest.fixture
def home(tmp_path, monkeypatch):
    root = tmp_path / "home"
    monkeypatch.setenv("CKPTMAP_HOME", str(root))
    return root


@pytest.fixture
def server():
    with checkpoint_server() as srv:
        yield srv


def files_under(root: Path) -> list[Path]:
    """Cache entries and stray files under `root` (the entries' ``.sha256`` manifests aside)."""
    if not root.exists():
        return []
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix != ".sha256")


def test_cache_home_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("CKPTMAP_HOME", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert cache_home() == tmp_path / "a"
    monkeypatch.setenv("CKPTMAP_HOME", "")
    assert cache_home() == tmp_path / "x" / "ckptmap"
    monkeypatch.delenv("CKPTMAP_HOME")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "h"))
    assert cache_home() == tmp_path / "h" / ".cache" / "ckptmap"


def test_download_is_cached_once(home, server):
    url = server.add(f"/models/tiny-{SHA[:8]}.pth", BODY)
    path = cached_download(url, **FAST)
    assert path.read_bytes() == BODY
    assert path.name == f"tiny-{SHA[:8]}.pth"
    assert path.parent == url_cache_dir(url) and path.is_relative_to(home / "checkpoints")
    assert cached_download(url, **FAST) == path
    assert server.hits[f"/models/tiny-{SHA[:8]}.pth"] == 1
    assert files_under(home) == [path]
    manifest = path.with_name(path.name + ".sha256")
    assert manifest.read_text().startswith(f"{SHA}  {path.name}\n")


def test_same_file_name_from_two_urls_does_not_collide(home, server):
    other = checkpoint_bytes(1)
    a = cached_download(server.add("/v1/model.pth", BODY), **FAST)
    b = cached_download(server.add("/v2/model.pth", other), **FAST)
    assert a != b and a.read_bytes() == BODY and b.read_bytes() == other


def test_load_through_the_registry(home, server):
    url = server.add("/ckpt.pth", BODY)
    checkpoint = CheckpointLoader.load_checkpoint(url, map_location="cpu")
    expected = torch.load(__import__("io").BytesIO(BODY), weights_only=True)
    assert torch.equal(checkpoint["state_dict"]["weight"], expected["state_dict"]["weight"])


def test_hash_in_name_mismatch_names_both_and_caches_nothing(home, server):
    url = server.add("/resnet50-0676ba61.pth", BODY)
    with pytest.raises(ChecksumMismatchError) as info:
        cached_download(url, check_hash=True, **FAST)
    assert "0676ba61" in str(info.value) and SHA in str(info.value)
    assert info.value.expected == "0676ba61" and info.value.actual == SHA
    assert isinstance(info.value, RuntimeError)
    assert files_under(home) == []
    assert server.hits["/resnet50-0676ba61.pth"] == 1  # a mismatch is not retried


@pytest.mark.parametrize("name", ["tiny-abc.pth", "tiny-.pth", "tiny-0676ba6.pth", "tiny.pth"])
def test_fewer_than_8_hex_digits_is_not_a_hash(home, server, name):
    assert expected_hash_from_name(name) is None
    url = server.add(f"/{name}", BODY)
    assert cached_download(url, check_hash=True, **FAST).read_bytes() == BODY


def test_caller_hash(home, server):
    url = server.add("/given.pth", BODY)
    with pytest.raises(ChecksumMismatchError, match="deadbeef"):
        cached_download(url, sha256="deadbeef", **FAST)
    assert files_under(home) == []
    path = cached_download(url, sha256=SHA.upper(), **FAST)
    assert path.read_bytes() == BODY
    # An entry already in the cache is checked against a caller's hash too.
    with pytest.raises(ChecksumMismatchError, match="delete the file"):
        cached_download(url, sha256="deadbeef", **FAST)
    assert path.read_bytes() == BODY


@pytest.mark.parametrize("bad", ["abc", "xyz12345", "0" * 65, ""])
def test_malformed_caller_hash_is_rejected_before_any_request(home, server, bad):
    url = server.add("/m.pth", BODY)
    with pytest.raises(ValueError, match="sha256"):
        cached_download(url, sha256=bad, **FAST)
    assert server.hits["/m.pth"] == 0


def test_check_hash_false_skips_the_name_hash(home, server):
    url = server.add("/resnet50-0676ba61.pth", BODY)
    assert cached_download(url, check_hash=False, **FAST).read_bytes() == BODY


def test_short_body_is_an_error_and_is_retried(home, server):
    url = server.add("/short.pth", BODY, kind="short")
    with pytest.raises(IncompleteDownloadError) as info:
        cached_download(url, retries=2, **FAST)
    assert f"of {len(BODY)} bytes" in str(info.value)
    assert info.value.expected == len(BODY) and info.value.received < len(BODY)
    assert server.hits["/short.pth"] == 3
    assert files_under(home) == []


def test_dropped_connection(home, server):
    url = server.add("/drop.pth", BODY, kind="drop")
    with pytest.raises(RemoteUnavailableError, match=r"drop\.pth"):
        cached_download(url, retries=1, **FAST)
    assert server.hits["/drop.pth"] == 2
    assert files_under(home) == []


def test_body_without_length(home, server):
    url = server.add("/nolength.pth", BODY, kind="nolength")
    assert cached_download(url, **FAST).read_bytes() == BODY


@pytest.mark.parametrize(
    "body",
    [b"<!DOCTYPE html><html><body>Sign in</body></html>", b'{"error": "nope"}', b"", b"hello"],
)
def test_non_checkpoint_bodies_are_not_cached(home, server, body):
    url = server.add("/page.pth", body, headers={"Content-Type": "text/html"})
    with pytest.raises(UnexpectedContentError, match=r"did not return a checkpoint"):
        cached_download(url, **FAST)
    assert files_under(home) == []
    assert server.hits["/page.pth"] == 1


def test_404_and_403(home, server):
    missing = server.add("/gone.pth", kind="status", status=404)
    with pytest.raises(FileNotFoundError) as info:
        cached_download(missing, **FAST)
    assert isinstance(info.value, RemoteNotFoundError) and info.value.status == 404
    assert missing in str(info.value)
    denied = server.add("/secret.pth", kind="status", status=403)
    with pytest.raises(PermissionError) as info:
        cached_download(denied, **FAST)
    assert isinstance(info.value, RemoteAccessDenied) and "403" in str(info.value)
    assert server.hits["/gone.pth"] == 1 and server.hits["/secret.pth"] == 1
    assert files_under(home) == []


@pytest.mark.parametrize("status", [500, 503, 429])
def test_server_errors_are_retried_then_raised(home, server, status):
    url = server.add("/busy.pth", kind="status", status=status, headers={"Retry-After": "0"})
    started = time.monotonic()
    with pytest.raises(RemoteUnavailableError) as info:
        cached_download(url, retries=3, **FAST)
    assert time.monotonic() - started < 10
    assert info.value.status == status and "4 attempts" in str(info.value)
    assert server.hits["/busy.pth"] == 4
    assert files_under(home) == []


def test_other_client_errors_are_not_retried(home, server):
    url = server.add("/teapot.pth", kind="status", status=418)
    with pytest.raises(DownloadError, match="418"):
        cached_download(url, retries=3, **FAST)
    assert server.hits["/teapot.pth"] == 1


def test_flaky_server_succeeds_after_retries(home, server):
    url = server.add("/flaky.pth", BODY, kind="flaky", status=503, fail_times=2)
    assert cached_download(url, retries=2, **FAST).read_bytes() == BODY
    assert server.hits["/flaky.pth"] == 3


def test_backoff_is_bounded(home, server):
    url = server.add("/slowfail.pth", kind="status", status=500, headers={"Retry-After": "60"})
    started = time.monotonic()
    with pytest.raises(RemoteUnavailableError):
        cached_download(url, retries=2, backoff_s=0.01, max_backoff_s=0.05, timeout_s=10)
    assert time.monotonic() - started < 5


def test_refused_connection(home, tmp_path):
    from servers import free_port

    url = f"http://127.0.0.1:{free_port()}/x.pth"
    with pytest.raises(RemoteUnavailableError, match=r"x\.pth"):
        cached_download(url, retries=1, **FAST)
    assert files_under(home) == []


@pytest.mark.parametrize(
    ("path", "file_name"),
    [
        ("/a/..", None),
        ("/dir/", None),
        ("/ok.pth", "../evil.pth"),
        ("/ok.pth", "/tmp/evil.pth"),
        ("/ok.pth", "C:evil.pth"),
        ("/ok.pth", "sub/evil.pth"),
        ("/ok.pth", "a\\..\\evil.pth"),
        ("/ok.pth", "evil\x00.pth"),
        ("/ok.pth", ""),
    ],
)
def test_unsafe_file_names_are_rejected_before_any_request(home, server, path, file_name):
    server.add(path, BODY)
    url = server.url(path)
    with pytest.raises(UnsafePathError):
        cached_download(url, file_name=file_name, **FAST)
    assert sum(server.hits.values()) == 0
    assert not home.exists() or files_under(home) == []


def test_encoded_traversal_stays_a_literal_name(home, server):
    url = server.add("/x/..%2F..%2Fevil.pth", BODY)
    path = cached_download(url, **FAST)
    assert path.parent == url_cache_dir(url) and path.name == "..%2F..%2Fevil.pth"


def test_non_http_urls_are_refused(home):
    for url in ("file:///etc/passwd", "ftp://127.0.0.1/x.pth"):
        with pytest.raises(ValueError, match="http"):
            cached_download(url)


def test_model_dir_and_file_name(tmp_path, server):
    url = server.add("/weights", BODY)
    path = cached_download(url, model_dir=tmp_path / "models", file_name="w.pth", **FAST)
    assert path == (tmp_path / "models" / "w.pth").resolve()
    assert path.read_bytes() == BODY


def test_progress_bar_when_asked(home, server, capsys):
    url = server.add("/bar.pth", BODY)
    cached_download(url, progress=True, **FAST)
    assert "bar.pth" in capsys.readouterr().err


def test_sniffing():
    assert checkpoint_kind(BODY[:16]) == "zip"
    legacy = __import__("io").BytesIO()
    torch.save({"a": torch.ones(1)}, legacy, _use_new_zipfile_serialization=False)
    assert checkpoint_kind(legacy.getvalue()[:16]) == "pickle"
    from safetensors.torch import save

    assert checkpoint_kind(save({"a": torch.ones(1)})[:16]) == "safetensors"
    assert checkpoint_kind(b"<html>") is None
    assert checkpoint_kind((2**40).to_bytes(8, "little") + b"{") is None


def test_errors_pickle_with_their_attributes():
    err = ChecksumMismatchError("boom", url="http://x/y", expected="ab" * 4, actual="cd" * 32)
    copy = pickle.loads(pickle.dumps(err))
    assert type(copy) is ChecksumMismatchError and str(copy) == "boom"
    assert (copy.url, copy.expected, copy.actual, copy.filename) == (
        "http://x/y",
        "ab" * 4,
        "cd" * 32,
        "http://x/y",
    )
    missing = pickle.loads(pickle.dumps(RemoteNotFoundError("gone", url="u", status=404)))
    assert isinstance(missing, FileNotFoundError) and missing.status == 404


def test_concurrent_processes_end_with_one_correct_file(home, server):
    url = server.add("/shared.pth", BODY, kind="slow", chunks=8, delay_s=0.02)
    ctx = multiprocessing.get_context("spawn")
    start, results = ctx.Event(), ctx.Queue()
    workers = [
        ctx.Process(target=download_worker, args=(url, str(home), start, results)) for _ in range(3)
    ]
    for worker in workers:
        worker.start()
    start.set()
    outcomes = [results.get(timeout=60) for _ in workers]
    for worker in workers:
        worker.join(timeout=30)
        assert worker.exitcode == 0
    assert all(kind == "ok" for kind, _ in outcomes), outcomes
    paths = {Path(p) for _, p in outcomes}
    assert len(paths) == 1
    (path,) = paths
    assert path.read_bytes() == BODY
    assert files_under(home) == [path]
    assert 1 <= server.hits["/shared.pth"] <= 3


def _child(code: str, **env: str) -> subprocess.Popen:
    environment = {**os.environ, **env}
    src = str(Path(__file__).resolve().parents[1] / "python")
    environment["PYTHONPATH"] = os.pathsep.join(
        [src, *filter(None, [os.environ.get("PYTHONPATH")])]
    )
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_killed_download_leaves_no_entry_and_its_temp_is_cleaned_later(home, server):
    url = server.add("/killed.pth", BODY, kind="hang_once")
    child = _child(
        f"""
        from ckptmap.cache import cached_download
        cached_download({url!r}, retries=0, timeout_s=30)
        """,
        CKPTMAP_HOME=str(home),
    )
    try:
        assert server.routes["/killed.pth"].half_sent.wait(30)
        directory = url_cache_dir(url)
        deadline = time.monotonic() + 20
        temps: list[Path] = []
        while time.monotonic() < deadline:
            temps = [p for p in files_under(directory) if is_temp_file(p)]
            if temps:
                break
            time.sleep(0.02)
        assert temps, "the child never wrote its temp file"
    finally:
        child.send_signal(signal.SIGKILL)
        child.communicate(timeout=30)
    assert not (directory / "killed.pth").exists()
    assert all(is_temp_file(p) for p in files_under(home))
    # A young temp may belong to a live download: it is kept.
    path = cached_download(url, **FAST)
    assert path.read_bytes() == BODY
    assert any(is_temp_file(p) for p in files_under(home))
    path.unlink()
    cached_download(url, stale_temp_age_s=0.0, **FAST)
    assert files_under(home) == [path]


def test_disk_full_keeps_other_entries_and_leaves_no_temp(home, server):
    big = checkpoint_bytes(2) + b"\0" * 300_000
    url = server.add("/big.pth", big)
    directory = url_cache_dir(url)
    directory.mkdir(parents=True)
    other = directory / "previous.pth"
    other.write_bytes(BODY)
    child = _child(
        f"""
        import resource, signal
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
        from ckptmap.cache import cached_download
        try:
            cached_download({url!r}, retries=0)
        except OSError as err:
            print(type(err).__name__, err)
        """,
        CKPTMAP_HOME=str(home),
    )
    out, err = child.communicate(timeout=60)
    assert child.returncode == 0, err
    assert "big.pth" in out and ("File too large" in out or "No space" in out), out
    assert files_under(home) == [other]
    assert other.read_bytes() == BODY


def test_load_from_http_signature_is_compatible(home, server):
    url = server.add("/compat.pth", BODY)
    checkpoint = load_from_http(url, None, None, False)
    assert set(checkpoint["state_dict"]) == {"weight", "bias"}
