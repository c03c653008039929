"""Nothing lies about integrity: what is cached, reused or loaded is what it claims to be.

Downloads come from a real `http.server` (and an https one with a self-signed certificate) on
127.0.0.1 sending exact bytes: malformed or contradictory Content-Length headers, chunked
bodies cut off mid-stream, bodies without a length that close early, redirects to other
schemes. Cache entries are damaged on disk between uses. Local checkpoints get SHA-256
manifests from ``save_checkpoint(..., checksum=True)``. Torch zip checkpoints written by
``torch.save`` are altered the ways a hostile file would be.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import pytest
import torch
from servers import checkpoint_bytes, checkpoint_server, self_signed_certificate

import ckptmap
from ckptmap.cache import cached_download
from ckptmap.checksum import manifest_path, read_manifest, verify_checkpoint
from ckptmap.errors import (
    ChecksumMismatchError,
    CorruptCheckpointError,
    IncompleteDownloadError,
    InvalidResponseError,
    InvalidTorchZipError,
    ManifestMismatchError,
    MissingManifestError,
    UnsafePathError,
    UnsafeRedirectError,
    UnsupportedSaveTargetError,
)
from ckptmap.formats import load_file
from ckptmap.schemes import CheckpointLoader, load_from_http

FAST = {"backoff_s": 0.0, "max_backoff_s": 0.0, "timeout_s": 10.0}
BODY = checkpoint_bytes(0)
SHA = hashlib.sha256(BODY).hexdigest()


@pytest.fixture
def home(tmp_path, monkeypatch):
    root = tmp_path / "home"
    monkeypatch.setenv("CKPTMAP_HOME", str(root))
    monkeypatch.delenv("CKPTMAP_CHECK_HASH", raising=False)
    monkeypatch.delenv("CKPTMAP_CHECKSUM", raising=False)
    return root


@pytest.fixture
def server():
    with checkpoint_server() as srv:
        yield srv


def cached_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def response(headers: list[str], body: bytes) -> bytes:
    head = "HTTP/1.1 200 OK\r\n" + "".join(f"{h}\r\n" for h in headers) + "\r\n"
    return head.encode() + body


def chunked(body: bytes, pieces: int, *, end: bool) -> bytes:
    step = -(-len(body) // pieces)
    out = b"".join(
        f"{len(body[i : i + step]):x}\r\n".encode() + body[i : i + step] + b"\r\n"
        for i in range(0, len(body), step)
    )
    return out + (b"0\r\n\r\n" if end else b"")


# --- Content-Length and framing --------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        ["Content-Length: -5"],
        ["Content-Length: abc"],
        ["Content-Length: 12e3"],
        ["Content-Length: +100"],
        [f"Content-Length: {len(BODY)}", f"Content-Length: {len(BODY) * 2}"],
        [f"Content-Length: {len(BODY)}, {len(BODY) + 1}"],
    ],
    ids=["negative", "word", "float", "signed", "two-headers", "list"],
)
def test_a_malformed_content_length_is_refused(home, server, headers):
    url = server.add("/cl.pth", response(headers, BODY), kind="raw")
    with pytest.raises(InvalidResponseError, match="Content-Length") as info:
        cached_download(url, **FAST)
    assert "cl.pth" in str(info.value) and isinstance(info.value, ValueError)
    assert cached_files(home) == []
    assert server.hits["/cl.pth"] == 1  # a broken server is not retried


def test_a_repeated_equal_content_length_is_fine(home, server):
    headers = [f"Content-Length: {len(BODY)}, {len(BODY)}"]
    url = server.add("/same.pth", response(headers, BODY), kind="raw")
    assert cached_download(url, **FAST).read_bytes() == BODY


@pytest.mark.parametrize("cut", ["mid-chunk", "at-a-chunk-boundary"])
def test_a_chunked_body_cut_off_is_never_cached(home, server, cut):
    body = chunked(BODY, 4, end=False)
    if cut == "mid-chunk":
        body = body[: len(body) - 40]
    url = server.add("/chunked.pth", response(["Transfer-Encoding: chunked"], body), kind="raw")
    with pytest.raises(IncompleteDownloadError, match=r"chunked\.pth"):
        cached_download(url, retries=1, **FAST)
    assert cached_files(home) == []
    assert server.hits["/chunked.pth"] == 2  # retried once


def test_a_whole_chunked_body_is_cached(home, server):
    body = chunked(BODY, 4, end=True)
    url = server.add("/whole.pth", response(["Transfer-Encoding: chunked"], body), kind="raw")
    assert cached_download(url, **FAST).read_bytes() == BODY


def _safetensors_bytes() -> bytes:
    from safetensors.torch import save

    return save({"w": torch.arange(64.0), "b": torch.ones(16)})


@pytest.mark.parametrize("fmt", ["zip", "safetensors"])
def test_a_body_without_length_that_closes_early_is_never_cached(home, server, fmt):
    whole = BODY if fmt == "zip" else _safetensors_bytes()
    url = server.add("/early.pth", response([], whole[: len(whole) * 2 // 3]), kind="raw")
    with pytest.raises(IncompleteDownloadError, match="not a whole checkpoint") as info:
        cached_download(url, retries=0, **FAST)
    assert "early.pth" in str(info.value)
    assert cached_files(home) == []
    # The same body sent whole, still without a length, is cached.
    url = server.add("/whole-nolength.pth", response([], whole), kind="raw")
    assert cached_download(url, **FAST).read_bytes() == whole


# --- the cache entry on disk -----------------------------------------------------------------


def test_each_entry_carries_a_manifest_written_with_it(home, server):
    path = cached_download(server.add(f"/m-{SHA[:8]}.pth", BODY), **FAST)
    manifest = read_manifest(path)
    assert manifest is not None and manifest.sha256 == SHA and manifest.name == path.name
    st = path.stat()
    assert (manifest.size, manifest.mtime_ns, manifest.ino) == (
        st.st_size,
        st.st_mtime_ns,
        st.st_ino,
    )


@pytest.mark.parametrize("damage", ["truncate", "flip-a-byte", "replace", "zero-the-tail"])
def test_an_entry_damaged_on_disk_is_detected_and_fetched_again(home, server, caplog, damage):
    url = server.add(f"/ckpt-{SHA[:8]}.pth", BODY)
    path = cached_download(url, **FAST)
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        os.truncate(path, len(data) // 2)
    elif damage == "flip-a-byte":  # in place, same size, at once (same timestamp tick)
        with open(path, "r+b") as f:
            f.seek(len(data) // 2)
            f.write(bytes([data[len(data) // 2] ^ 0xFF]))
    elif damage == "replace":
        path.write_bytes(checkpoint_bytes(1))
    else:
        with open(path, "r+b") as f:
            f.seek(len(data) - 64)
            f.write(bytes(64))
    with caplog.at_level("WARNING", logger="ckptmap"):
        again = cached_download(url, **FAST)
    assert again == path and path.read_bytes() == BODY
    assert server.hits[f"/ckpt-{SHA[:8]}.pth"] == 2
    assert str(path) in caplog.text and "downloading it again" in caplog.text


def test_an_intact_entry_whose_manifest_is_current_is_reused_without_reading_it(
    home, server, monkeypatch
):
    url = server.add("/old.pth", BODY)
    path = cached_download(url, **FAST)
    # As if downloaded a minute ago: the manifest then proves the entry unchanged.
    past = time.time_ns() - 60_000_000_000
    os.utime(path, ns=(past, past))
    from ckptmap import cache, checksum

    checksum.write_manifest(path, SHA)

    def no_reading(*args, **kwargs):
        raise AssertionError("the entry was hashed again")

    monkeypatch.setattr(checksum, "file_sha256", no_reading)
    monkeypatch.setattr(cache, "incomplete_reason", no_reading)
    assert cached_download(url, sha256=SHA[:12], **FAST) == path
    assert server.hits["/old.pth"] == 1


def test_an_entry_without_a_manifest_is_verified_then_reused(home, server, tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    (models / "placed.pth").write_bytes(BODY)  # put there by hand, as torch.hub users do
    url = server.add("/placed.pth", BODY)
    assert cached_download(url, model_dir=models, **FAST) == models / "placed.pth"
    assert server.hits["/placed.pth"] == 0
    assert read_manifest(models / "placed.pth").sha256 == SHA
    (models / "cut.pth").write_bytes(BODY[:-100])
    url = server.add("/cut.pth", BODY)
    assert cached_download(url, model_dir=models, **FAST).read_bytes() == BODY
    assert server.hits["/cut.pth"] == 1


def test_a_cached_name_hash_is_checked_when_asked(home, server):
    url = server.add("/resnet50-0676ba61.pth", BODY)
    path = cached_download(url, **FAST)  # not a hash unless asked: cached
    with pytest.raises(ChecksumMismatchError, match="0676ba61") as info:
        cached_download(url, check_hash=True, **FAST)
    assert SHA in str(info.value) and str(path) in str(info.value)


# --- hashes in names: only when asked ---------------------------------------------------------


def test_a_date_in_a_file_name_is_not_a_hash(home, server, monkeypatch):
    url = server.add("/model-20240115.pth", BODY)
    checkpoint = CheckpointLoader.load_checkpoint(url, map_location="cpu")
    assert set(checkpoint["state_dict"]) == {"weight", "bias"}
    with pytest.raises(ChecksumMismatchError, match="20240115"):
        load_from_http(server.add("/v2/model-20240115.pth", BODY), check_hash=True)


def test_ckptmap_check_hash_reaches_load_checkpoint(home, server, monkeypatch):
    monkeypatch.setenv("CKPTMAP_CHECK_HASH", "1")
    model = torch.nn.Linear(3, 4)
    with pytest.raises(ChecksumMismatchError, match="20240115"):
        ckptmap.load_checkpoint(model, server.add("/model-20240115.pth", BODY))
    ckptmap.load_checkpoint(model, server.add(f"/model-{SHA[:10]}.pth", BODY), strict=True)
    monkeypatch.setenv("CKPTMAP_CHECK_HASH", "maybe")
    with pytest.raises(ValueError, match="CKPTMAP_CHECK_HASH"):
        cached_download(server.add("/x.pth", BODY), **FAST)


@pytest.mark.parametrize("path", ["/models/", "/", "/a/.."])
def test_a_url_naming_no_file_is_an_error_naming_the_url(home, server, path):
    url = server.url(path)
    with pytest.raises(UnsafePathError) as info:
        cached_download(url, **FAST)
    assert url in str(info.value) and "file_name" in str(info.value)
    with pytest.raises(UnsafePathError, match=url.replace(".", r"\.")):
        CheckpointLoader.load_checkpoint(url)
    assert sum(server.hits.values()) == 0


# --- redirects ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "location", ["file:///etc/passwd", "ftp://127.0.0.1/model.pth", "data:,hello"]
)
def test_a_redirect_out_of_http_is_refused(home, server, location):
    url = server.add("/redirect.pth", kind="status", status=302, headers={"Location": location})
    with pytest.raises(UnsafeRedirectError) as info:
        cached_download(url, **FAST)
    assert location.split(":")[0] in str(info.value) and "redirect.pth" in str(info.value)
    assert isinstance(info.value, PermissionError)
    assert cached_files(home) == []
    assert server.hits["/redirect.pth"] == 1


@pytest.fixture
def tls(tmp_path, monkeypatch):
    cert, key = self_signed_certificate(str(tmp_path))
    monkeypatch.setenv("SSL_CERT_FILE", cert)
    return cert, key


def test_https_redirects_never_go_down_to_http(home, server, tls):
    plain = server.add("/plain.pth", BODY)
    with checkpoint_server(tls) as secure:
        down = secure.add("/down.pth", kind="status", status=301, headers={"Location": plain})
        with pytest.raises(UnsafeRedirectError, match="down to plain http"):
            cached_download(down, **FAST)
        assert server.hits["/plain.pth"] == 0
        # https -> https and http -> https are fine.
        target = secure.add("/secure.pth", BODY)
        moved = secure.add("/moved.pth", kind="status", status=302, headers={"Location": target})
        assert cached_download(moved, **FAST).read_bytes() == BODY
        up = server.add("/up.pth", kind="status", status=307, headers={"Location": target})
        assert cached_download(up, **FAST).read_bytes() == BODY
    assert sorted(p.name for p in cached_files(home) if p.suffix == ".pth") == [
        "moved.pth",
        "up.pth",
    ]


# --- local checksums --------------------------------------------------------------------------


def test_save_with_checksum_writes_a_sha256sum_manifest(tmp_path):
    state = {"state_dict": {"w": torch.randn(8, 8)}}
    path = Path(ckptmap.save_checkpoint(state, tmp_path / "epoch_1.pth", checksum=True))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    text = manifest_path(path).read_text()
    assert text.splitlines()[0] == f"{digest}  epoch_1.pth"
    if shutil.which("sha256sum"):
        check = subprocess.run(
            ["sha256sum", "-c", "epoch_1.pth.sha256"], cwd=tmp_path, capture_output=True
        )
        assert check.returncode == 0, check
    # Without checksum=True nothing is written beside the checkpoint.
    ckptmap.save_checkpoint(state, tmp_path / "epoch_2.pth")
    assert not manifest_path(tmp_path / "epoch_2.pth").exists()


def test_a_local_checkpoint_is_verified_against_its_manifest(tmp_path, monkeypatch):
    monkeypatch.delenv("CKPTMAP_CHECKSUM", raising=False)
    model = torch.nn.Linear(8, 8)
    path = tmp_path / "epoch_1.pth"
    ckptmap.save_checkpoint(model, path, checksum=True)
    ckptmap.load_checkpoint(model, path, strict=True)  # verified, matches
    with open(path, "r+b") as f:  # one bit of the weight's data, in place
        f.seek(_member_data_offset(path, "data/0") + 5)
        byte = f.read(1)[0]
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte ^ 0x01]))
    for load in (
        lambda: ckptmap.load_checkpoint(model, path),
        lambda: CheckpointLoader.load_checkpoint(str(path)),
        lambda: CheckpointLoader.load_checkpoint(path.as_uri()),
    ):
        with pytest.raises(ManifestMismatchError) as info:
            load()
        message = str(info.value)
        assert str(path) in message and info.value.actual in message
        assert info.value.expected in message and isinstance(info.value, CorruptCheckpointError)
    monkeypatch.setenv("CKPTMAP_CHECKSUM", "off")
    ckptmap.load_checkpoint(model, path)  # not checked
    monkeypatch.setenv("CKPTMAP_CHECKSUM", "require")
    other = tmp_path / "epoch_2.pth"
    ckptmap.save_checkpoint(model, other)
    with pytest.raises(MissingManifestError, match="CKPTMAP_CHECKSUM") as info:
        ckptmap.load_checkpoint(model, other)
    assert isinstance(info.value, FileNotFoundError)


def _member_data_offset(path: Path, suffix: str) -> int:
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith(suffix))
    with open(path, "rb") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = (int.from_bytes(f.read(2), "little") for _ in range(2))
    return info.header_offset + 30 + name_len + extra_len


def test_sharded_saves_get_a_manifest_per_file(tmp_path):
    state = {"state_dict": {f"w{i}": torch.randn(64) for i in range(4)}}
    index = Path(
        ckptmap.save_checkpoint(
            state, tmp_path / "model.safetensors", max_shard_size=600, checksum=True
        )
    )
    files = [p for p in tmp_path.iterdir() if p.suffix != ".sha256"]
    assert len(files) > 2 and all(manifest_path(p).exists() for p in files)
    assert verify_checkpoint(index, mode="require") == len(files)
    shard = next(p for p in files if p != index)
    with open(shard, "r+b") as f:
        f.seek(-1, os.SEEK_END)
        f.write(b"\x7f")
    with pytest.raises(ManifestMismatchError, match=shard.name):
        ckptmap.CheckpointLoader.load_checkpoint(str(index))


def test_checksum_needs_a_local_target(tmp_path):
    with pytest.raises(UnsupportedSaveTargetError, match="checksum"):
        ckptmap.save_checkpoint({"w": torch.ones(1)}, "s3://bucket/x.pth", checksum=True)


def test_rotation_removes_manifests_with_their_checkpoints(tmp_path):
    for epoch in (1, 2, 3):
        ckptmap.save_checkpoint(
            {"w": torch.ones(1)}, tmp_path / f"epoch_{epoch}.pth", checksum=True
        )
    removed = ckptmap.rotate_checkpoints(tmp_path, keep_last=1)
    assert sorted(Path(p).name for p in removed) == [
        "epoch_1.pth",
        "epoch_1.pth.sha256",
        "epoch_2.pth",
        "epoch_2.pth.sha256",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch_3.pth", "epoch_3.pth.sha256"]


# --- torch zip internals (the torch.load path) ----------------------------------------------


def _rewrite(source: Path, target: Path, edit=None, compress: dict | None = None) -> None:
    """Copies a torch.save zip member by member, editing data.pkl and compressing some."""
    compress = compress or {}
    with zipfile.ZipFile(source) as zin, zipfile.ZipFile(target, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            if info.filename.endswith("/data.pkl") and edit is not None:
                data = edit(data)
            method = compress.get(info.filename.rsplit("/", 1)[-1], zipfile.ZIP_STORED)
            zout.writestr(info.filename, data, compress_type=method)


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "real.pth"
    torch.save({"w": torch.arange(16.0).reshape(4, 4), "b": torch.zeros(3)}, path)
    return path


def _replace_once(data: bytes, old: bytes, new: bytes) -> bytes:
    assert data.count(old) == 1
    return data.replace(old, new)


@pytest.mark.parametrize("mmap", [True, False])
def test_a_storage_record_smaller_than_declared(tmp_path, saved, mmap):
    bad = tmp_path / "numel.pth"
    # The first storage declares 32 floats (128 bytes); its record holds 16 (64 bytes).
    _rewrite(saved, bad, lambda d: _replace_once(d, b"K\x10t", b"K\x20t"))
    with pytest.raises(CorruptCheckpointError) as info:
        load_file(bad, mmap=mmap)
    # Checked by ckptmap's reader before anything is mapped or read, whatever mmap says.
    assert type(info.value) is InvalidTorchZipError
    assert info.value.kind == "storage_size_mismatch"
    message = str(info.value)
    assert str(bad) in message and "64 bytes" in message
    assert "data/0" in message and "128 bytes" in message


@pytest.mark.parametrize("mmap", [True, False])
def test_a_shape_beyond_its_storage(tmp_path, saved, mmap):
    bad = tmp_path / "shape.pth"
    # w's shape becomes (8, 4): 32 elements of a 16-element storage.
    _rewrite(saved, bad, lambda d: _replace_once(d, b"K\x00K\x04K\x04\x86", b"K\x00K\x08K\x04\x86"))
    with pytest.raises(CorruptCheckpointError) as info:
        load_file(bad, mmap=mmap)
    assert type(info.value) is InvalidTorchZipError and str(bad) in str(info.value)
    assert info.value.kind == "tensor_out_of_bounds"


def test_a_small_deflated_pickle_still_loads(tmp_path, saved):
    odd = tmp_path / "deflated.pth"
    _rewrite(saved, odd, compress={"data.pkl": zipfile.ZIP_DEFLATED})
    for mmap in (True, False):
        assert torch.equal(load_file(odd, mmap=mmap)["w"], torch.arange(16.0).reshape(4, 4))


def test_a_zip_bomb_is_refused_without_inflating(tmp_path, saved):
    bomb = tmp_path / "bomb.pth"
    with zipfile.ZipFile(saved) as zin, zipfile.ZipFile(bomb, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            if info.filename.endswith("/data.pkl"):
                # The real pickle, then 256 MiB of zeros after its STOP: deflates to ~256 KiB.
                member = zipfile.ZipInfo(info.filename)
                member.compress_type = zipfile.ZIP_DEFLATED
                with zout.open(member, "w", force_zip64=True) as out:
                    out.write(data)
                    zeros = bytes(1 << 20)
                    for _ in range(256):
                        out.write(zeros)
            else:
                zout.writestr(info.filename, data)
    assert bomb.stat().st_size < 8 << 20
    code = textwrap.dedent(
        f"""
        import resource, json
        from ckptmap.formats import load_file
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            load_file({str(bomb)!r})
            outcome = "loaded"
        except Exception as exc:
            outcome = type(exc).__name__ + ": " + str(exc)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps({{"outcome": outcome, "grew_kib": after - before}}))
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.splitlines()[-1])
    assert result["outcome"].startswith("CorruptCheckpointError"), result
    assert "zip bomb" in result["outcome"] and str(bomb) in result["outcome"]
    assert result["grew_kib"] < 64 * 1024, result  # 256 MiB were never inflated


