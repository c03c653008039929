"""The scheme registry, local paths, model-zoo names, pavi/petrel, and safe path joining."""

from __future__ import annotations

import enum
import io
import json
import logging
import os
import pickle
import sys
import types
from collections import OrderedDict

import pytest
import torch
from servers import checkpoint_bytes, checkpoint_server

from ckptmap.errors import (
    CheckpointNotFoundError,
    MissingDependencyError,
    UnknownModelNameError,
    UnknownSchemeError,
    UnsafePathError,
    ZooTableError,
)
from ckptmap.paths import check_relative_name, safe_join
from ckptmap.schemes import (
    CheckpointLoader,
    get_deprecated_model_names,
    get_external_models,
    get_mmcls_models,
    get_torchvision_models,
    load_from_ceph,
    load_from_local,
)
from ckptmap.schemes import zoo as zoo_module
from ckptmap.schemes.zoo import resolve_zoo_url, torchvision_weight_urls

BODY = checkpoint_bytes(0)


@pytest.fixture
def home(tmp_path, monkeypatch):
    root = tmp_path / "home"
    root.mkdir()
    monkeypatch.setenv("CKPTMAP_HOME", str(root))
    return root


@pytest.fixture
def server():
    with checkpoint_server() as srv:
        yield srv


@pytest.fixture
def registry():
    schemes, patterns = CheckpointLoader._schemes, dict(CheckpointLoader._patterns)
    yield CheckpointLoader
    CheckpointLoader._schemes = schemes
    CheckpointLoader._patterns.clear()
    CheckpointLoader._patterns.update(patterns)


def weights(checkpoint):
    return checkpoint["state_dict"]["weight"]


EXPECTED_WEIGHT = weights(torch.load(io.BytesIO(BODY), weights_only=True))


def write_table(home, name, table):
    (home / name).write_text(json.dumps(table), encoding="utf-8")


# Registry ------------------------------------------------------------------------------------


def test_builtin_schemes_are_registered():
    schemes = CheckpointLoader.registered_schemes()
    for prefix in (
        "",
        "http://",
        "https://",
        "torchvision://",
        "modelzoo://",
        "open-mmlab://",
        "openmmlab://",
        "mmcls://",
        "mmdet://",
        "mmseg://",
        "bdd100k://",
        r"(\S+\:)?s3://",
        r"(\S+\:)?petrel://",
        "pavi://",
    ):
        assert prefix in schemes
    lengths = [len(p) for p in schemes]
    assert lengths == sorted(lengths, reverse=True)


def test_register_as_call_and_decorator(registry):
    def load_from_alpha(filename, map_location=None):
        return {"alpha": filename}

    assert registry.register_scheme("alpha://", load_from_alpha) is None

    @registry.register_scheme(prefixes=("beta://", "gamma://"))
    def load_from_beta(filename, map_location=None):
        return {"beta": filename, "map_location": map_location}

    assert load_from_beta.__name__ == "load_from_beta"  # the decorator returns the function
    assert registry.load_checkpoint("alpha://x") == {"alpha": "alpha://x"}
    assert registry.load_checkpoint("gamma://y", "cpu") == {
        "beta": "gamma://y",
        "map_location": "cpu",
    }


def test_duplicates_need_force(registry):
    registry.register_scheme("dup://", lambda f, m=None: 1)
    with pytest.raises(KeyError, match="already registered"):
        registry.register_scheme(["new://", "dup://"], lambda f, m=None: 2)
    # Nothing of a refused call is registered.
    assert "new://" not in registry.registered_schemes()
    registry.register_scheme("dup://", lambda f, m=None: 3, force=True)
    assert registry.load_checkpoint("dup://x") == 3


def test_longer_prefixes_win(registry):
    registry.register_scheme("zoo://", lambda f, m=None: "short")
    registry.register_scheme("zoo://special/", lambda f, m=None: "long")
    assert registry.load_checkpoint("zoo://special/x") == "long"
    assert registry.load_checkpoint("zoo://other/x") == "short"


