"""What mmengine's and mmcv 1.x's own checkpoint tests check, as our own tests.

Each behaviour (b1 ... b9, numbered as in the lead's summary of the seeds' suites) runs three
ways: through ckptmap directly, through mmengine's functions under
`ckptmap.integrations.mmengine.patch()`, and through stock mmengine (the reference). Behaviours
only mmcv 1.x has (saving a model object, ``meta['CLASSES']``) run through ckptmap and the patch.
Where ckptmap differs on purpose, the test says so and pins both answers.

petrel and pavi are not installed here: small stand-in modules take their place, as in
tests/test_schemes.py.
"""

from __future__ import annotations

import contextlib
import importlib.machinery
import re
import sys
import types
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import mmengine.runner.checkpoint as mm
import pytest
import torch
from mmengine.registry import MODEL_WRAPPERS
from servers import moto_s3_server
from torch import nn

import ckptmap
from ckptmap import wrappers
from ckptmap.errors import UnknownSchemeError
from ckptmap.integrations import mmengine as dropin

pytestmark = pytest.mark.filterwarnings(
    "ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning:mmengine"
)

IMPLS = ["ckptmap", "patched", "stock"]
OURS = ["ckptmap", "patched"]


# -- the seeds' fixtures, in our words ------------------------------------------------------------


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.norm = nn.BatchNorm2d(3)


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = Block()
        self.conv = nn.Conv2d(3, 3, 1)


class PrefixModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = Model()


class Wrapper:
    """A model wrapper that is a plain object, as both seeds' tests register one."""

    def __init__(self, module: Any) -> None:
        self.module = module


MODEL_KEYS = [
    "block.conv.weight",
    "block.conv.bias",
    "block.norm.weight",
    "block.norm.bias",
    "block.norm.running_mean",
    "block.norm.running_var",
    "block.norm.num_batches_tracked",
    "conv.weight",
    "conv.bias",
]


