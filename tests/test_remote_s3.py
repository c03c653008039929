"""``s3://`` safetensors read by byte range through boto3, against a real moto S3 server on
127.0.0.1 whose GET bodies are counted at the server."""

from __future__ import annotations

import io
import logging
import zipfile
from pathlib import Path

import pytest
import safetensors.torch
import torch
from servers import SUBTREE, counting_moto_s3_server, random_checkpoint, random_state

from ckptmap import objectstore, open_checkpoint
from ckptmap.checkpoint import _load_checkpoint_with_prefix
from ckptmap.cli.summary import inspect_checkpoint
from ckptmap.errors import RemoteChangedError, RemoteNotFoundError

boto3 = pytest.importorskip("boto3")

BUCKET = "weights"
KEY = "models/model.safetensors"
SIZE = 64 << 20
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> tuple[Path, bytes, bytes]:
    path = tmp_path_factory.mktemp("remote_s3") / "model.safetensors"
    header = random_checkpoint(path, SIZE, seed=2)
    return path, path.read_bytes(), header


@pytest.fixture(scope="module")
def store(model_file):
    """The moto endpoint and its byte counter, with the file uploaded."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    with pytest.MonkeyPatch.context() as patch:
        for name, value in CREDENTIALS.items():
            patch.setenv(name, value)
        with counting_moto_s3_server() as (url, counter):
            client = boto3.client("s3", endpoint_url=url)
            client.create_bucket(Bucket=BUCKET)
            client.put_object(Bucket=BUCKET, Key=KEY, Body=model_file[1])
            yield url, counter, client


@pytest.fixture
def s3(store, tmp_path, monkeypatch):
    url, counter, client = store
    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_ENDPOINT_URL", url)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("CKPTMAP_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(objectstore, "DEFAULT_MAX_ATTEMPTS", 1)
    counter.reset()
    return counter, client, tmp_path / "home"


def cached(home: Path) -> list[Path]:
    return sorted(p for p in home.rglob("*") if p.is_file()) if home.exists() else []


def test_a_prefix_load_transfers_its_subtree_and_equals_a_full_load(model_file, s3):
    counter, _, home = s3
    path, body, header = model_file
    got = _load_checkpoint_with_prefix(SUBTREE, f"s3://{BUCKET}/{KEY}")
    full = safetensors.torch.load_file(str(path))
    expected = {k[len(SUBTREE) + 1 :]: v for k, v in full.items() if k.startswith(SUBTREE + ".")}
    assert list(got) == list(expected)
    assert all(torch.equal(got[k], v) for k, v in expected.items())
    sent = counter.bytes_sent[f"/{BUCKET}/{KEY}"]
    subtree = sum(t.nbytes for t in expected.values())
    assert len(header) + subtree <= sent <= 0.15 * len(body), (sent, len(body))
    assert all(r is not None for _, r in counter.requests)  # every GET was ranged
    assert cached(home) == []


def test_inspect_transfers_the_header_alone(model_file, s3):
    counter, _, _ = s3
    path, body, header = model_file
    summary = inspect_checkpoint(f"s3://{BUCKET}/{KEY}")
    assert counter.bytes_sent[f"/{BUCKET}/{KEY}"] == len(header)
    local = inspect_checkpoint(path)
    assert summary["file_bytes"] == len(body)
    for key in ("tensor_count", "total_bytes", "dtypes", "tree", "metadata"):
        assert summary[key] == local[key], key


def test_an_object_replaced_between_requests_is_refused(s3):
    _, client, home = s3
    key = "models/moving.safetensors"
    small = safetensors.torch.save({"a": torch.arange(8.0), "b": torch.ones(4)})
    client.put_object(Bucket=BUCKET, Key=key, Body=small)
    with open_checkpoint(f"s3://{BUCKET}/{key}") as opened:
        other = safetensors.torch.save({"a": torch.arange(8.0) + 1, "b": torch.ones(4)})
        client.put_object(Bucket=BUCKET, Key=key, Body=other)
        with pytest.raises(RemoteChangedError) as info:
            opened.state_dict(["a"])
    assert info.value.what == "If-Match" and f"s3://{BUCKET}/{key}" in str(info.value)
    assert cached(home) == []


def test_a_missing_key_is_not_found(s3):
    with pytest.raises(RemoteNotFoundError) as info:
        open_checkpoint(f"s3://{BUCKET}/models/none.safetensors")
    assert "models/none.safetensors" in str(info.value)


def test_a_torch_zip_prefix_load_transfers_its_subtree(s3):
    """The bar for ``.pth`` on S3: a 64 MiB `torch.save` file, its 10% subtree by range."""
    counter, client, home = s3
    state = random_state(SIZE, seed=4)
    buffer = io.BytesIO()
    torch.save({"meta": {"epoch": 2}, "state_dict": state}, buffer)
    body = buffer.getvalue()
    client.put_object(Bucket=BUCKET, Key="models/model.pth", Body=body)
    counter.reset()
    got = _load_checkpoint_with_prefix(SUBTREE, f"s3://{BUCKET}/models/model.pth")
    lead = SUBTREE + "."
    expected = {k[len(lead) :]: v for k, v in state.items() if k.startswith(lead)}
    assert list(got) == list(expected)
    assert all(torch.equal(got[k], v) for k, v in expected.items())
    sent = counter.bytes_sent[f"/{BUCKET}/models/model.pth"]
    subtree = sum(t.nbytes for t in expected.values())
    assert subtree <= sent <= 0.15 * len(body), (sent, len(body))
    assert cached(home) == []


def test_a_compressed_torch_zip_falls_back_in_one_log_line(s3, caplog):
    _, client, home = s3
    buffer = io.BytesIO()
    torch.save({"state_dict": {"w": torch.arange(5.0)}}, buffer)
    deflated = io.BytesIO()
    with zipfile.ZipFile(buffer) as src, zipfile.ZipFile(deflated, "w") as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info), compress_type=zipfile.ZIP_DEFLATED)
    client.put_object(Bucket=BUCKET, Key="models/tiny.pth", Body=deflated.getvalue())
    uri = f"s3://{BUCKET}/models/tiny.pth"
    with caplog.at_level(logging.INFO, logger="ckptmap"), open_checkpoint(uri) as opened:
        assert torch.equal(opened.state_dict()["w"], torch.arange(5.0))
    lines = [r.getMessage() for r in caplog.records if "whole through the cache" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith(
        f"Downloading {uri} whole through the cache: only torch can read it (compressed member"
    )
    assert len(cached(home)) == 1