def test_regex_prefixes_and_cluster_names():
    assert CheckpointLoader._get_checkpoint_loader("s3://b/k.pth") is load_from_ceph
    assert CheckpointLoader._get_checkpoint_loader("cluster1:s3://b/k.pth") is load_from_ceph
    petrel = CheckpointLoader._get_checkpoint_loader("cluster1:petrel://b/k.pth")
    assert petrel.__name__ == "load_from_petrel"


def test_unknown_scheme_lists_the_registered_ones():
    with pytest.raises(UnknownSchemeError) as info:
        CheckpointLoader.load_checkpoint("hdfs://cluster/model.pth")
    message = str(info.value)
    assert "'hdfs://'" in message and "'https://'" in message and "'torchvision://'" in message
    assert isinstance(info.value, ValueError)
    assert "https://" in info.value.schemes


@pytest.mark.parametrize("path", ["C:\\models\\x.pth", "D:/models/x.pth", "c:x.pth", "D://x.pth"])
def test_windows_drive_paths_stay_local(path):
    assert CheckpointLoader._get_checkpoint_loader(path) is load_from_local
    with pytest.raises(FileNotFoundError):
        CheckpointLoader.load_checkpoint(path)


def test_local_paths_with_home_expansion(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "ckpt.pth").write_bytes(BODY)
    with caplog.at_level(logging.INFO, logger="ckptmap"):
        checkpoint = CheckpointLoader.load_checkpoint("~/ckpt.pth", map_location="cpu")
    assert torch.equal(weights(checkpoint), EXPECTED_WEIGHT)
    assert "Loads checkpoint by local backend from path: ~/ckpt.pth" in caplog.text
    checkpoint = CheckpointLoader.load_checkpoint(tmp_path / "ckpt.pth")  # a PathLike
    assert torch.equal(weights(checkpoint), EXPECTED_WEIGHT)


def test_local_missing_file(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match=r"nope\.pth"):
        CheckpointLoader.load_checkpoint(str(tmp_path / "nope.pth"))


# Safe joining --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "",
        "  ",
        "..",
        ".",
        "../x.pth",
        "a/../../x.pth",
        "a/./x.pth",
        "/etc/passwd",
        "C:x.pth",
        "c:/x.pth",
        "a/D:/x.pth",
        "a\\..\\x.pth",
        "x\x00.pth",
        "x\n.pth",
        "a//b.pth",
        "a/",
        "s3://bucket/key",
        ".x.pth.ckptmap-tmp-1-abc",
    ],
)
def test_unsafe_names_are_rejected(tmp_path, name):
    with pytest.raises(UnsafePathError) as info:
        safe_join(tmp_path / "root", name)
    assert repr(name) in str(info.value)
    assert not (tmp_path / "root").exists()


def test_safe_names_are_joined(tmp_path):
    assert safe_join(tmp_path, "a/b.pth") == tmp_path.resolve() / "a" / "b.pth"
    assert safe_join(tmp_path, "..b.pth").name == "..b.pth"
    assert check_relative_name("x/y-0676ba61.pth") == ("x", "y-0676ba61.pth")
    with pytest.raises(UnsafePathError, match="directory part"):
        safe_join(tmp_path, "a/b.pth", allow_subdirs=False)


def test_symlinks_out_of_the_root_are_rejected(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "link").symlink_to(outside)
    with pytest.raises(UnsafePathError, match="outside the directory"):
        safe_join(root, "link/x.pth")


# Model zoos ----------------------------------------------------------------------------------


def test_tables_come_from_mmengine_package_data(home):
    pytest.importorskip("mmengine")
    assert get_external_models()["vgg16_caffe"].startswith("https://")
    assert get_deprecated_model_names()["resnet50_caffe"] == "detectron/resnet50_caffe"
    assert "vgg11" in get_mmcls_models()
    assert get_torchvision_models()["resnet50"].startswith("https://download.pytorch.org/")