class Impl:
    """One way of calling the checkpoint API: ckptmap, patched mmengine, or stock mmengine."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __getattr__(self, attr: str) -> Any:
        # mmengine's functions are looked up at call time: the patch replaces them.
        return getattr(ckptmap if self.name == "ckptmap" else mm, attr)

    @property
    def loader(self) -> Any:
        return ckptmap.CheckpointLoader if self.name == "ckptmap" else mm.CheckpointLoader

    @contextlib.contextmanager
    def wrapper_registered(self) -> Iterator[None]:
        if self.name == "ckptmap":
            ckptmap.register_model_wrapper(Wrapper)
            try:
                yield
            finally:
                wrappers._MODEL_WRAPPERS.remove(Wrapper)
        else:
            MODEL_WRAPPERS.register_module(module=Wrapper, force=True)
            try:
                yield
            finally:
                MODEL_WRAPPERS._module_dict.pop("Wrapper")


@pytest.fixture(params=IMPLS)
def impl(request: pytest.FixtureRequest) -> Iterator[Impl]:
    with dropin.patched() if request.param == "patched" else contextlib.nullcontext():
        yield Impl(request.param)


@pytest.fixture(params=OURS)
def ours(request: pytest.FixtureRequest) -> Iterator[Impl]:
    with dropin.patched() if request.param == "patched" else contextlib.nullcontext():
        yield Impl(request.param)


def save_state_dict(impl: Impl, state_dict: Any, path: Path) -> str:
    # mmengine's form: a checkpoint dict (mmcv's model form is b6/b9's business).
    impl.save_checkpoint({"state_dict": state_dict}, str(path))
    return str(path)


# -- b1: get_state_dict ----------------------------------------------------------------------------


def test_b1_get_state_dict_plain_wrapped_and_nested_data_parallel(impl: Impl) -> None:
    model = Model()
    state = impl.get_state_dict(model)
    assert isinstance(state, OrderedDict) and list(state) == MODEL_KEYS
    for key, value in model.state_dict().items():
        assert torch.equal(state[key], value)
    with impl.wrapper_registered():
        wrapped = Wrapper(model)
        assert list(impl.get_state_dict(wrapped)) == MODEL_KEYS
        for name, child in list(wrapped.module.named_children()):
            setattr(wrapped.module, name, nn.DataParallel(child))
        state = impl.get_state_dict(wrapped)
        assert list(state) == MODEL_KEYS
        assert torch.equal(state["block.conv.weight"], wrapped.module.block.module.conv.weight)
        assert torch.equal(state["conv.bias"], wrapped.module.conv.module.bias)


# -- b2: load_from_pavi ----------------------------------------------------------------------------


def pavi_stand_in(download: Any) -> types.ModuleType:
    """``pavi`` with a ``modelcloud.get(path)`` whose model downloads with `download`."""
    pavi = types.ModuleType("pavi")
    modelcloud = types.ModuleType("pavi.modelcloud")

    class CloudModel:
        name = "checkpoint.pth"

        def download(self, target: str) -> None:
            download(target)

    modelcloud.get = lambda path: CloudModel()  # type: ignore[attr-defined]
    pavi.modelcloud = modelcloud  # type: ignore[attr-defined]
    return pavi


def test_b2_load_from_pavi_wants_a_pavi_uri(impl: Impl) -> None:
    with pytest.raises(AssertionError):
        impl.load_from_pavi("MyPaviFolder/checkpoint.pth")


def test_b2_load_from_pavi_when_nothing_was_downloaded(impl: Impl, monkeypatch) -> None:
    pavi = pavi_stand_in(lambda target: None)
    monkeypatch.setitem(sys.modules, "pavi", pavi)
    monkeypatch.setitem(sys.modules, "pavi.modelcloud", pavi.modelcloud)
    with pytest.raises(FileNotFoundError):
        impl.load_from_pavi("pavi://checkpoint.pth")


def test_b2_load_from_pavi_loads_what_was_downloaded(ours: Impl, monkeypatch) -> None:
    model = Model()
    pavi = pavi_stand_in(lambda target: torch.save({"state_dict": model.state_dict()}, target))
    monkeypatch.setitem(sys.modules, "pavi", pavi)
    monkeypatch.setitem(sys.modules, "pavi.modelcloud", pavi.modelcloud)
    loaded = ours.load_from_pavi("pavi://checkpoint.pth")
    assert torch.equal(loaded["state_dict"]["conv.weight"], model.conv.weight)


# -- b3: _load_checkpoint_with_prefix --------------------------------------------------------------


class FooModule(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(1, 2)
        self.conv2d = nn.Conv2d(3, 1, 3)
        self.conv2d_2 = nn.Conv2d(3, 2, 3)


def test_b3_load_checkpoint_with_prefix(impl: Impl, tmp_path: Path) -> None:
    model = FooModule()
    path = tmp_path / "model.pth"
    torch.save(model.state_dict(), path)
    state = impl._load_checkpoint_with_prefix("conv2d", str(path))
    assert sorted(state) == ["bias", "weight"]  # conv2d_2 is not under "conv2d."
    assert torch.equal(state["weight"], model.conv2d.weight)
    with pytest.raises(AssertionError):
        impl._load_checkpoint_with_prefix("back", str(path))


# -- b4: revise_keys -------------------------------------------------------------------------------


def test_b4_revise_keys_both_ways(impl: Impl, tmp_path: Path) -> None:
    model = Model()
    path = save_state_dict(impl, model.state_dict(), tmp_path / "model.pth")
    prefixed = PrefixModel()
    checkpoint = impl.load_checkpoint(prefixed, path, revise_keys=[(r"^", "backbone.")])
    assert list(checkpoint["state_dict"]) == MODEL_KEYS  # the returned checkpoint is unrevised
    for key, value in model.state_dict().items():
        assert torch.equal(prefixed.state_dict()[f"backbone.{key}"], value)
    back = save_state_dict(impl, prefixed.state_dict(), tmp_path / "prefixed.pth")
    plain = Model()
    impl.load_checkpoint(plain, back, revise_keys=[(r"^backbone\.", "")])
    for key, value in model.state_dict().items():
        assert torch.equal(plain.state_dict()[key], value)


# -- b5: version metadata --------------------------------------------------------------------------


class ModelV1(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 3, 1)
        self.conv2 = nn.Conv2d(3, 3, 1)
        nn.init.normal_(self.conv1.weight)
        nn.init.normal_(self.conv2.weight)


class ModelV2(nn.Module):
    _version = 2

    def __init__(self) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(3, 3, 1)
        self.conv1 = nn.Conv2d(3, 3, 1)
        nn.init.normal_(self.conv0.weight)
        nn.init.normal_(self.conv1.weight)

    def _load_from_state_dict(self, state_dict: Any, prefix: str, local_metadata: Any, *a) -> None:
        version = local_metadata.get("version", None)
        if version is None or version < 2:  # version 1 named them conv1, conv2
            for old, new in (("conv1", "conv0"), ("conv2", "conv1")):
                for key in [k for k in state_dict if k.startswith(f"{prefix}{old}.")]:
                    state_dict[f"{prefix}{new}." + key[len(f"{prefix}{old}.") :]] = state_dict.pop(
                        key
                    )
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *a)


def check_version_renames(impl: Impl, save: Any) -> None:
    v1, v2 = ModelV1(), ModelV2()
    target = ModelV2()
    impl.load_checkpoint(target, save(v1, "v1.pth"), strict=True)
    assert torch.equal(target.conv0.weight, v1.conv1.weight)
    assert torch.equal(target.conv1.weight, v1.conv2.weight)
    target = ModelV2()
    impl.load_checkpoint(target, save(v2, "v2.pth"), strict=True)
    assert torch.equal(target.conv0.weight, v2.conv0.weight)
    assert torch.equal(target.conv1.weight, v2.conv1.weight)


def test_b5_version_metadata_drives_old_key_renames(impl: Impl, tmp_path: Path) -> None:
    check_version_renames(
        impl, lambda model, name: save_state_dict(impl, impl.get_state_dict(model), tmp_path / name)
    )


def test_b5_version_metadata_of_a_model_saved_mmcv_style(ours: Impl, tmp_path: Path) -> None:
    def save(model: nn.Module, name: str) -> str:
        ours.save_checkpoint(model, str(tmp_path / name))
        return str(tmp_path / name)

    check_version_renames(ours, save)


# -- b6: CheckpointLoader --------------------------------------------------------------------------

SCHEMES = {
    "http://xx.xx/xx.pth": "load_from_http",
    "https://xx.xx/xx.pth": "load_from_http",
    "modelzoo://xx.xx/xx.pth": "load_from_torchvision",
    "torchvision://xx.xx/xx.pth": "load_from_torchvision",
    "open-mmlab://xx.xx/xx.pth": "load_from_openmmlab",
    "openmmlab://xx.xx/xx.pth": "load_from_openmmlab",
    "mmcls://xx.xx/xx.pth": "load_from_mmcls",
    "pavi://xx.xx/xx.pth": "load_from_pavi",
    "s3://xx.xx/xx.pth": "load_from_ceph",
    " s3://xx.xx/xx.pth": "load_from_local",
    "open-mmlab:s3://xx.xx/xx.pth": "load_from_ceph",
    "openmmlab:s3://xx.xx/xx.pth": "load_from_ceph",
    ":s3://xx.xx/xx.path": "load_from_local",
    "a/b/c.pth": "load_from_local",
}
#: URIs whose scheme no loader handles: the seeds read them as local paths, ckptmap refuses
#: them (a typo like "ss3://" would otherwise become "file not found: ss3:/..."). README says so.
UNKNOWN_SCHEMES = ["ss3://xx.xx/xx.pth", "openmmlabs3://xx.xx/xx.pth"]


def test_b6_a_model_saved_mmcv_style_has_no_classes(ours: Impl, tmp_path: Path) -> None:
    path = tmp_path / "model.pth"
    ours.save_checkpoint(Model(), str(path))
    assert "CLASSES" not in ours._load_checkpoint(str(path))["meta"]


@pytest.mark.parametrize("uri", sorted(SCHEMES))
def test_b6_each_prefix_goes_to_its_loader(impl: Impl, uri: str) -> None:
    assert impl.loader._get_checkpoint_loader(uri).__name__ == SCHEMES[uri]


@pytest.mark.parametrize("uri", UNKNOWN_SCHEMES)
def test_b6_unknown_schemes_are_refused_on_purpose(impl: Impl, uri: str) -> None:
    if impl.name == "stock":
        assert impl.loader._get_checkpoint_loader(uri).__name__ == "load_from_local"
        return
    with pytest.raises(UnknownSchemeError, match=re.escape(uri.split("://")[0] + "://")) as info:
        impl.loader._get_checkpoint_loader(uri)
    assert isinstance(info.value, ValueError) and "Registered schemes" in str(info.value)


@contextlib.contextmanager
def scratch_schemes(impl: Impl, *prefixes: str) -> Iterator[None]:
    """Removes `prefixes` from the registries afterwards (ckptmap's, and mmengine's)."""
    try:
        yield
    finally:
        for registry in (ckptmap.CheckpointLoader, mm.CheckpointLoader):
            for prefix in prefixes:
                registry._schemes.pop(prefix, None)


def test_b6_register_scheme(impl: Impl, tmp_path: Path) -> None:
    with scratch_schemes(impl, "ftp://", "a/b", "a/b/c"):

        @impl.loader.register_scheme(prefixes="ftp://")
        def load_from_ftp(filename: str, map_location: Any = None) -> Any:
            return {"loaded": filename}

        assert impl.loader._get_checkpoint_loader("ftp://m.pth") is load_from_ftp
        with pytest.raises(KeyError):
            impl.loader.register_scheme("ftp://", load_from_ftp)

        def load_from_ftp2(filename: str, map_location: Any = None) -> Any:
            return {"loaded again": filename}

        impl.loader.register_scheme("ftp://", load_from_ftp2, force=True)
        assert impl.loader._get_checkpoint_loader("ftp://m.pth") is load_from_ftp2
        assert impl._load_checkpoint("ftp://m.pth") == {"loaded again": "ftp://m.pth"}

        def short(filename: str, map_location: Any = None) -> Any:
            return "a/b"

        def long(filename: str, map_location: Any = None) -> Any:
            return "a/b/c"

        impl.loader.register_scheme("a/b", short)
        impl.loader.register_scheme("a/b/c", long)
        assert impl.loader._get_checkpoint_loader("a/b/c/d") is long
        assert impl.loader._get_checkpoint_loader("a/b/x") is short


# -- b7: save_checkpoint ---------------------------------------------------------------------------


def test_b7_bad_meta_raises_before_anything_is_written(impl: Impl, tmp_path: Path) -> None:
    target = tmp_path / "not" / "there" / "model.pth"
    with pytest.raises(TypeError):
        impl.save_checkpoint(Model(), str(target), meta="invalid type")
    assert not target.parent.exists()


def test_b7_save_forms_and_backends(impl: Impl, tmp_path: Path) -> None:
    model = Model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    impl.save_checkpoint(model.state_dict(), str(tmp_path / "sd.pth"))
    impl.save_checkpoint(
        {"model": model.state_dict(), "optimizer": optimizer.state_dict()}, str(tmp_path / "o.pth")
    )
    impl.save_checkpoint(
        model.state_dict(), str(tmp_path / "local.pth"), backend_args={"backend": "local"}
    )
    impl.save_checkpoint(  # deprecated in favour of backend_args: a log line, not an error
        model.state_dict(), str(tmp_path / "disk.pth"), file_client_args={"backend": "disk"}
    )
    for name in ("sd.pth", "local.pth", "disk.pth"):
        loaded = impl._load_checkpoint(str(tmp_path / name))
        assert list(loaded) == MODEL_KEYS
    assert impl._load_checkpoint(str(tmp_path / "o.pth"))["optimizer"]["param_groups"]


def test_b7_mmcv_forms(ours: Impl, tmp_path: Path) -> None:
    model = Model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ours.save_checkpoint(model, str(tmp_path / "m.pth"), optimizer, meta={"test": "test"})
    loaded = ours._load_checkpoint(str(tmp_path / "m.pth"))
    assert loaded["meta"]["test"] == "test" and list(loaded["state_dict"]) == MODEL_KEYS
    assert loaded["optimizer"]["param_groups"][0]["lr"] == 0.1


class PetrelStandIn:
    """``petrel_client``: a Client whose put/get keep objects in memory."""

    store: ClassVar[dict[str, bytes]] = {}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def put(self, uri: str, data: Any) -> int:
        # mmengine calls put(obj, path); ckptmap may call put(path, data).
        if not isinstance(uri, str):
            uri, data = data, uri
        PetrelStandIn.store[uri] = bytes(memoryview(data))
        return len(self.store[uri])

    def get(self, uri: str, **kwargs: Any) -> bytes | None:
        return PetrelStandIn.store.get(uri)

    def contains(self, uri: str) -> bool:
        return uri in PetrelStandIn.store


@pytest.fixture
def petrel(monkeypatch) -> dict[str, bytes]:
    package = types.ModuleType("petrel_client")
    package.__spec__ = importlib.machinery.ModuleSpec("petrel_client", None, is_package=True)
    client = types.ModuleType("petrel_client.client")
    client.__spec__ = importlib.machinery.ModuleSpec("petrel_client.client", None)
    client.Client = PetrelStandIn  # type: ignore[attr-defined]
    package.client = client  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "petrel_client", package)
    monkeypatch.setitem(sys.modules, "petrel_client.client", client)
    PetrelStandIn.store = {}
    return PetrelStandIn.store


def test_b7_s3_uris_through_petrel(
    impl: Impl, petrel: dict[str, bytes], request: pytest.FixtureRequest, monkeypatch
) -> None:
    if impl.name != "stock":
        # Should the save reach for boto3 anyway, it must not leave this machine.
        monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    model = Model()
    impl.save_checkpoint(model.state_dict(), "s3://path/of/your/checkpoint1.pth")
    impl.save_checkpoint(
        model.state_dict(),
        "s3://path//of/your/checkpoint2.pth",
        file_client_args={"backend": "petrel"},
    )
    assert set(petrel) == {
        "s3://path/of/your/checkpoint1.pth",
        "s3://path//of/your/checkpoint2.pth",
    }


def test_b7_s3_uris_through_boto3(ours: Impl, monkeypatch) -> None:
    # ckptmap's own S3 path (no petrel installed): a real S3 API on 127.0.0.1.
    import boto3

    model = Model()
    with moto_s3_server() as endpoint:
        for name, value in {
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }.items():
            monkeypatch.setenv(name, value)
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="path")
        ours.save_checkpoint(model.state_dict(), "s3://path/of/your/checkpoint1.pth")
        ours.save_checkpoint(
            {"state_dict": model.state_dict()},
            "s3://path/of/your/checkpoint2.pth",
            backend_args={"backend": "boto3"},
        )
        listed = boto3.client("s3", endpoint_url=endpoint).list_objects_v2(Bucket="path")
    assert sorted(o["Key"] for o in listed["Contents"]) == [
        "of/your/checkpoint1.pth",
        "of/your/checkpoint2.pth",
    ]


# -- b8: load_from_local expands ~ -----------------------------------------------------------------


def test_b8_load_from_local_expands_home(impl: Impl, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    model = Model()
    torch.save({"state_dict": model.state_dict()}, tmp_path / "dummy.pth")
    loaded = impl.load_from_local("~/dummy.pth", map_location=None)
    assert torch.equal(loaded["state_dict"]["block.conv.weight"], model.block.conv.weight)


def test_b8_mmcv_model_form(ours: Impl, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    model = Model()
    ours.save_checkpoint(model, str(tmp_path / "dummy.pth"))
    loaded = ours.load_from_local("~/dummy.pth", map_location=None)
    assert torch.equal(loaded["state_dict"]["block.conv.weight"], model.block.conv.weight)


# -- b9: meta['CLASSES'] (mmcv 1.x) ----------------------------------------------------------------


def test_b9_classes_are_saved_with_the_model(ours: Impl, tmp_path: Path) -> None:
    model = Model()
    path = str(tmp_path / "model.pth")
    ours.save_checkpoint(model, path)
    assert "CLASSES" not in ours.load_checkpoint(model, path)["meta"]
    model.CLASSES = ("class1", "class2")
    ours.save_checkpoint(model, path)
    assert ours.load_checkpoint(model, path)["meta"]["CLASSES"] == ("class1", "class2")
    with ours.wrapper_registered():
        wrapped = Wrapper(Model())
        wrapped.module.CLASSES = ("class1", "class2")
        ours.save_checkpoint(wrapped, path)
        assert ours.load_checkpoint(wrapped, path)["meta"]["CLASSES"] == ("class1", "class2")
