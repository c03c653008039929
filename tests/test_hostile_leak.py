"""Nothing leaks: secrets in URLs never reach a message, and checkpoint keys can not drive the
terminal.

Downloads run against a real server on 127.0.0.1 with a password in the URL or a presigned
query string; every way the URL could surface is collected (the exception, its notes, its
attributes and chained causes, log records at DEBUG, the progress bar) and searched for the
secret. Checkpoints with keys holding ANSI escape sequences, carriage returns, bidirectional
overrides and 100,000-character names are written with torch and safetensors and shown by the
load report, ``ckptmap inspect`` and ``ckptmap diff``.
"""

from __future__ import annotations

import base64
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import save_file
from servers import checkpoint_bytes, checkpoint_server

import ckptmap
from ckptmap.cache import cached_download
from ckptmap.errors import CkptmapError
from ckptmap.redact import redact_text, redact_url
from ckptmap.report import LoadResult, printable
from ckptmap.schemes import CheckpointLoader

FAST = {"backoff_s": 0.0, "max_backoff_s": 0.0, "timeout_s": 10.0}
BODY = checkpoint_bytes(0)
SECRET = "Zq8sEcReT4xw"


# --- redact_url --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://user:pw@host:8080/a.pth?x=1", "https://user:***@host:8080/a.pth?x=1"),
        ("https://ghp_token@github.com/a.pth", "https://***@github.com/a.pth"),
        (
            "https://b.s3.amazonaws.com/k.pth?X-Amz-Algorithm=AWS4-HMAC-SHA256"
            "&X-Amz-Credential=AKIA%2F20240115&X-Amz-Signature=ab12&X-Amz-Expires=60",
            "https://b.s3.amazonaws.com/k.pth?X-Amz-Algorithm=AWS4-HMAC-SHA256"
            "&X-Amz-Credential=***&X-Amz-Signature=***&X-Amz-Expires=60",
        ),
        (
            "https://a.blob.core.windows.net/c/m.pth?sv=1&sig=abc",
            "https://a.blob.core.windows.net/c/m.pth?sv=1&sig=***",
        ),
        (
            "https://cdn/m.pth?Expires=1&Signature=s&Key-Pair-Id=k",
            "https://cdn/m.pth?Expires=1&Signature=***&Key-Pair-Id=***",
        ),
        (
            "https://h/m.pth?token=t&access_token=a&api_key=k",
            "https://h/m.pth?token=***&access_token=***&api_key=***",
        ),
        ("https://h/m.pth#access_token=t", "https://h/m.pth#access_token=***"),
        ("https://h/m.pth?name=resnet&v=2", "https://h/m.pth?name=resnet&v=2"),
        ("s3://bucket/key.pth", "s3://bucket/key.pth"),
        ("/local/path/model.pth", "/local/path/model.pth"),
        ("HTTPS://USER:PW@HOST/x", "https://USER:***@HOST/x"),
    ],
)
def test_redact_url(url, expected):
    assert redact_url(url) == expected


def test_redact_url_of_a_malformed_url_still_masks():
    shown = redact_url("http://user:pw@[::1/x?token=abc")
    assert "pw" not in shown and "abc" not in shown


_SAFE = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_.~", min_size=6, max_size=30)


@given(
    secret=_SAFE,
    name=st.sampled_from(
        ["X-Amz-Signature", "x-amz-security-token", "sig", "Signature", "token", "apikey", "auth"]
    ),
    where=st.sampled_from(["password", "user", "query", "fragment"]),
)
def test_a_secret_never_survives_redaction(secret, name, where):
    url = {
        "password": f"https://me:{secret}@host.example/m.pth",
        "user": f"https://{secret}@host.example/m.pth",
        "query": f"https://host.example/m.pth?a=1&{name}={secret}&b=2",
        "fragment": f"https://host.example/m.pth#{name}={secret}",
    }[where]
    assert secret not in redact_url(url)
    assert secret not in redact_text(f"GET {url}: failed (see {url}).")


# --- every message of a download --------------------------------------------------------------