def test_user_table_overrides_and_loads(home, server):
    url = server.add("/zoo/mine.pth", BODY)
    write_table(home, "open_mmlab.json", {"vgg16_caffe": url, "mine": url})
    assert get_external_models()["vgg16_caffe"] == url
    for uri in ("open-mmlab://mine", "openmmlab://mine", "open-mmlab://vgg16_caffe"):
        assert torch.equal(weights(CheckpointLoader.load_checkpoint(uri)), EXPECTED_WEIGHT)
    assert server.hits["/zoo/mine.pth"] == 1  # one cache entry for one URL


def test_deprecated_names_redirect_with_a_warning(home, server):
    url = server.add("/zoo/new.pth", BODY)
    write_table(home, "open_mmlab.json", {"brand_new": url})
    write_table(home, "deprecated.json", {"old_name": "brand_new"})
    with pytest.warns(FutureWarning, match="open-mmlab://old_name is deprecated in favor of"):
        checkpoint = CheckpointLoader.load_checkpoint("open-mmlab://old_name")
    assert torch.equal(weights(checkpoint), EXPECTED_WEIGHT)


def test_deprecated_names_of_mmengine_redirect(home, server):
    pytest.importorskip("mmengine")
    url = server.add("/zoo/detectron.pth", BODY)
    write_table(home, "open_mmlab.json", {"detectron/resnet50_caffe": url})
    with pytest.warns(FutureWarning, match="detectron/resnet50_caffe"):
        CheckpointLoader.load_checkpoint("openmmlab://resnet50_caffe")


def test_unknown_zoo_name_suggests_close_matches(home):
    write_table(home, "open_mmlab.json", {"resnet50_v1c": "https://example.invalid/x.pth"})
    with pytest.raises(KeyError) as info:
        CheckpointLoader.load_checkpoint("open-mmlab://resnet50_v1")
    error = info.value
    assert isinstance(error, UnknownModelNameError)
    assert "resnet50_v1c" in error.suggestions
    assert "open-mmlab://resnet50_v1c" in str(error) and "open_mmlab.json" in str(error)


def test_non_url_entries_resolve_inside_the_cache_home(home):
    (home / "models").mkdir()
    (home / "models" / "mine.pth").write_bytes(BODY)
    write_table(home, "open_mmlab.json", {"mine": "models/mine.pth", "lost": "models/lost.pth"})
    assert torch.equal(
        weights(CheckpointLoader.load_checkpoint("open-mmlab://mine")), EXPECTED_WEIGHT
    )
    with pytest.raises(CheckpointNotFoundError, match=r"lost\.pth"):
        CheckpointLoader.load_checkpoint("open-mmlab://lost")


@pytest.mark.parametrize(
    "value", ["../outside.pth", "/etc/passwd", "C:/x.pth", "a/../../x.pth", "x\x00.pth"]
)
def test_table_values_can_not_leave_the_cache_home(home, tmp_path, value):
    (tmp_path / "outside.pth").write_bytes(BODY)
    write_table(home, "open_mmlab.json", {"evil": value})
    with pytest.raises(UnsafePathError):
        CheckpointLoader.load_checkpoint("open-mmlab://evil")


@pytest.mark.parametrize("content", ["not json", "[1, 2]", '{"a": 3}'])
def test_malformed_tables_are_named(home, content):
    (home / "open_mmlab.json").write_text(content)
    with pytest.raises(ZooTableError, match=r"open_mmlab\.json"):
        CheckpointLoader.load_checkpoint("open-mmlab://a")


def test_mmcls_keeps_backbone_keys_stripped(home, server):
    state = OrderedDict(
        [
            ("backbone.conv.weight", torch.ones(2)),
            ("backbone.bn.running_mean", torch.zeros(2)),
            ("head.fc.weight", torch.ones(3)),
        ]
    )
    state._metadata = OrderedDict([("backbone.bn", {"version": 2}), ("head", {})])
    buffer = io.BytesIO()
    torch.save({"state_dict": state, "meta": {"epoch": 3}}, buffer)
    write_table(home, "mmcls.json", {"tiny": server.add("/mmcls/tiny.pth", buffer.getvalue())})
    checkpoint = CheckpointLoader.load_checkpoint("mmcls://tiny")
    assert list(checkpoint) == ["state_dict"]
    assert list(checkpoint["state_dict"]) == ["conv.weight", "bn.running_mean"]
    assert checkpoint["state_dict"]._metadata == {"bn": {"version": 2}}


