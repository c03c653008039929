"""One object-store layer: a save and a load of the same ``s3://`` URI reach the same store.

boto3 runs against a real moto server on 127.0.0.1. petrel is closed source, so a stand-in
``petrel_client`` package (a real module on ``sys.path``, keeping objects in a directory) plays
it, for downloads and uploads alike. The rule under test (`ckptmap.objectstore`): an explicit
backend, else ``$CKPTMAP_S3_BACKEND``, else petrel when ``petrel_client`` is importable, else
boto3 — for loads and saves alike; a backend that can not serve the target is refused.
"""

from __future__ import annotations

import io
import logging
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from servers import moto_s3_server

from ckptmap import objectstore
from ckptmap.errors import (
    BackendArgsError,
    CheckpointNotFoundError,
    CkptmapError,
    MissingDependencyError,
    RemoteAccessDenied,
    RemoteNotFoundError,
    SavePermissionError,
    UnsupportedBackendError,
)
from ckptmap.formats import load_file
from ckptmap.save import save_checkpoint
from ckptmap.save.sinks import PetrelSink, S3Sink, sink_for
from ckptmap.schemes import CheckpointLoader, load_from_ceph, load_from_petrel

boto3 = pytest.importorskip("boto3")

BUCKET = "shared"

# --- the stand-in petrel client --------------------------------------------------------------

EXCEPTIONS = """
class NoSuchBucketError(Exception):
    pass


class AccessDeniedError(Exception):
    pass
"""

CLIENT = """
import os
from pathlib import Path

from petrel_client.common.exception import AccessDeniedError, NoSuchBucketError

#: Every call, for the tests to read.
CALLS = []


class Client:
    def __init__(self, conf_path=None, enable_mc=False):
        CALLS.append(("init", conf_path, enable_mc))
        self.root = Path(os.environ["PETREL_STANDIN_ROOT"])

    def _path(self, uri):
        if uri.startswith("s3://"):
            cluster, rest = "default", uri[len("s3://"):]
        else:
            cluster, _, rest = uri.partition(":s3://")
            if not rest:
                raise ValueError(f"not an s3 URI: {uri}")
        bucket, _, key = rest.partition("/")
        if bucket == "private":
            raise AccessDeniedError(f"access denied to {uri}")
        if not (self.root / cluster / bucket).is_dir():
            raise NoSuchBucketError(bucket)
        return self.root / cluster / bucket / key

    def Get(self, uri):
        CALLS.append(("get", uri))
        path = self._path(uri)
        return path.read_bytes() if path.is_file() else None

    def put(self, uri, content):
        CALLS.append(("put", uri))
        path = self._path(uri)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(bytes(content))
        return len(content)

    def delete(self, uri):
        CALLS.append(("delete", uri))
        self._path(uri).unlink()
"""


class PetrelStore:
    """The stand-in's objects on disk, by ``(cluster, bucket)``."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def bucket(self, name: str, cluster: str = "default") -> Path:
        path = self.root / cluster / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def keys(self) -> list[str]:
        return sorted(str(p.relative_to(self.root)) for p in self.root.rglob("*") if p.is_file())

    @property
    def calls(self) -> list[tuple]:
        module = sys.modules.get("petrel_client.client")
        return [] if module is None else module.CALLS


def _forget_petrel() -> None:
    for name in list(sys.modules):
        if name == "petrel_client" or name.startswith("petrel_client."):
            del sys.modules[name]


@pytest.fixture
def petrel(tmp_path, monkeypatch):
    """The stand-in ``petrel_client`` importable, with an empty store."""
    site = tmp_path / "site"
    package = site / "petrel_client"
    (package / "common").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "common" / "__init__.py").write_text("")
    (package / "common" / "exception.py").write_text(textwrap.dedent(EXCEPTIONS))
    (package / "client.py").write_text(textwrap.dedent(CLIENT))
    _forget_petrel()
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("PETREL_STANDIN_ROOT", str(tmp_path / "petrel-store"))
    store = PetrelStore(tmp_path / "petrel-store")
    store.bucket(BUCKET)
    yield store
    _forget_petrel()


@pytest.fixture(scope="module")
def endpoint():
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    with moto_s3_server() as url:
        yield url


@pytest.fixture
def s3(endpoint, tmp_path, monkeypatch):
    """boto3's store (moto) with the bucket, and no petrel unless a test adds it."""
    _forget_petrel()
    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_ENDPOINT_URL": endpoint,
        "CKPTMAP_HOME": str(tmp_path / "home"),
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.delenv(objectstore.ENV_S3_BACKEND, raising=False)
    monkeypatch.setattr(objectstore, "DEFAULT_MAX_ATTEMPTS", 1)
    client = boto3.client("s3", endpoint_url=endpoint)
    if not _exists(client):
        client.create_bucket(Bucket=BUCKET)
    for obj in client.list_objects_v2(Bucket=BUCKET).get("Contents", []):
        client.delete_object(Bucket=BUCKET, Key=obj["Key"])
    return client


