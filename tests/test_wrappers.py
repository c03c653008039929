"""Model wrappers: every class mmengine unwraps, unwrapped as mmengine does it.

ckptmap's `register_model_wrapper` (any class with a ``.module``), mmengine's ``MODEL_WRAPPERS``
registry and its child registries (read live, never imported by ckptmap), BaseTTAModel for
loads, DataParallel; FSDP in a real 2-process gloo group. Results are compared with mmengine's
own `get_state_dict` and `load_state_dict` on the same structures.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import multiprocessing
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mmengine.runner.checkpoint as mm
import pytest
import torch
from fsdp_ranks import Net, fsdp_rank
from mmengine.model import BaseTTAModel
from mmengine.registry import MODEL_WRAPPERS, Registry
from servers import free_port
from torch import nn

import ckptmap
from ckptmap import wrappers
from ckptmap.errors import ModelWrapperError

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")


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

    def test_step(self, data: Any) -> Any:  # what BaseTTAModel asks of its module
        return data


class PlainWrapper:
    """A wrapper that is not an nn.Module, as mmengine's and mmcv's own tests use."""

    def __init__(self, module: Any) -> None:
        self.module = module


class ModuleWrapper(nn.Module):
    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module


class TTA(BaseTTAModel):
    def merge_preds(self, data_samples_list: Any) -> Any:
        return data_samples_list


_unique = itertools.count()


@contextlib.contextmanager
def registered_with_ckptmap(*classes: type) -> Iterator[None]:
    for cls in classes:
        assert ckptmap.register_model_wrapper(cls) is cls
    try:
        yield
    finally:
        for cls in classes:
            wrappers._MODEL_WRAPPERS.remove(cls)


@contextlib.contextmanager
def registered_with_mmengine(registry: Any, *bases: type) -> Iterator[list[type]]:
    """Fresh subclasses of `bases`, registered in `registry` only; unregistered afterwards."""
    made = [type(f"{base.__name__}{next(_unique)}", (base,), {}) for base in bases]
    for cls in made:
        registry.register_module(module=cls)
    try:
        yield made
    finally:
        for cls in made:
            registry._module_dict.pop(cls.__name__)


def fresh_model(seed: int) -> Model:
    torch.manual_seed(seed)
    model = Model()
    for p in itertools.chain(model.parameters(), model.buffers()):
        if p.is_floating_point():
            nn.init.normal_(p)
    return model


def assert_same_state_dict(ours: dict[str, Any], theirs: dict[str, Any]) -> None:
    assert list(ours) == list(theirs)
    for key in theirs:
        assert torch.equal(ours[key], theirs[key]), key
    assert dict(ours._metadata) == dict(theirs._metadata)


def wrapped_structures(wrapper: type) -> list[tuple[str, Any]]:
    """(name, object) for a model wrapped at the root, around children, and twice."""
    c = fresh_model(0)
    c.block = nn.DataParallel(c.block)
    structures = [
        ("root", wrapper(fresh_model(0))),
        ("root and DataParallel children", wrapper(c)),
        ("twice", wrapper(wrapper(fresh_model(0)))),
    ]
    if issubclass(wrapper, nn.Module):  # only modules can be children
        b = fresh_model(0)
        b.block = wrapper(b.block)
        b.conv = wrapper(b.conv)
        structures.append(("children", b))
    return structures


# -- registration ---------------------------------------------------------------------------------


def test_register_model_wrapper_takes_any_class() -> None:
    plain = PlainWrapper(fresh_model(0))
    assert not ckptmap.is_model_wrapper(plain)
    with registered_with_ckptmap(PlainWrapper):
        assert ckptmap.is_model_wrapper(plain)
        assert ckptmap.unwrap_model(plain) is plain.module
        assert ckptmap.is_model_wrapper(nn.DataParallel(nn.Linear(1, 1)))
    assert not ckptmap.is_model_wrapper(plain)
    with pytest.raises(TypeError, match="takes a class"):
        ckptmap.register_model_wrapper(plain)  # type: ignore[arg-type]


def test_a_registered_wrapper_without_module_is_a_clear_error() -> None:
    class Broken:
        pass

    with registered_with_ckptmap(Broken):
        for call in (
            lambda: ckptmap.get_state_dict(Broken()),  # type: ignore[arg-type]
            lambda: ckptmap.load_state_dict(Broken(), {}),  # type: ignore[arg-type]
        ):
            with pytest.raises(ModelWrapperError, match=r"no \.module") as info:
                call()
            assert isinstance(info.value, AttributeError)


@pytest.mark.parametrize("wrapper", [PlainWrapper, ModuleWrapper])
def test_get_state_dict_sees_through_classes_registered_with_ckptmap(wrapper: type) -> None:
    with registered_with_ckptmap(wrapper):
        for name, obj in wrapped_structures(wrapper):
            assert_same_state_dict(ckptmap.get_state_dict(obj), fresh_model(0).state_dict())
            assert name


@pytest.mark.parametrize("wrapper", [PlainWrapper, ModuleWrapper])
@pytest.mark.parametrize("registry", ["MODEL_WRAPPERS", "a child registry"])
def test_get_state_dict_sees_through_mmengine_registries_as_mmengine_does(
    wrapper: type, registry: str
) -> None:
    target = MODEL_WRAPPERS
    if registry != "MODEL_WRAPPERS":  # what a downstream project's own registry looks like
        target = Registry(
            f"wrappers{next(_unique)}", parent=MODEL_WRAPPERS, scope=f"s{next(_unique)}"
        )
    with registered_with_mmengine(target, wrapper) as (cls,):
        assert ckptmap.is_model_wrapper(cls(None))
        for name, obj in wrapped_structures(cls):
            ours = ckptmap.get_state_dict(obj)
            assert list(ours) == list(fresh_model(0).state_dict()), name
            if name == "twice":
                # mmengine unwraps one level per module (the inner wrapper then either has no
                # _version or adds "module."); ckptmap unwraps until the model.
                if wrapper is PlainWrapper:
                    with pytest.raises(AttributeError):
                        mm.get_state_dict(obj)
                else:
                    assert all(k.startswith("module.") for k in mm.get_state_dict(obj))
                continue
            assert_same_state_dict(ours, mm.get_state_dict(obj))
    assert not ckptmap.is_model_wrapper(cls(None))


@pytest.mark.parametrize("wrapper", [PlainWrapper, ModuleWrapper])
def test_loads_go_through_wrappers_as_mmengine_does(wrapper: type, tmp_path: Path) -> None:
    source = fresh_model(7).state_dict()
    path = tmp_path / "model.pth"
    torch.save({"state_dict": source}, path)
    with registered_with_mmengine(MODEL_WRAPPERS, wrapper) as (cls,):
        for (name, ours), (_, theirs) in zip(
            wrapped_structures(cls), wrapped_structures(cls), strict=True
        ):
            result = ckptmap.load_state_dict(ours, source, strict=True)
            assert result.ok, name
            assert_same_state_dict(ckptmap.get_state_dict(ours), source)
            if name == "twice":  # mmengine unwraps one level only
                with pytest.raises((AttributeError, RuntimeError)):
                    mm.load_state_dict(theirs, source, strict=True)
                continue
            mm.load_state_dict(theirs, source, strict=True)
            assert_same_state_dict(ckptmap.get_state_dict(ours), mm.get_state_dict(theirs))
            fresh = wrapped_structures(cls)[0][1]
            ckptmap.load_checkpoint(fresh, str(path), strict=True)
            assert_same_state_dict(ckptmap.get_state_dict(fresh), source)


def test_save_checkpoint_of_a_wrapper_saves_the_module(tmp_path: Path) -> None:
    model = fresh_model(3)
    model.CLASSES = ("cat", "dog")
    with registered_with_mmengine(MODEL_WRAPPERS, PlainWrapper) as (cls,):
        path = tmp_path / "wrapped.pth"
        ckptmap.save_checkpoint(cls(model), str(path))
        checkpoint = ckptmap._load_checkpoint(str(path))
    assert_same_state_dict(checkpoint["state_dict"], model.state_dict())
    assert checkpoint["meta"]["CLASSES"] == ("cat", "dog")


# -- BaseTTAModel ------------------------------------------------------------------------------


def test_tta_models_load_into_their_module_and_save_as_mmengine_does(tmp_path: Path) -> None:
    source = fresh_model(5).state_dict()
    ours, theirs = TTA(module=fresh_model(0)), TTA(module=fresh_model(0))
    result = ckptmap.load_state_dict(ours, source, strict=True)
    mm.load_state_dict(theirs, source, strict=True)
    assert result.ok and result.num_source_keys == len(source)
    assert_same_state_dict(ours.module.state_dict(), source)
    assert_same_state_dict(ours.module.state_dict(), theirs.module.state_dict())
    # mmengine's get_state_dict keeps a TTA model's "module." prefix; so does ckptmap.
    assert_same_state_dict(ckptmap.get_state_dict(ours), mm.get_state_dict(theirs))
    assert all(k.startswith("module.") for k in ckptmap.get_state_dict(ours))
    # A TTA model deeper in the tree, and a checkpoint saved from a TTA model, load too.
    path = tmp_path / "tta.pth"
    ckptmap.save_checkpoint({"state_dict": ckptmap.get_state_dict(ours)}, str(path))
    again = TTA(module=fresh_model(0))
    ckptmap.load_checkpoint(again, str(path), strict=True)
    assert_same_state_dict(again.module.state_dict(), source)


def test_wrappers_work_without_mmengine_imported() -> None:
    script = textwrap.dedent(
        """
        import sys, torch, ckptmap
        class W:
            def __init__(self, m): self.module = m
        ckptmap.register_model_wrapper(W)
        m = torch.nn.Linear(2, 2)
        assert list(ckptmap.get_state_dict(W(torch.nn.DataParallel(m)))) == ["weight", "bias"]
        assert ckptmap.load_state_dict(W(m), m.state_dict()).ok
        assert not [k for k in sys.modules if k.startswith("mmengine")]
        """
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


# -- FSDP in a real 2-process gloo group ---------------------------------------------------------

WORLD_SIZE = 2


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    root = tmp_path_factory.mktemp("fsdp")
    torch.manual_seed(0)
    checkpoint = root / "net.pth"
    torch.save({"state_dict": Net().state_dict()}, checkpoint)
    ctx = multiprocessing.get_context("spawn")
    port = free_port()
    procs = [
        ctx.Process(target=fsdp_rank, args=(rank, port, str(checkpoint), str(root)))
        for rank in range(WORLD_SIZE)
    ]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(180)
    hung = [proc for proc in procs if proc.is_alive()]
    for proc in hung:
        proc.kill()
        proc.join(10)
    assert not hung, "a rank did not finish"
    assert [proc.exitcode for proc in procs] == [0] * WORLD_SIZE
    return [json.loads((root / f"{rank}.json").read_text()) for rank in range(WORLD_SIZE)]


def test_fsdp1_full_state_dicts_load_and_save(fsdp_runs: list[dict[str, Any]]) -> None:
    for report in fsdp_runs:
        assert report["fsdp1_sharded"] == ["_fsdp_wrapped_module._flat_param"]
        assert report["fsdp1_keys"] == list(Net().state_dict())
        assert report["fsdp1_equal"]


def test_fsdp2_loads_are_refused_with_a_typed_error(fsdp_runs: list[dict[str, Any]]) -> None:
    for report in fsdp_runs:
        name, is_type_error, message = report["fsdp2_error"]
        assert name == "UnsupportedModelError" and is_type_error
        assert "fully_shard" in message and "set_model_state_dict" in message
        assert report["fsdp2_untouched"]
        assert report["fsdp2_state_dict_as_torch"]
