"""``s3://`` through boto3 against a real moto S3 server on 127.0.0.1."""

from __future__ import annotations

import io
import json
import logging
import sys
import time
import urllib.request

import pytest
import torch
from servers import checkpoint_bytes, free_port, moto_s3_server

from ckptmap import objectstore
from ckptmap.atomic import is_temp_file
from ckptmap.errors import (
    MissingDependencyError,
    RemoteAccessDenied,
    RemoteNotFoundError,
    RemoteUnavailableError,
    UnexpectedContentError,
    UnsafePathError,
)
from ckptmap.schemes import CheckpointLoader, load_from_ceph
from ckptmap.schemes.s3 import parse_s3_uri, s3_download

boto3 = pytest.importorskip("boto3")

BODY = checkpoint_bytes(0)
OTHER = checkpoint_bytes(1)
BUCKET = "ckpts"
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def weight(body_or_checkpoint):
    if isinstance(body_or_checkpoint, bytes):
        body_or_checkpoint = torch.load(io.BytesIO(body_or_checkpoint), weights_only=True)
    return body_or_checkpoint["state_dict"]["weight"]


@pytest.fixture(scope="module")
def endpoint():
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    with pytest.MonkeyPatch.context() as patch:
        for name, value in CREDENTIALS.items():
            patch.setenv(name, value)
        with moto_s3_server() as url:
            client = boto3.client("s3", endpoint_url=url)
            client.create_bucket(Bucket=BUCKET)
            client.put_object(Bucket=BUCKET, Key="models/tiny.pth", Body=BODY)
            client.put_object(Bucket=BUCKET, Key="pages/login.pth", Body=b"<html>login</html>")
            yield url