def _exists(client) -> bool:
    return BUCKET in {b["Name"] for b in client.list_buckets().get("Buckets", [])}


def moto_keys(client) -> list[str]:
    return sorted(o["Key"] for o in client.list_objects_v2(Bucket=BUCKET).get("Contents", []))


def checkpoint(value: float) -> dict:
    return {"meta": {"epoch": int(value)}, "state_dict": {"w": torch.full((3,), value)}}


def weight(loaded) -> float:
    return loaded["state_dict"]["w"][0].item()


# --- the rule, both directions --------------------------------------------------------------


def test_without_petrel_saves_and_loads_use_boto3(s3):
    uri = f"s3://{BUCKET}/work/epoch_1.pth"
    assert not objectstore.petrel_available()
    save_checkpoint(checkpoint(1.0), uri)
    assert moto_keys(s3) == ["work/epoch_1.pth"]
    assert weight(CheckpointLoader.load_checkpoint(uri)) == 1.0
    # The same for safetensors, meta included, through the cache.
    save_checkpoint(checkpoint(2.0), f"s3://{BUCKET}/work/epoch_2.safetensors")
    loaded = CheckpointLoader.load_checkpoint(f"s3://{BUCKET}/work/epoch_2.safetensors")
    assert loaded["meta"] == {"epoch": 2} and weight(loaded) == 2.0


def test_with_petrel_saves_and_loads_use_petrel(s3, petrel):
    uri = f"s3://{BUCKET}/work/epoch_1.pth"
    assert objectstore.petrel_available()
    save_checkpoint(checkpoint(3.0), uri)
    assert petrel.keys() == [f"default/{BUCKET}/work/epoch_1.pth"] and moto_keys(s3) == []
    assert weight(CheckpointLoader.load_checkpoint(uri)) == 3.0
    assert [c[0] for c in petrel.calls] == ["init", "put", "init", "get"]
    # mmcv's form and safetensors too; a cluster prefix reaches petrel's cluster.
    petrel.bucket(BUCKET, cluster="c1")
    model = torch.nn.Linear(2, 2)
    save_checkpoint(model, f"c1:s3://{BUCKET}/m.safetensors", meta={"epoch": 4})
    assert f"c1/{BUCKET}/m.safetensors" in petrel.keys()
    loaded = CheckpointLoader.load_checkpoint(f"c1:s3://{BUCKET}/m.safetensors")
    assert loaded["meta"]["epoch"] == 4
    assert torch.equal(loaded["state_dict"]["weight"], model.weight.detach())
    # petrel:// is petrel's own spelling of the same objects.
    assert weight(load_from_petrel(f"petrel://{BUCKET}/work/epoch_1.pth")) == 3.0
    save_checkpoint(checkpoint(5.0), f"petrel://{BUCKET}/p.pth")
    assert weight(CheckpointLoader.load_checkpoint(f"s3://{BUCKET}/p.pth")) == 5.0


def test_the_environment_points_both_directions_at_boto3(s3, petrel, monkeypatch):
    monkeypatch.setenv(objectstore.ENV_S3_BACKEND, "boto3")
    uri = f"s3://{BUCKET}/e.pth"
    save_checkpoint(checkpoint(6.0), uri)
    assert moto_keys(s3) == ["e.pth"] and petrel.keys() == []
    assert weight(CheckpointLoader.load_checkpoint(uri)) == 6.0
    assert petrel.calls == []


def test_an_explicit_backend_is_honoured(s3, petrel):
    uri = f"s3://{BUCKET}/x.pth"
    save_checkpoint(checkpoint(7.0), uri, backend_args={"backend": "boto3"})
    assert moto_keys(s3) == ["x.pth"] and petrel.keys() == []
    assert weight(load_from_ceph(uri, backend="boto3")) == 7.0
    save_checkpoint(checkpoint(8.0), uri, file_client_args={"backend": "petrel"})
    assert petrel.keys() == [f"default/{BUCKET}/x.pth"]
    assert weight(load_from_ceph(uri, backend="petrel")) == 8.0
    # mmcv's form takes file_client_args.
    save_checkpoint(torch.nn.Linear(1, 1), uri, file_client_args={"backend": "boto3"})
    assert "meta" in load_from_ceph(uri, backend="boto3")