def _everything_said(exc: BaseException | None, caplog, capsys) -> str:
    """All text a user could see: the exception chain a traceback prints (with notes and
    attributes), log records, stderr (where progress bars go)."""
    parts = [caplog.text, capsys.readouterr().err]
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        parts += [str(exc), repr(exc), *getattr(exc, "__notes__", [])]
        parts += [str(v) for v in vars(exc).values()] if hasattr(exc, "__dict__") else []
        parts += [str(exc.filename)] if isinstance(exc, OSError) else []
        exc = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
    return "\n".join(parts)


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("CKPTMAP_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def server():
    with checkpoint_server() as srv:
        yield srv


def _presigned(url: str) -> str:
    return f"{url}?X-Amz-Credential=AKIA{SECRET}&X-Amz-Signature={SECRET}&token={SECRET}"


def _with_password(url: str) -> str:
    return url.replace("http://", f"http://alice:{SECRET}@")


SCENARIOS = {
    "404": dict(kind="status", status=404),
    "403": dict(kind="status", status=403),
    "503-retried": dict(kind="status", status=503),
    "short-body": dict(body=BODY, kind="short"),
    "html": dict(body=b"<html>login</html>"),
    "bad-length": dict(body=b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n" + BODY, kind="raw"),
    "redirect-to-file": dict(
        kind="status", status=302, headers={"Location": f"file:///etc/passwd?sig={SECRET}"}
    ),
    "name-hash": dict(body=BODY),
}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("dress", [_presigned, _with_password])
def test_no_failure_shows_the_secret(home, server, caplog, capsys, scenario, dress):
    path = "/m-0676ba61.pth" if scenario == "name-hash" else "/m.pth"
    url = dress(server.add(path, **SCENARIOS[scenario]))
    with caplog.at_level(logging.DEBUG, logger="ckptmap"), pytest.raises(CkptmapError) as info:
        CheckpointLoader.load_checkpoint(url) if scenario == "404" else cached_download(
            url, retries=1, progress=True, check_hash=True, **FAST
        )
    said = _everything_said(info.value, caplog, capsys)
    assert SECRET not in said
    assert "m.pth" in str(info.value) or "m-0676ba61.pth" in str(info.value)


def test_a_refused_connection_does_not_show_the_secret(home, caplog, capsys):
    from servers import free_port

    url = _presigned(f"http://alice:{SECRET}@127.0.0.1:{free_port()}/m.pth")
    with caplog.at_level(logging.DEBUG, logger="ckptmap"), pytest.raises(CkptmapError) as info:
        cached_download(url, retries=1, **FAST)
    assert SECRET not in _everything_said(info.value, caplog, capsys)


def test_passwords_become_basic_auth_and_stay_out_of_logs(home, server, caplog, capsys):
    url = _with_password(server.add("/auth.pth", BODY))
    with caplog.at_level(logging.DEBUG, logger="ckptmap"):
        checkpoint = CheckpointLoader.load_checkpoint(url, map_location="cpu")
        cached_download(url, progress=True, **FAST)  # a cache hit
    assert set(checkpoint["state_dict"]) == {"weight", "bias"}
    (request,) = [r for r in server.received if r["path"] == "/auth.pth"]
    expected = base64.b64encode(f"alice:{SECRET}".encode()).decode()
    assert request["Authorization"] == f"Basic {expected}"
    assert "Loads checkpoint by http backend" in caplog.text and "alice:***@" in caplog.text
    assert SECRET not in _everything_said(None, caplog, capsys)


def test_credentials_are_not_carried_to_another_host(home, server):
    with checkpoint_server() as other:
        target = other.add("/elsewhere.pth", BODY).replace("127.0.0.1", "localhost")
        url = _with_password(
            server.add("/hop.pth", kind="status", status=302, headers={"Location": target})
        )
        assert cached_download(url, **FAST).read_bytes() == BODY
        (first,) = server.received
        (second,) = other.received
    assert first["Authorization"].startswith("Basic ")
    assert "Authorization" not in second


def test_an_unknown_scheme_does_not_show_the_secret():
    with pytest.raises(CkptmapError) as info:
        CheckpointLoader.load_checkpoint(f"hdfs://bob:{SECRET}@nn/x.pth?token={SECRET}")
    assert SECRET not in str(info.value) and "hdfs://" in str(info.value)
    assert SECRET not in str(info.value.filename)


# --- checkpoint keys on a terminal --------------------------------------------------------------

EVIL = {
    "ansi": "backbone.\x1b[2J\x1b[31mred.weight",
    "cr": "head.fc\rAll keys matched successfully.weight",
    "bidi": "neck.\u202eexe.txt.weight",
    "bell": "x\x07\x00y.weight",
    "long": "layer." + "a" * 100_000 + ".weight",
}
UNSAFE = ("\x1b", "\r", "\u202e", "\x07", "\x00")


def _clean(text: str) -> None:
    for char in UNSAFE:
        assert char not in text, repr(char)
    assert max(len(line) for line in text.splitlines()) < 2000


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("layers.0.weight", "layers.0.weight"),
        ("a\x1b[31mb", "a\\x1b[31mb"),
        ("a\rb\nc", "a\\x0db\\x0ac"),
        ("\u202eabc", "\\u202eabc"),
        ("\ud800", "\\ud800"),
        ("mod.ünïcode.权重", "mod.ünïcode.权重"),
    ],
)
def test_printable(raw, shown):
    assert printable(raw) == shown