def test_torch_zip_checks_leave_real_checkpoints_alone(tmp_path):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    state = {"state_dict": model.state_dict(), "meta": {"epoch": 3}, "tied": None}
    state["tied"] = state["state_dict"]["0.weight"][1]  # a view into another storage
    buffer = io.BytesIO()
    torch.save(state, buffer)
    path = tmp_path / "real.pth"
    path.write_bytes(buffer.getvalue())
    for mmap in (True, False):
        loaded = load_file(path, mmap=mmap)
        reference = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
        assert torch.equal(loaded["tied"], reference["tied"])
        for key, value in reference["state_dict"].items():
            assert torch.equal(loaded["state_dict"][key], value)


def test_dcp_directories_are_verified_file_by_file(tmp_path, monkeypatch):
    import warnings

    import torch.distributed.checkpoint as dcp

    from ckptmap.checksum import write_manifest

    monkeypatch.delenv("CKPTMAP_CHECKSUM", raising=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process"
        dcp.save({"w": torch.arange(8.0)}, checkpoint_id=str(tmp_path))
    files = [tmp_path / ".metadata", *tmp_path.glob("*.distcp")]
    assert verify_checkpoint(tmp_path) == 0  # no manifests: nothing to check
    monkeypatch.setenv("CKPTMAP_CHECKSUM", "require")
    with pytest.raises(MissingManifestError):
        CheckpointLoader.load_checkpoint(str(tmp_path))
    for f in files:
        write_manifest(f)
    assert torch.equal(CheckpointLoader.load_checkpoint(str(tmp_path))["w"], torch.arange(8.0))
    with open(files[-1], "r+b") as f:
        f.write(b"\xff")
    with pytest.raises(ManifestMismatchError, match=files[-1].name):
        CheckpointLoader.load_checkpoint(str(tmp_path))