def test_petrel_asked_for_but_missing_is_refused_not_replaced(s3, tmp_path):
    uri = f"s3://{BUCKET}/x.pth"
    for call in (
        lambda: save_checkpoint(checkpoint(1.0), uri, backend_args={"backend": "petrel"}),
        lambda: load_from_ceph(uri, backend="petrel"),
        lambda: CheckpointLoader.load_checkpoint(f"petrel://{BUCKET}/x.pth"),
    ):
        with pytest.raises(MissingDependencyError, match="petrel_client") as info:
            call()
        assert isinstance(info.value, ImportError)
    assert moto_keys(s3) == []


@pytest.mark.parametrize(
    ("target", "backend_args", "match"),
    [
        ("s3://b/x.pth", {"backend": "local"}, "'local' can not serve s3://b/x.pth"),
        ("s3://b/x.pth", {"backend": "disk"}, "writes local files"),
        ("s3://b/x.pth", {"backend": "memcached"}, "does not have it"),
        ("petrel://b/x.pth", {"backend": "boto3"}, "use 'petrel'"),
        ("work/x.pth", {"backend": "petrel"}, "can not write the local path"),
        ("work/x.pth", {"backend": "lmdb"}, "can not write the local path"),
    ],
)
def test_a_backend_that_can_not_serve_the_target_is_refused(tmp_path, target, backend_args, match):
    if "://" not in target:
        target = str(tmp_path / target)
    with pytest.raises(UnsupportedBackendError, match=match) as info:
        save_checkpoint(checkpoint(1.0), target, backend_args=backend_args)
    assert isinstance(info.value, ValueError) and info.value.backend == backend_args["backend"]


def test_bad_backend_names_are_refused_for_loads_too(monkeypatch):
    with pytest.raises(UnsupportedBackendError, match="mmcv's CephBackend"):
        load_from_ceph("s3://b/x.pth", backend="ceph")
    monkeypatch.setenv(objectstore.ENV_S3_BACKEND, "minio")
    with pytest.raises(UnsupportedBackendError, match=r"\$CKPTMAP_S3_BACKEND 'minio'"):
        CheckpointLoader.load_checkpoint("s3://b/x.pth")
    with pytest.raises(UnsupportedBackendError, match=r"\$CKPTMAP_S3_BACKEND"):
        save_checkpoint({}, "s3://b/x.pth")


def test_backend_args_a_backend_does_not_take_are_refused(s3, petrel):
    with pytest.raises(BackendArgsError, match="they are petrel's") as info:
        save_checkpoint({}, "s3://b/x.pth", backend_args={"backend": "boto3", "path_mapping": {}})
    assert isinstance(info.value, TypeError) and info.value.unknown == ["path_mapping"]
    with pytest.raises(BackendArgsError, match="they are boto3's"):
        save_checkpoint({}, "s3://b/x.pth", backend_args={"endpoint_url": "http://x"})
    with pytest.raises(BackendArgsError, match="nope"):
        save_checkpoint({}, "x.pth", backend_args={"backend": "local", "nope": 1})
    assert petrel.keys() == [] and moto_keys(s3) == []


def test_petrel_arguments_are_passed_on(s3, petrel):
    petrel.bucket("mapped")
    save_checkpoint(
        checkpoint(9.0),
        f"s3://{BUCKET}/m.pth",
        backend_args={
            "backend": "petrel",
            "path_mapping": {f"s3://{BUCKET}/": "s3://mapped/"},
            "conf_path": "/etc/petrel.conf",
            "enable_mc": False,
        },
    )
    assert petrel.keys() == ["default/mapped/m.pth"]
    assert ("init", "/etc/petrel.conf", False) in petrel.calls


def test_boto3_arguments_are_passed_on(s3, endpoint, monkeypatch):
    from botocore.config import Config

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    save_checkpoint(
        checkpoint(1.0),
        f"s3://{BUCKET}/args.pth",
        backend_args={"endpoint_url": endpoint, "config": Config(read_timeout=5)},
    )
    assert moto_keys(s3) == ["args.pth"]