def test_printable_bounds_long_names():
    shown = printable("k" * 100_000)
    assert len(shown) < 300 and shown.endswith("[100,000 chars]") and "..." in shown


@given(st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=200))
def test_printable_keeps_ordinary_names(name):
    assert printable(name) == name


def test_the_load_report(tmp_path, caplog):
    result = LoadResult.build(
        missing_keys=[EVIL["bidi"]],
        unexpected_keys=[EVIL["ansi"], EVIL["cr"], EVIL["long"]],
        error_msgs=[f"custom loader failed on {EVIL['bell']}"],
        num_source_keys=4,
    )
    for style in ("folded", "flat"):
        text = result.report(style)
        _clean(text)
        assert "\\x1b[2J" in text and "[100,013 chars]" in text
    model = torch.nn.Linear(2, 2)
    state = {**model.state_dict(), **{key: torch.ones(1) for key in EVIL.values()}}
    torch.save(state, tmp_path / "evil.pth")
    with caplog.at_level(logging.WARNING, logger="ckptmap"):
        ckptmap.load_checkpoint(model, tmp_path / "evil.pth")
    _clean(caplog.text)
    assert "backbone.\\x1b[2J\\x1b[31mred.weight" in caplog.text


@pytest.fixture
def evil_files(tmp_path: Path) -> tuple[Path, Path]:
    evil = tmp_path / "evil.safetensors"
    save_file(
        {key: torch.ones(2) for key in EVIL.values()}, str(evil), metadata={"\x1b]0;t": "\x1b[5m"}
    )
    plain = tmp_path / "plain.pth"
    torch.save({"fc.weight": torch.ones(2)}, plain)
    return evil, plain


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ckptmap.cli", *args], capture_output=True, text=True, timeout=300
    )


def test_inspect_and_diff_show_escaped_bounded_keys(evil_files):
    evil, plain = evil_files
    inspect = _cli("inspect", str(evil), "--depth", "5")
    assert inspect.returncode == 0, inspect.stderr
    _clean(inspect.stdout)
    assert "\\x1b[2J" in inspect.stdout and "chars]" in inspect.stdout
    # --json keeps every name whole (JSON escapes the control characters itself).
    summary = json.loads(_cli("inspect", str(evil), "--json", "--depth", "5").stdout)
    assert summary["tensor_count"] == len(EVIL) and "\x1b]0;t" in summary["metadata"]
    for source, against in ((evil, plain), (plain, evil)):
        diff = _cli("diff", str(source), "--against", str(against))
        assert diff.returncode == 1, diff.stderr
        _clean(diff.stdout)
        assert "\\x1b[2J" in diff.stdout
    collide = _cli("diff", str(evil), "--against", str(plain), "--revise", ".*=>same")
    _clean(collide.stdout)
    assert "collisions" in collide.stdout
