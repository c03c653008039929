"""Real architectures (torchvision ResNet-50, ViT-B/16, Swin-T; random weights, nothing
downloaded) saved by the real tools: `torch.save` of the state dict, mmengine's
`save_checkpoint` (a bare state dict, and the ``{"meta", "state_dict"}`` dict its hooks write),
and `torch.save` of a `DataParallel` wrapper's state dict (``module.`` keys). Each is loaded by
`ckptmap.load_checkpoint` and compared tensor by tensor with torch's own `load_state_dict` of
the same file.

Each architecture is built once per module; the loading targets are built on the ``meta``
device and loaded with ``assign=True`` (views of the mapped file), so ViT-B/16's 330 MB exist
once in memory plus the files' pages.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torchvision
from mmengine.runner.checkpoint import get_state_dict, save_checkpoint, weights_to_cpu
from torch import nn
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

import ckptmap

ARCHS: dict[str, Callable[..., nn.Module]] = {
    "resnet50": torchvision.models.resnet50,
    "vit_b_16": torchvision.models.vit_b_16,
    "swin_t": torchvision.models.swin_t,
}
PRODUCERS = ["torch_save", "mmengine_state_dict", "mmengine_meta", "data_parallel"]


def _save_all(model: nn.Module, directory: Path) -> dict[str, Path]:
    paths = {name: directory / f"{name}.pth" for name in PRODUCERS}
    torch.save(model.state_dict(), paths["torch_save"])
    # mmengine's own helpers: its state dict (with `_metadata`), moved to CPU, then saved.
    weights = weights_to_cpu(get_state_dict(model))
    save_checkpoint(weights, str(paths["mmengine_state_dict"]))
    meta = {"epoch": 3, "iter": 1200, "time": time.asctime(), "mmengine_version": "0.10.7"}
    save_checkpoint({"meta": meta, "state_dict": weights}, str(paths["mmengine_meta"]))
    del weights
    wrapped = nn.DataParallel(model)
    torch.save(wrapped.state_dict(), paths["data_parallel"])
    model.cpu()  # DataParallel moves a module to the only GPU, where there is one
    return paths


@pytest.fixture(scope="module", params=list(ARCHS))
def saved(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, nn.Module, dict[str, Path]]:
    arch = request.param
    torch.manual_seed(0)
    model = ARCHS[arch](weights=None).eval()
    paths = _save_all(model, tmp_path_factory.mktemp(arch))
    yield arch, model, paths
    for path in paths.values():
        path.unlink()


def on_meta(arch: str) -> nn.Module:
    with torch.device("meta"):
        return ARCHS[arch](weights=None).eval()


def torch_reference(arch: str, path: Path, producer: str) -> nn.Module:
    """torch's own reading of the file, with the unwrapping each producer calls for."""
    checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    state_dict = checkpoint["state_dict"] if producer == "mmengine_meta" else checkpoint
    if producer == "data_parallel":
        consume_prefix_in_state_dict_if_present(state_dict, "module.")
    model = on_meta(arch)
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model


@pytest.mark.parametrize("producer", PRODUCERS)
def test_loads_like_torch(saved: tuple[str, nn.Module, dict[str, Path]], producer: str) -> None:
    arch, source, paths = saved
    ours = on_meta(arch)
    # strict=True: every key matched, `module.` stripped by the default revise_keys.
    returned = ckptmap.load_checkpoint(
        ours, paths[producer], map_location="cpu", strict=True, assign=True
    )
    theirs = torch_reference(arch, paths[producer], producer)
    expected = source.state_dict()
    ours_state, theirs_state = ours.state_dict(), theirs.state_dict()
    assert list(ours_state) == list(expected) == list(theirs_state)
    for name, value in expected.items():
        assert ours_state[name].device.type == "cpu", name
        assert ours_state[name].dtype == value.dtype, name
        assert torch.equal(ours_state[name], value), name
        assert torch.equal(ours_state[name], theirs_state[name]), name
    if producer == "mmengine_meta":
        assert returned["meta"]["epoch"] == 3


def test_the_mmengine_state_dict_keeps_batchnorm_versions(
    saved: tuple[str, nn.Module, dict[str, Path]],
) -> None:
    arch, source, paths = saved
    loaded = ckptmap.load_file(paths["mmengine_state_dict"])
    metadata = getattr(loaded, "_metadata", None)
    assert metadata is not None
    norms = [n for n, m in source.named_modules() if isinstance(m, nn.modules.batchnorm._NormBase)]
    for name in norms:
        assert metadata[name]["version"] == 2, name
    assert bool(norms) == (arch == "resnet50")


def test_prefix_of_a_stage_loads_into_that_submodule(
    saved: tuple[str, nn.Module, dict[str, Path]],
) -> None:
    arch, source, paths = saved
    prefix = {
        "resnet50": "layer2",
        "vit_b_16": "encoder.layers.encoder_layer_3",
        "swin_t": "features.3",
    }[arch]
    kept = ckptmap._load_checkpoint_with_prefix(prefix, paths["mmengine_meta"], map_location="cpu")
    submodule = source.get_submodule(prefix)
    expected = submodule.state_dict()
    assert list(kept) == list(expected)
    for name, value in expected.items():
        assert torch.equal(kept[name], value), name
    with torch.device("meta"):
        target = on_meta(arch).get_submodule(prefix)
    target.load_state_dict(kept, strict=True, assign=True)