def test_one_client_factory_for_reads_and_writes(s3):
    from botocore.config import Config

    client = objectstore.s3_client()
    config = client.meta.config
    assert config.retries["total_max_attempts"] == objectstore.DEFAULT_MAX_ATTEMPTS
    assert config.connect_timeout == objectstore.DEFAULT_CONNECT_TIMEOUT_S
    assert config.read_timeout == objectstore.DEFAULT_READ_TIMEOUT_S
    assert client.meta.endpoint_url == objectstore.endpoint_url()
    sink, name = sink_for(f"s3://{BUCKET}/a/b.pth", {"config": Config(read_timeout=7)})
    assert isinstance(sink, S3Sink) and name == "b.pth" and sink.prefix == "a/"
    # The save's client is made by the same factory: our defaults, the caller's overrides.
    assert sink.client.meta.config.read_timeout == 7
    assert sink.client.meta.config.connect_timeout == objectstore.DEFAULT_CONNECT_TIMEOUT_S
    assert sink.client.meta.config.retries["total_max_attempts"] == objectstore.DEFAULT_MAX_ATTEMPTS


# --- petrel's errors, both directions ---------------------------------------------------------


def test_petrel_errors_are_typed(s3, petrel):
    with pytest.raises(RemoteNotFoundError, match="petrel client found no such object"):
        CheckpointLoader.load_checkpoint(f"s3://{BUCKET}/missing.pth")
    with pytest.raises(FileNotFoundError, match="NoSuchBucketError"):
        CheckpointLoader.load_checkpoint("s3://nobucket/x.pth")
    with pytest.raises(RemoteAccessDenied, match="AccessDeniedError"):
        CheckpointLoader.load_checkpoint("s3://private/x.pth")
    with pytest.raises(SavePermissionError, match=r"s3://private/x\.pth") as info:
        save_checkpoint(checkpoint(1.0), "s3://private/x.pth")
    assert isinstance(info.value, PermissionError)
    with pytest.raises(CheckpointNotFoundError, match="no such bucket"):
        save_checkpoint(checkpoint(1.0), "s3://nobucket/x.pth")


def test_petrel_saves_are_whole_or_nothing(s3, petrel):
    class Boom:
        def __reduce__(self):
            raise RuntimeError("boom")

    save_checkpoint(checkpoint(1.0), f"s3://{BUCKET}/keep.pth")
    before = petrel.keys()
    with pytest.raises(RuntimeError, match="boom"):
        save_checkpoint({"state_dict": {}, "meta": Boom()}, f"s3://{BUCKET}/keep.pth")
    assert petrel.keys() == before
    assert weight(CheckpointLoader.load_checkpoint(f"s3://{BUCKET}/keep.pth")) == 1.0


def test_petrel_sharded_saves_replace_old_shards_after_the_index(s3, petrel, tmp_path):
    state = {f"w{i}": torch.full((64,), float(i)) for i in range(3)}
    uri = f"s3://{BUCKET}/sh/m.safetensors"
    assert save_checkpoint(state, uri, max_shard_size=256) == uri + ".index.json"
    first = petrel.keys()
    assert len(first) == 4
    save_checkpoint(state, uri, max_shard_size=256)
    second = petrel.keys()
    index = f"default/{BUCKET}/sh/m.safetensors.index.json"
    assert len(second) == 4 and set(first) & set(second) == {index}
    # The files petrel holds are a loadable checkpoint.
    local = tmp_path / "copy"
    local.mkdir()
    for key in second:
        (local / Path(key).name).write_bytes((petrel.root / key).read_bytes())
    loaded = load_file(local / "m.safetensors.index.json")
    assert list(loaded) == ["w0", "w1", "w2"] and loaded["w2"][0].item() == 2.0


def test_petrel_sink_for_uris(petrel):
    sink, name = sink_for(f"c1:s3://{BUCKET}/a/b/c.pth", {"backend": "petrel"})
    assert isinstance(sink, PetrelSink) and name == "c.pth"
    assert sink.display(name) == f"c1:s3://{BUCKET}/a/b/c.pth"
    with pytest.raises(ValueError, match="names a directory"):
        sink_for(f"s3://{BUCKET}/dir/", {"backend": "petrel"})


def test_store_errors_leave_other_exceptions_alone():
    err = KeyError("x")
    assert objectstore.store_error(err, "s3://b/k", writing=False) is err
    mapped = objectstore.store_error(io.UnsupportedOperation("x"), "s3://b/k", writing=True)
    assert not isinstance(mapped, CkptmapError)