@pytest.fixture
def s3(endpoint, tmp_path, monkeypatch):
    """The moto endpoint through AWS_ENDPOINT_URL, test credentials, and a fresh cache home."""
    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("CKPTMAP_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(objectstore, "DEFAULT_MAX_ATTEMPTS", 1)
    return boto3.client("s3", endpoint_url=endpoint)


def cached_files(tmp_path):
    root = tmp_path / "home"
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def test_parse_uris():
    assert parse_s3_uri("s3://b/a/k.pth") == (None, "b", "a/k.pth")
    assert parse_s3_uri("cluster1:s3://b/k.pth") == ("cluster1", "b", "k.pth")
    for bad in ("s3://", "s3://b", "s3://b/", "http://b/k"):
        with pytest.raises(ValueError):
            parse_s3_uri(bad)


def test_load_through_the_registry_and_cache(s3, tmp_path):
    checkpoint = CheckpointLoader.load_checkpoint(f"s3://{BUCKET}/models/tiny.pth")
    assert torch.equal(weight(checkpoint), weight(BODY))
    (path,) = cached_files(tmp_path)
    etag = s3.head_object(Bucket=BUCKET, Key="models/tiny.pth")["ETag"].strip('"')
    assert path == tmp_path / "home" / "s3" / BUCKET / "models" / etag / "tiny.pth"
    inode = path.stat().st_ino
    assert s3_download(f"s3://{BUCKET}/models/tiny.pth") == path
    assert path.stat().st_ino == inode  # served from the cache, not rewritten


def test_a_new_object_version_is_a_new_entry(s3, tmp_path):
    s3.put_object(Bucket=BUCKET, Key="models/moving.pth", Body=BODY)
    first = s3_download(f"s3://{BUCKET}/models/moving.pth")
    s3.put_object(Bucket=BUCKET, Key="models/moving.pth", Body=OTHER)
    second = s3_download(f"s3://{BUCKET}/models/moving.pth")
    assert first != second and second.read_bytes() == OTHER and first.read_bytes() == BODY
    assert not any(is_temp_file(p) for p in cached_files(tmp_path))


def test_cluster_prefix_is_ignored_by_boto3(s3, caplog):
    with caplog.at_level(logging.WARNING, logger="ckptmap"):
        checkpoint = load_from_ceph(f"mycluster:s3://{BUCKET}/models/tiny.pth", backend="boto3")
    assert torch.equal(weight(checkpoint), weight(BODY))
    assert "mycluster" in caplog.text


@pytest.mark.parametrize("uri", [f"s3://{BUCKET}/models/missing.pth", "s3://no-such-bucket/x.pth"])
def test_missing_objects_are_file_not_found(s3, tmp_path, uri):
    with pytest.raises(FileNotFoundError) as info:
        CheckpointLoader.load_checkpoint(uri)
    assert isinstance(info.value, RemoteNotFoundError) and uri in str(info.value)
    assert cached_files(tmp_path) == []


def _set_auth(endpoint: str, count: str) -> None:
    request = urllib.request.Request(
        f"{endpoint}/moto-api/reset-auth",
        data=count.encode(),
        method="POST",
        headers={"Content-Type": "text/plain"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        response.read()


def test_access_denied_is_a_permission_error(s3, endpoint, tmp_path, monkeypatch):
    s3.create_bucket(Bucket="private")
    s3.put_object(Bucket="private", Key="x.pth", Body=BODY)
    iam = boto3.client("iam", endpoint_url=endpoint)
    iam.create_user(UserName="reader")
    key = iam.create_access_key(UserName="reader")["AccessKey"]
    policy = {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Action": ["s3:GetObject", "s3:ListBucket"],
                "Resource": [f"arn:aws:s3:::{BUCKET}", f"arn:aws:s3:::{BUCKET}/*"],
            }
        ],
    }
    iam.put_user_policy(UserName="reader", PolicyName="read", PolicyDocument=json.dumps(policy))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
    _set_auth(endpoint, "0")  # from now on moto checks signatures and IAM policies
    try:
        assert s3_download(f"s3://{BUCKET}/models/tiny.pth").read_bytes() == BODY
        with pytest.raises(PermissionError) as info:
            CheckpointLoader.load_checkpoint("s3://private/x.pth")
        assert isinstance(info.value, RemoteAccessDenied)
        assert "s3://private/x.pth" in str(info.value) and "credentials" in str(info.value)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAUNKNOWNKEY000000")
        with pytest.raises(RemoteAccessDenied):
            s3_download("s3://private/x.pth")
    finally:
        _set_auth(endpoint, "inf")
    assert not any("private" in str(p) for p in cached_files(tmp_path))


def test_missing_credentials(s3, tmp_path, monkeypatch):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    with pytest.raises(RemoteAccessDenied, match="AWS_ACCESS_KEY_ID"):
        s3_download(f"s3://{BUCKET}/models/tiny.pth")


def test_unreachable_endpoint_names_the_variable(s3, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    started = time.monotonic()
    with pytest.raises(RemoteUnavailableError) as info:
        CheckpointLoader.load_checkpoint(f"s3://{BUCKET}/models/tiny.pth")
    assert time.monotonic() - started < 10
    assert "AWS_ENDPOINT_URL" in str(info.value) and isinstance(info.value, ConnectionError)
    assert cached_files(tmp_path) == []


def test_malformed_endpoint_names_the_variable(s3, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "not a url")
    with pytest.raises(RemoteUnavailableError, match="AWS_ENDPOINT_URL"):
        CheckpointLoader.load_checkpoint(f"s3://{BUCKET}/models/tiny.pth")


def test_non_checkpoint_objects_are_not_cached(s3, tmp_path):
    with pytest.raises(UnexpectedContentError, match="HTML"):
        CheckpointLoader.load_checkpoint(f"s3://{BUCKET}/pages/login.pth")
    assert cached_files(tmp_path) == []


@pytest.mark.parametrize(
    "uri",
    [
        f"s3://{BUCKET}/../x.pth",
        f"s3://{BUCKET}/a/../../x.pth",
        f"s3://{BUCKET}/a//b.pth",
        f"s3://{BUCKET}/a/./b.pth",
        f"s3://{BUCKET}/a\\..\\b.pth",
        f"s3://{BUCKET}/C:/b.pth",
        "s3://../k.pth",
    ],
)
def test_unsafe_keys_are_rejected_before_any_write(s3, tmp_path, uri):
    with pytest.raises(UnsafePathError):
        CheckpointLoader.load_checkpoint(uri)
    assert not (tmp_path / "home").exists()


def test_boto3_missing_is_a_clear_import_error(s3, monkeypatch):
    monkeypatch.setitem(sys.modules, "boto3", None)
    with pytest.raises(ImportError) as info:
        s3_download(f"s3://{BUCKET}/models/tiny.pth")
    assert isinstance(info.value, MissingDependencyError) and "ckptmap[s3]" in str(info.value)