def test_mmcls_without_a_state_dict(home, server):
    buffer = io.BytesIO()
    torch.save([1, 2], buffer)
    write_table(home, "mmcls.json", {"list": server.add("/mmcls/list.pth", buffer.getvalue())})
    with pytest.raises(RuntimeError, match="No state_dict found"):
        CheckpointLoader.load_checkpoint("mmcls://list")


def test_vis4d_url_maps():
    assert resolve_zoo_url("mmdet://a/b.pth") == (
        "https://download.openmmlab.com/mmdetection/v2.0/a/b.pth"
    )
    assert resolve_zoo_url("mmseg://x.pth").startswith(
        "https://download.openmmlab.com/mmsegmentation/v0.5/"
    )
    assert resolve_zoo_url("bdd100k://det/m.pth") == "https://dl.cv.ethz.ch/bdd100k/det/m.pth"
    assert resolve_zoo_url("mmdet://a?b#c.pth").endswith("/a%3Fb%23c.pth")


@pytest.mark.parametrize(
    "uri",
    ["mmdet://../x.pth", "mmseg://a/../../x.pth", "bdd100k:///etc/x", "mmdet://", "mmdet://a\x00"],
)
def test_vis4d_names_can_not_traverse(uri):
    with pytest.raises(UnsafePathError):
        CheckpointLoader.load_checkpoint(uri)


def test_mmdet_loads_through_the_cache(home, server, monkeypatch):
    server.add("/mmdet/faster/x.pth", BODY)
    monkeypatch.setitem(zoo_module.MM_MODEL_MAP, "mmdet://", server.url("/mmdet/"))
    checkpoint = CheckpointLoader.load_checkpoint("mmdet://faster/x.pth")
    assert torch.equal(weights(checkpoint), EXPECTED_WEIGHT)


class _Weight:
    def __init__(self, url):
        self.url = url


class _WeightsEnum(enum.Enum):
    @property
    def url(self):
        return self.value.url


def _stand_in_torchvision(url_v1, url_v2):
    """An object with torchvision's weight-enum API (torchvision is not installed here)."""
    shared = _Weight(url_v2)
    ResNet50_Weights = _WeightsEnum(
        "ResNet50_Weights",
        [("IMAGENET1K_V1", _Weight(url_v1)), ("IMAGENET1K_V2", shared), ("DEFAULT", shared)],
    )
    empty = _WeightsEnum("MNASNet0_75_Weights", [])
    return types.SimpleNamespace(
        ResNet50_Weights=ResNet50_Weights, MNASNet0_75_Weights=empty, resnet50=object()
    )


def test_torchvision_weight_enums_become_names():
    models = _stand_in_torchvision("https://h/v1.pth", "https://h/v2.pth")
    assert torchvision_weight_urls(models) == {
        "resnet50.default": "https://h/v2.pth",
        "resnet50.imagenet1k_v1": "https://h/v1.pth",
        "resnet50.imagenet1k_v2": "https://h/v2.pth",
    }
    registry = {"resnet50": models.ResNet50_Weights}
    api = types.SimpleNamespace(
        list_models=lambda module: list(registry), get_model_weights=registry.__getitem__
    )
    assert torchvision_weight_urls(api)["resnet50.default"] == "https://h/v2.pth"


def test_torchvision_names(home, server, monkeypatch):
    models = _stand_in_torchvision(server.add("/tv/v1.pth", BODY), "https://h/v2.pth")
    monkeypatch.setattr(zoo_module, "_torchvision_installed", lambda: True)
    monkeypatch.setattr(zoo_module, "_torchvision_enums", lambda: torchvision_weight_urls(models))
    for name in ("resnet50.imagenet1k_v1", "ResNet50_Weights.IMAGENET1K_V1"):
        checkpoint = CheckpointLoader.load_checkpoint(f"torchvision://{name}")
        assert torch.equal(weights(checkpoint), EXPECTED_WEIGHT)
    with pytest.warns(FutureWarning, match="modelzoo://"):
        CheckpointLoader.load_checkpoint("modelzoo://resnet50.imagenet1k_v1")
    with pytest.raises(UnknownModelNameError) as info:
        CheckpointLoader.load_checkpoint("torchvision://resnet50.imagenet1k_v3")
    assert "resnet50.imagenet1k_v1" in info.value.suggestions


def test_torchvision_missing_is_a_clear_import_error(home, server, monkeypatch):
    monkeypatch.setattr(zoo_module, "_torchvision_installed", lambda: False)
    with pytest.raises(ImportError) as info:
        CheckpointLoader.load_checkpoint("torchvision://resnet50.imagenet1k_v1")
    assert isinstance(info.value, MissingDependencyError)
    assert "pip install torchvision" in str(info.value)
    assert "torchvision.json" in str(info.value)
    # Names in a table still work without torchvision.
    write_table(home, "torchvision.json", {"resnet50": server.add("/tv/r50.pth", BODY)})
    checkpoint = CheckpointLoader.load_checkpoint("torchvision://resnet50")
    assert torch.equal(weights(checkpoint), EXPECTED_WEIGHT)


# pavi and petrel -----------------------------------------------------------------------------


def test_petrel_missing_is_a_clear_import_error():
    for call in (
        lambda: CheckpointLoader.load_checkpoint("petrel://bucket/x.pth"),
        lambda: CheckpointLoader.load_checkpoint("cluster:petrel://bucket/x.pth"),
        lambda: load_from_ceph("s3://bucket/x.pth", backend="petrel"),
    ):
        with pytest.raises(ImportError, match="petrel_client"):
            call()


def test_pavi_missing_is_a_clear_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "pavi", None)
    with pytest.raises(ImportError, match="pip install pavi"):
        CheckpointLoader.load_checkpoint("pavi://project/model")


def _stand_in_pavi(name, body, calls):
    class Model:
        def __init__(self):
            self.name = name

        def download(self, path):
            calls.append(path)
            with open(path, "wb") as handle:
                handle.write(body)

    modelcloud = types.SimpleNamespace(get=lambda model_path: Model())
    return types.SimpleNamespace(modelcloud=modelcloud)


def test_pavi_client_is_used_when_present(monkeypatch):
    calls = []
    monkeypatch.setitem(sys.modules, "pavi", _stand_in_pavi("model.pth", BODY, calls))
    checkpoint = CheckpointLoader.load_checkpoint("pavi://project/model")
    assert torch.equal(weights(checkpoint), EXPECTED_WEIGHT)
    assert not os.path.exists(calls[0])  # the temporary directory is gone


def test_pavi_model_names_can_not_traverse(monkeypatch, tmp_path):
    calls = []
    evil = str(tmp_path / "evil.pth")
    monkeypatch.setitem(sys.modules, "pavi", _stand_in_pavi(evil, BODY, calls))
    with pytest.raises(UnsafePathError):
        CheckpointLoader.load_checkpoint("pavi://project/model")
    assert calls == [] and not os.path.exists(evil)


def test_scheme_errors_pickle():
    err = UnknownModelNameError("nope", name="x", suggestions=["y"], sources=["z"])
    copy = pickle.loads(pickle.dumps(err))
    assert str(copy) == "nope" and copy.suggestions == ["y"] and isinstance(copy, KeyError)
    unsafe = pickle.loads(pickle.dumps(UnsafePathError("bad", name="..", root="/r")))
    assert unsafe.name == ".." and isinstance(unsafe, ValueError)
