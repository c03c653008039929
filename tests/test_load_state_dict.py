"""`ckptmap.module_load.load_state_dict` against `torch.nn.Module.load_state_dict`.

The differential tests build random module trees twice from one spec, load one perturbed state
dict into each (torch's loader and ours), and require the same parameters, buffers, extra
states, hook observations and missing / unexpected / error lists. torch raises on a shape
mismatch after loading everything else; we report it instead, so torch's error is caught and
its messages compared with ours.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import subprocess
import sys
import textwrap
import warnings
from collections import OrderedDict
from typing import Any
from unittest import mock

import pytest
import torch
from devices import DEVICES, DeferredDevice, data_parallel
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import ckptmap.module_load as module_load
import ckptmap.report as report_module
from ckptmap.engines import using_engine
from ckptmap.errors import (
    CkptmapError,
    InvalidStateDictError,
    LoadHookError,
    NothingLoadedWarning,
    StateDictMismatchError,
)
from ckptmap.module_load import (
    is_model_wrapper,
    load_state_dict,
    unwrap_model,
)
from ckptmap.report import LoadResult, Mismatch

# --------------------------------------------------------------------------------------------
# Module zoo: every behaviour torch's loader has to honour.


def _record_post_hook(module: nn.Module, incompatible: Any) -> None:
    # What the hook sees: the shared lists so far, and its subtree's weights already loaded.
    weights = [p.detach().clone() for p in module.parameters()]
    module.seen.append(
        (tuple(incompatible.missing_keys), tuple(incompatible.unexpected_keys), weights)
    )


def _forgive_post_hook(module: nn.Module, incompatible: Any) -> None:
    # Post-hooks may edit the shared lists in place; later modules see the edit.
    incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if not k.endswith(".s")]


def _scale_pre_hook(module, state_dict, prefix, local_metadata, strict, missing, unexpected, errs):
    key = prefix + "w"
    value = state_dict.get(key)
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        state_dict[key] = value * 2


def _drop_first_child_pre_hook(module, state_dict, prefix, *args):
    # Deleting a child's keys: the child must not see them.
    first = next((name for name, child in module._modules.items() if child is not None), None)
    if first is not None:
        for key in [k for k in state_dict if k.startswith(f"{prefix}{first}.")]:
            del state_dict[key]


def _legacy_pre_hook(state_dict, prefix, local_metadata, strict, missing, unexpected, errs):
    # Registered with `_register_load_state_dict_pre_hook(with_module=False)`: no module arg.
    for key in [k for k in state_dict if k.startswith(prefix) and k.endswith(".legacy_w")]:
        state_dict[key[: -len("legacy_w")] + "w"] = state_dict.pop(key)


class Node(nn.Module):
    """A module with configurable own state (see `build`)."""

    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__()
        if spec.get("w") is not None:
            self.w = nn.Parameter(torch.randn(*spec["w"]))
        if spec.get("none_param"):
            self.register_parameter("nothing", None)
        if spec.get("scalar"):
            self.s = nn.Parameter(torch.randn(()))
        buf = spec.get("buf")
        if buf is not None:
            self.register_buffer("b", torch.randn(2), persistent=buf == "persistent")
        if spec.get("none_buf"):
            self.register_buffer("nobuf", None)


class Renamer(Node):
    """Renames old keys of its own and of its children, as OpenMMLab modules do."""

    def _load_from_state_dict(self, state_dict, prefix, *args):
        for key in list(state_dict):
            if key.startswith(prefix) and key.endswith("old_w"):
                state_dict[key[: -len("old_w")] + "w"] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args)


class Extra(Node):
    """A module with an extra state."""

    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__(spec)
        self.count = spec.get("count", 0)

    def get_extra_state(self) -> Any:
        return {"count": self.count}

    def set_extra_state(self, state: Any) -> None:
        self.count = state["count"] if isinstance(state, dict) else -1


class Raiser(nn.Module):
    def _load_from_state_dict(self, *args):
        raise KeyError("boom")


def build(spec: dict[str, Any], seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return _build(spec)


def _build(spec: dict[str, Any]) -> nn.Module:
    kind = spec["kind"]
    children = [(name, _build(child)) for name, child in spec.get("children", [])]
    module: nn.Module
    if kind == "list":
        module = nn.ModuleList([c for _, c in children])
    elif kind == "seq":
        module = nn.Sequential(*[c for _, c in children])
    elif kind == "dict":
        module = nn.ModuleDict(OrderedDict(children))
    elif kind == "linear":
        module = nn.Linear(2, 3, bias=spec.get("bias", True))
    elif kind == "bn":
        module = nn.BatchNorm1d(3, track_running_stats=spec.get("track", True))
    elif kind == "ln":
        module = nn.LayerNorm(3)
    elif kind == "in":
        module = nn.InstanceNorm1d(3, affine=True)
    else:
        cls = {"node": Node, "renamer": Renamer, "extra": Extra}[kind]
        module = cls(spec)
        for name, child in children:
            module.add_module(name, child)
    if spec.get("none_child") and kind not in ("list", "seq"):
        module.add_module("gone", None)
    if spec.get("share") and children:
        # One module object at two paths.
        module.add_module("again", children[0][1])
    if spec.get("tie"):
        ws = [c for _, c in children if isinstance(getattr(c, "w", None), nn.Parameter)]
        same = [c for c in ws if c.w.shape == ws[0].w.shape] if ws else []
        if len(same) >= 2:
            same[1].w = same[0].w
    pre = spec.get("pre")
    if pre == "scale":
        module.register_load_state_dict_pre_hook(_scale_pre_hook)
    elif pre == "drop_first_child":
        module.register_load_state_dict_pre_hook(_drop_first_child_pre_hook)
    elif pre == "legacy":
        module._register_load_state_dict_pre_hook(_legacy_pre_hook)
    post = spec.get("post")
    if post is not None:
        module.seen = []
        module.register_load_state_dict_post_hook(
            _record_post_hook if post == "record" else _forgive_post_hook
        )
    return module


# --------------------------------------------------------------------------------------------
# Strategies

_shapes = st.sampled_from([(2,), (3,), (2, 2), (1, 3)])
_hooks = {
    "pre": st.sampled_from([None, None, None, "scale", "drop_first_child", "legacy"]),
    "post": st.sampled_from([None, None, None, "record", "forgive"]),
}
_leaves = st.one_of(
    st.fixed_dictionaries(
        {"kind": st.sampled_from(["node", "renamer", "extra"]), "w": st.none() | _shapes},
        optional={
            "none_param": st.booleans(),
            "scalar": st.booleans(),
            "buf": st.sampled_from(["persistent", "non_persistent"]),
            "none_buf": st.booleans(),
            "count": st.integers(0, 3),
            **_hooks,
        },
    ),
    st.fixed_dictionaries({"kind": st.just("linear")}, optional={"bias": st.booleans(), **_hooks}),
    st.fixed_dictionaries({"kind": st.just("bn")}, optional={"track": st.booleans(), **_hooks}),
    st.fixed_dictionaries({"kind": st.sampled_from(["ln", "in"])}, optional=_hooks),
)


def _with_children(children: st.SearchStrategy) -> st.SearchStrategy:
    named = st.lists(children, min_size=1, max_size=4).map(
        lambda cs: [(f"c{i}", c) for i, c in enumerate(cs)]
    )
    return st.one_of(
        st.fixed_dictionaries(
            {"kind": st.sampled_from(["list", "seq", "dict"]), "children": named},
            optional={"tie": st.booleans(), "share": st.booleans(), **_hooks},
        ),
        st.fixed_dictionaries(
            {
                "kind": st.sampled_from(["node", "renamer", "extra"]),
                "w": st.none() | _shapes,
                "children": named,
            },
            optional={
                "tie": st.booleans(),
                "share": st.booleans(),
                "none_child": st.booleans(),
                "scalar": st.booleans(),
                "buf": st.sampled_from(["persistent", "non_persistent"]),
                **_hooks,
            },
        ),
    )


_trees = st.recursive(_leaves, _with_children, max_leaves=12)


def _under_custom(tree: dict[str, Any]) -> dict[str, Any]:
    # Below a custom module, modules take their keys from the dict it leaves behind.
    return {"kind": "renamer", "w": (2,), "children": [("inner", tree), ("c1", {"kind": "linear"})]}


specs = st.one_of(_trees, _trees.map(_under_custom))


def _module_paths(model: nn.Module) -> list[str]:
    return [name for name, _ in model.named_modules(remove_duplicate=False)]


@st.composite
def perturbed_state_dicts(draw: st.DrawFn, spec: dict[str, Any]) -> OrderedDict[str, Any]:
    """A state dict for `spec`'s modules, from other weights, with every kind of damage."""
    source = build(spec, seed=1)
    for module in source.modules():
        if isinstance(module, Extra):
            module.count = 7
    sd = source.state_dict()
    metadata = sd._metadata
    keys = list(sd)
    out: OrderedDict[str, Any] = OrderedDict()
    for key in keys:
        value = sd[key]
        action = draw(
            st.sampled_from(
                ["keep"] * 6 + ["drop", "reshape", "float64", "old", "legacy", "int", "vector"]
            ),
            label=f"action {key}",
        )
        if action == "drop":
            continue
        if action == "reshape" and isinstance(value, torch.Tensor):
            value = torch.randn(value.numel() + 1)
        elif action == "float64" and isinstance(value, torch.Tensor):
            value = value.double()
        elif action == "int":
            value = 3
        elif action == "vector" and isinstance(value, torch.Tensor) and value.dim() == 0:
            value = value.reshape(1)  # torch loads a 1-element vector into a 0-dim tensor
        elif action == "old" and key.endswith(".w"):
            key = key[:-1] + "old_w"
        elif action == "legacy" and key.endswith(".w"):
            key = key[:-1] + "legacy_w"
        out[key] = value
    paths = _module_paths(source)
    extra_names = st.sampled_from(
        ["zzz", "w.deeper", "gone.x", "_extra_state", "c0.zzz", "c9.w", "running_mean", "", "b"]
    )
    for path, name in draw(st.lists(st.tuples(st.sampled_from(paths), extra_names), max_size=4)):
        key = f"{path}.{name}" if path else name
        out[key] = torch.randn(2)
    order = draw(st.permutations(list(out)), label="order") if draw(st.booleans()) else list(out)
    shuffled: OrderedDict[str, Any] = OrderedDict((k, out[k]) for k in order)
    meta_mode = draw(st.sampled_from(["keep", "keep", "none", "drop_some", "old_versions"]))
    if meta_mode != "none":
        meta = OrderedDict((k, dict(v)) for k, v in metadata.items())
        if meta_mode == "drop_some":
            for path in draw(st.lists(st.sampled_from(list(meta)), max_size=3)):
                meta.pop(path, None)
        elif meta_mode == "old_versions":
            for entry in meta.values():
                entry["version"] = 1
        shuffled._metadata = meta  # type: ignore[attr-defined]
    return shuffled


# --------------------------------------------------------------------------------------------
# Comparison helpers


def torch_load(model: nn.Module, sd: Any, assign: bool = False) -> tuple[list, list, list]:
    """torch's outcome: (missing, unexpected, error messages), captured even when it raises."""
    captured: dict[str, list[str]] = {}

    def capture(module: nn.Module, incompatible: Any) -> None:
        captured["missing"] = list(incompatible.missing_keys)
        captured["unexpected"] = list(incompatible.unexpected_keys)

    handle = model.register_load_state_dict_post_hook(capture)
    errors: list[str] = []
    try:
        model.load_state_dict(sd, strict=False, assign=assign)
    except RuntimeError as err:
        text = str(err)
        assert text.startswith("Error(s) in loading state_dict for"), text
        errors = text.split("\n\t")[1:]
    finally:
        handle.remove()
    return captured["missing"], captured["unexpected"], errors


def ours_load(model: nn.Module, sd: Any, **kwargs: Any) -> LoadResult:
    # The same capturing post-hook on the root as torch_load, so both trees carry the same hooks.
    handle = model.register_load_state_dict_post_hook(lambda m, ik: None)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NothingLoadedWarning)
            return load_state_dict(model, sd, logger="silent", **kwargs)
    finally:
        handle.remove()


def snapshot(model: nn.Module) -> dict[str, Any]:
    """Every tensor, extra state and hook observation, plus which names share a tensor."""
    out: dict[str, Any] = {}
    ids: dict[int, str] = {}
    for name, t in [
        *model.named_parameters(remove_duplicate=False),
        *model.named_buffers(remove_duplicate=False),
    ]:
        out[name] = (t.detach().clone(), t.dtype, t.device, t.requires_grad, type(t).__name__)
        out[f"{name}#alias"] = ids.setdefault(id(t), name)
    for name, module in model.named_modules(remove_duplicate=False):
        for attr in ("count", "seen"):
            if attr in module.__dict__:
                out[f"{name}#{attr}"] = copy.deepcopy(module.__dict__[attr])
        out[f"{name}#params"] = sorted(k for k, v in module._parameters.items() if v is None)
    return out


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = snapshot(a), snapshot(b)
    assert sa.keys() == sb.keys()
    for key, va in sa.items():
        vb = sb[key]
        if isinstance(va, tuple) and isinstance(va[0], torch.Tensor):
            assert va[1:] == vb[1:], key
            assert torch.equal(va[0], vb[0]), key
        elif key.endswith("#seen"):
            assert len(va) == len(vb), key
            for (ma, ua, wa), (mb, ub, wb) in zip(va, vb, strict=True):
                assert (ma, ua) == (mb, ub), key
                assert len(wa) == len(wb) and all(map(torch.equal, wa, wb)), key
        else:
            assert va == vb, key


def _tensors_of(model: nn.Module) -> list[torch.Tensor]:
    return [
        t
        for _, t in [
            *model.named_parameters(remove_duplicate=False),
            *model.named_buffers(remove_duplicate=False),
        ]
    ]


def _on_device(sd: Any, device: str, data: st.DataObject) -> Any:
    """`sd` with a drawn subset of its tensors moved to `device`, `_metadata` kept."""
    moved: OrderedDict[str, Any] = OrderedDict()
    for key, value in sd.items():
        if isinstance(value, torch.Tensor) and data.draw(st.booleans(), label=f"move {key}"):
            value = value.to(device)
        moved[key] = value
    if hasattr(sd, "_metadata"):
        moved._metadata = sd._metadata  # type: ignore[attr-defined]
    return moved


def check_against_torch(
    spec: dict[str, Any],
    sd: Any,
    *,
    fast: bool,
    assign: bool,
    device: str = "cpu",
    data: st.DataObject | None = None,
) -> None:
    """Loads `sd` with torch and with ckptmap into two models built from `spec`; requires the
    same outcome and state.

    With `data` (a hypothesis draw), the loads are placed as drawn: on ``"cuda"``, both models
    on the GPU and some of `sd`'s tensors too; on ``"fake"`` (and in half of the ``"cpu"``
    cases), ckptmap runs with a `DeferredDevice`, some model tensors and some sources standing
    in for a device's, through a ring of a few bytes to a few hundred: every branch of the
    batched copies, host-to-device, device-to-device and device-to-host, with casts, tied
    weights and hooks, on CPU.
    """
    theirs_model, ours_model = build(spec, seed=0), build(spec, seed=0)
    engine: DeferredDevice | None = None
    if device == "cuda":
        theirs_model.to(device)
        ours_model.to(device)
        if data is not None:
            sd = _on_device(sd, device, data)
    elif data is not None and (device == "fake" or data.draw(st.booleans(), label="fake")):
        engine = DeferredDevice(
            slot_bytes=data.draw(st.sampled_from([16, 64, 256, 1 << 20]), label="slot bytes"),
            slots=data.draw(st.integers(1, 3), label="slots"),
            threads=data.draw(st.integers(1, 2), label="threads"),
        )
        everywhere = data.draw(st.booleans(), label="all on the device")
        for t in _tensors_of(ours_model):
            if everywhere or data.draw(st.booleans(), label="param on the device"):
                engine.on_device(t)
        for key, value in sd.items():
            if isinstance(value, torch.Tensor) and data.draw(st.booleans(), label=f"src {key}"):
                engine.on_device(value)
    missing, unexpected, errors = torch_load(theirs_model, copy.copy(sd), assign=assign)
    with using_engine(engine) if engine is not None else contextlib.nullcontext():
        result = ours_load(ours_model, sd, fast=fast, assign=assign)
    if engine is not None:
        assert not engine.pending, "the load returned before its copies were done"
    assert list(result.missing_keys) == missing
    assert list(result.unexpected_keys) == unexpected
    assert list(result.error_msgs) == errors
    expected_mismatches = [m for m in map(report_module.parse_size_mismatch, errors) if m]
    assert list(result.mismatched) == expected_mismatches
    assert_same_state(ours_model, theirs_model)


# --------------------------------------------------------------------------------------------
# Differential tests


@pytest.mark.parametrize("device", DEVICES)
@given(spec=specs, data=st.data(), fast=st.booleans(), assign=st.booleans())
def test_matches_torch_on_generated_trees(device, spec, data, fast, assign):
    sd = data.draw(perturbed_state_dicts(spec))
    check_against_torch(spec, sd, fast=fast, assign=assign, device=device, data=data)


@given(spec=specs, data=st.data())
def test_batched_copies_to_a_device_match_torch(spec, data):
    """The fast path always, with tensors standing in for a device's (see check_against_torch)."""
    sd = data.draw(perturbed_state_dicts(spec))
    check_against_torch(spec, sd, fast=True, assign=False, device="fake", data=data)


@pytest.mark.parametrize("device", DEVICES)
@given(spec=specs, data=st.data())
def test_exact_state_dict_loads_cleanly(device, spec, data):
    source = build(spec, seed=1)
    sd = source.state_dict()
    check_against_torch(spec, sd, fast=True, assign=False, device=device, data=data)
    model = build(spec, seed=0)
    result = load_state_dict(model, sd, logger="silent")
    assert result.ok or any(
        isinstance(m, nn.Module) and m._load_state_dict_pre_hooks for m in model.modules()
    )


@pytest.mark.parametrize("fast", [True, False])
def test_renaming_parent_is_seen_by_children(fast):
    spec = {
        "kind": "renamer",
        "w": (2,),
        "children": [("c0", {"kind": "node", "w": (3,)}), ("c1", {"kind": "linear"})],
    }
    sd = build(spec, seed=1).state_dict()
    sd["old_w"] = sd.pop("w")
    sd["c0.old_w"] = sd.pop("c0.w")
    check_against_torch(spec, sd, fast=fast, assign=False)
    model = build(spec, seed=0)
    result = load_state_dict(model, sd, logger="silent", fast=fast)
    assert result.ok
    assert torch.equal(model.c0.w, sd["c0.old_w"])


@pytest.mark.parametrize("fast", [True, False])
def test_batchnorm_versions_and_num_batches_tracked(fast):
    spec = {"kind": "seq", "children": [("0", {"kind": "bn"}), ("1", {"kind": "bn"})]}
    sd = build(spec, seed=1).state_dict()
    del sd["0.num_batches_tracked"], sd["1.num_batches_tracked"]
    sd._metadata["0"]["version"] = 1  # old checkpoint: BatchNorm fills the counter in
    check_against_torch(spec, sd, fast=fast, assign=False)
    result = load_state_dict(build(spec, seed=0), sd, logger="silent", fast=fast)
    assert result.missing_keys == ("1.num_batches_tracked",)
    assert result.ok  # num_batches_tracked is not reported


def test_instance_norm_with_old_running_stats():
    spec = {"kind": "seq", "children": [("0", {"kind": "in"})]}
    sd = OrderedDict(build(spec, seed=1).state_dict())
    sd["0.running_mean"] = torch.zeros(3)
    check_against_torch(spec, sd, fast=True, assign=False)
    result = load_state_dict(build(spec, seed=0), sd, logger="silent")
    assert result.other_errors and "running stats" in result.other_errors[0]


def test_exception_in_custom_loader_keeps_earlier_copies():
    def make() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(2, 2), Raiser(), nn.Linear(2, 2))

    torch.manual_seed(1)
    sd = {k: torch.randn_like(v) for k, v in make().state_dict().items()}
    theirs, ours = make(), make()
    with pytest.raises(KeyError, match="boom"):
        theirs.load_state_dict(sd)
    with pytest.raises(KeyError, match="boom"):
        load_state_dict(ours, sd)
    assert torch.equal(ours[0].weight, sd["0.weight"])
    assert not torch.equal(ours[2].weight, sd["2.weight"])
    assert_same_state(ours, theirs)


@pytest.mark.parametrize("fast", [True, False])
def test_one_element_vector_loads_into_a_scalar(fast):
    spec = {"kind": "seq", "children": [("0", {"kind": "node", "scalar": True, "w": (2,)})]}
    sd = build(spec, seed=1).state_dict()
    sd["0.s"] = sd["0.s"].reshape(1)
    check_against_torch(spec, sd, fast=fast, assign=False)
    model = build(spec, seed=0)
    assert load_state_dict(model, sd, logger="silent", fast=fast).ok
    assert model[0].s.item() == sd["0.s"].item()


def test_tied_weight_takes_the_later_key():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    model[1].weight = model[0].weight
    sd = {
        "0.weight": torch.ones(2, 2),
        "0.bias": torch.zeros(2),
        "1.weight": torch.full((2, 2), 5.0),
        "1.bias": torch.zeros(2),
    }
    load_state_dict(model, sd, logger="silent")
    assert model[0].weight is model[1].weight
    assert torch.equal(model[0].weight, torch.full((2, 2), 5.0))


def test_unusual_tensors_take_torchs_path():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    sd = OrderedDict(
        [
            ("0.weight", torch.ones(2, 2, dtype=torch.complex64)),  # copy_ warns: torch's code
            ("0.bias", torch.zeros(2)),
            ("1.weight", torch.ones(2, 2).to_sparse()),
            ("1.bias", "not a tensor"),
        ]
    )
    theirs = copy.deepcopy(model)
    # torch warns about the complex value once per process: whichever loader runs first.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Casting complex values", UserWarning)
        missing, unexpected, errors = torch_load(theirs, sd)
        result = load_state_dict(model, sd, logger="silent")
    assert (list(result.missing_keys), list(result.unexpected_keys)) == (missing, unexpected)
    assert list(result.error_msgs) == errors
    assert any("expected torch.Tensor" in e for e in errors)
    assert_same_state(model, theirs)


@pytest.mark.parametrize("fast", [True, False])
def test_unusual_values_below_a_custom_module(fast):
    spec = {
        "kind": "renamer",
        "w": (2,),
        "children": [
            ("c0", {"kind": "linear"}),
            ("c1", {"kind": "seq", "children": [("0", {"kind": "linear"})]}),
            ("c2", {"kind": "node", "w": (3,), "scalar": True}),
        ],
    }
    sd = build(spec, seed=1).state_dict()
    sd["c0.weight"] = 3  # not a tensor: torch's message
    sd["c1.0.old_w"] = sd.pop("c1.0.weight")  # renamed by the root, not a parameter name
    sd["c2.s"] = sd["c2.s"].reshape(1)
    sd["c2.w"] = torch.zeros(4)
    sd["c2.stray"] = torch.zeros(1)
    check_against_torch(spec, sd, fast=fast, assign=False)


def test_meta_and_inference_parameters_take_torchs_path():
    with torch.device("meta"):
        meta_model = nn.Linear(2, 2)
    sd = {"weight": torch.ones(2, 2), "bias": torch.ones(2)}
    with pytest.warns(UserWarning, match="meta parameter"):
        load_state_dict(meta_model, sd, logger="silent")
    assert meta_model.weight.is_meta
    result = load_state_dict(meta_model, sd, logger="silent", assign=True)
    assert result.ok and not meta_model.weight.is_meta
    assert torch.equal(meta_model.weight, sd["weight"])

    with torch.inference_mode():
        frozen, theirs = nn.Linear(2, 2), nn.Linear(2, 2)
    _, _, errors = torch_load(theirs, sd)
    result = load_state_dict(frozen, sd, logger="silent")
    assert list(result.error_msgs) == errors and errors


def test_each_module_sees_only_its_keys(monkeypatch):
    """Plain modules get exactly the keys they own, grouped once for the whole tree."""
    calls: list[int] = []
    real = module_load._group_by_owner

    def counting(keys, paths):
        calls.append(len(keys))
        return real(keys, paths)

    monkeypatch.setattr(module_load, "_group_by_owner", counting)
    seen: dict[str, list[str]] = {}

    def spy(module, state_dict, prefix, *args):
        seen[prefix] = sorted(state_dict)

    model = nn.ModuleList([nn.ModuleList([nn.Linear(2, 2) for _ in range(50)]) for _ in range(3)])
    for name, module in model.named_modules():
        if name.count(".") == 1:
            module.register_load_state_dict_pre_hook(spy)
    sd = model.state_dict()
    sd["1.7.stray"] = torch.zeros(1)
    result = load_state_dict(model, sd, logger="silent")
    assert result.unexpected_keys == ("1.7.stray",)
    assert seen["1.7."] == ["1.7.bias", "1.7.stray", "1.7.weight"]
    assert all(len(keys) == 2 for prefix, keys in seen.items() if prefix != "1.7.")
    # The leaves carry pre-hooks, so none of their keys is matched on the fast path: one
    # grouping pass over all of them, none per module.
    assert calls == [len(sd)]


def group_by_owner_reference(keys: list[str], paths: list[str]) -> list[list[int]]:
    """What `ckptmap._core.group_by_owner` computes, written plainly: each key goes to the
    longest module path that is a dotted prefix of it (the first listing of a path wins), else
    to the root module "" when listed, else to the extra group at the end."""
    index: dict[str, int] = {}
    for i, path in enumerate(paths):
        index.setdefault(path, i)
    fallback = index.get("", len(paths))
    groups: list[list[int]] = [[] for _ in range(len(paths) + 1)]
    for j, key in enumerate(keys):
        owner = fallback
        parts = key.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            found = index.get(".".join(parts[:cut]))
            if found is not None:
                owner = found
                break
        groups[owner].append(j)
    return groups


def test_group_by_owner_reference_agrees_with_core():
    keys = ["a.b.c", "a.b", "a..x", "", ".", "b.c", "a.bc.d", "x.y.z", "a.b.c.d"]
    paths = ["", "a", "a.b", "a.b.c", "x.y"]
    assert group_by_owner_reference(keys, paths) == module_load._group_by_owner(keys, paths)
    no_root = ["a", "a.b"]
    assert group_by_owner_reference(keys, no_root) == module_load._group_by_owner(keys, no_root)


_SEGMENTS = st.sampled_from(["", "a", "b", "ab", "0", "1", "é"])
_DOTTED = st.lists(_SEGMENTS, min_size=1, max_size=4).map(".".join)


@given(keys=st.lists(_DOTTED, max_size=30), paths=st.lists(_DOTTED, max_size=8))
def test_group_by_owner_matches_the_reference(keys: list[str], paths: list[str]) -> None:
    assert module_load._group_by_owner(keys, paths) == group_by_owner_reference(keys, paths)


# --------------------------------------------------------------------------------------------
# The seeds' behaviours


def _mm_load_state_dict():
    checkpoint = pytest.importorskip("mmengine.runner.checkpoint")
    return checkpoint.load_state_dict


def _bad_state_dict(model: nn.Module) -> OrderedDict[str, Any]:
    sd = model.state_dict()  # with its `_metadata`: BatchNorm at version 2
    sd["fc.weight"] = torch.zeros(4, 7)
    del sd["bn.running_var"], sd["bn.num_batches_tracked"]
    sd["head.extra"] = torch.zeros(1)
    return sd


def _small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        OrderedDict(
            [("conv", nn.Conv2d(1, 2, 1)), ("bn", nn.BatchNorm2d(2)), ("fc", nn.Linear(3, 4))]
        )
    )


def test_flat_message_is_mmengines(capsys):
    mm_load_state_dict = _mm_load_state_dict()
    model = _small_model()
    sd = _bad_state_dict(model)
    mm_logger = logging.getLogger("test.mmengine")
    records: list[str] = []

    class Grab(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    handler = Grab()
    mm_logger.addHandler(handler)
    try:
        mm_load_state_dict(copy.deepcopy(model), sd, logger=mm_logger)
        result = load_state_dict(copy.deepcopy(model), sd, logger=mm_logger, report="flat")
    finally:
        mm_logger.removeHandler(handler)
    assert len(records) == 2 and records[0] == records[1]
    assert records[1].startswith("The model and loaded state dict do not match exactly\n")
    assert "unexpected key in source state_dict: head.extra\n" in records[1]
    assert "missing keys in source state_dict: bn.running_var\n" in records[1]
    assert "num_batches_tracked" not in records[1]
    assert result.mismatched == (Mismatch("fc.weight", (4, 7), (4, 3)),)
    assert result.report("flat") == records[1]


def test_mmengine_outcome_is_ours():
    mm_load_state_dict = _mm_load_state_dict()
    model = _small_model()
    sd = _bad_state_dict(model)
    theirs, ours = copy.deepcopy(model), copy.deepcopy(model)
    for param in theirs.parameters():
        param.data.zero_()
    for param in ours.parameters():
        param.data.zero_()
    mm_load_state_dict(theirs, sd, logger="silent")
    load_state_dict(ours, sd, logger="silent")
    assert_same_state(ours, theirs)


def test_folded_report_is_logged_on_rank_zero(caplog):
    model = _small_model()
    with caplog.at_level(logging.WARNING, logger="ckptmap"):
        result = load_state_dict(model, _bad_state_dict(model))
    assert [r.name for r in caplog.records] == ["ckptmap"]
    text = caplog.records[0].getMessage()
    assert text == result.report()
    assert text.startswith("The model and loaded state dict do not match exactly")
    assert "size mismatch" in text and "fc.weight: checkpoint (4, 7), model (4, 3)" in text


def test_clean_load_logs_nothing(caplog):
    model = _small_model()
    with caplog.at_level(logging.DEBUG, logger="ckptmap"):
        result = load_state_dict(model, model.state_dict())
    assert result.ok and not caplog.records
    assert str(result).startswith("<All keys matched successfully")


def test_other_ranks_log_nothing_but_raise(monkeypatch, caplog):
    monkeypatch.setattr(report_module, "get_dist_info", lambda: (1, 2))
    monkeypatch.setattr(module_load, "get_dist_info", lambda: (1, 2))
    model = _small_model()
    with caplog.at_level(logging.DEBUG):
        load_state_dict(model, _bad_state_dict(model))
        assert not caplog.records
        with pytest.raises(StateDictMismatchError):
            load_state_dict(model, _bad_state_dict(model), strict=True)


def test_strict_raises_with_the_keys():
    model = _small_model()
    with pytest.raises(StateDictMismatchError) as info:
        load_state_dict(model, _bad_state_dict(model), strict=True)
    err = info.value
    assert isinstance(err, RuntimeError) and isinstance(err, CkptmapError)
    assert err.missing == ["bn.running_var"]
    assert err.unexpected == ["head.extra"]
    assert err.mismatched == [Mismatch("fc.weight", (4, 7), (4, 3))]
    assert err.result.missing_keys == ("bn.running_var", "bn.num_batches_tracked")
    assert str(err).startswith("The model and loaded state dict do not match exactly")


def test_strict_ignores_num_batches_tracked_alone():
    model = _small_model()
    sd = model.state_dict()
    del sd["bn.num_batches_tracked"]
    result = load_state_dict(model, sd, strict=True)
    assert result.missing_keys == ("bn.num_batches_tracked",) and result.ok


def test_strict_flat_message_is_mmengines():
    mm_load_state_dict = _mm_load_state_dict()
    model = _small_model()
    with pytest.raises(RuntimeError) as theirs:
        mm_load_state_dict(copy.deepcopy(model), _bad_state_dict(model), strict=True)
    with pytest.raises(StateDictMismatchError) as ours:
        load_state_dict(model, _bad_state_dict(model), strict=True, report="flat")
    assert str(ours.value) == str(theirs.value)


def test_real_second_rank_is_silent_and_raises(tmp_path):
    """Two gloo processes: rank 1 logs nothing, both raise under strict."""
    script = tmp_path / "ranks.py"
    script.write_text(
        textwrap.dedent(
            """
            import json, logging, os, sys
            import torch, torch.distributed as dist
            from torch import nn
            from ckptmap.module_load import load_state_dict
            from ckptmap.errors import StateDictMismatchError

            def main(rank, out):
                dist.init_process_group("gloo", init_method=sys.argv[2], rank=rank, world_size=2)
                records = []
                class Grab(logging.Handler):
                    def emit(self, record):
                        records.append(record.getMessage())
                logging.getLogger("ckptmap").addHandler(Grab())
                model = nn.Linear(2, 2)
                load_state_dict(model, {"weight": torch.zeros(2, 2), "stray": torch.zeros(1)})
                try:
                    load_state_dict(model, {"weight": torch.zeros(2, 2)}, strict=True)
                    raised = False
                except StateDictMismatchError:
                    raised = True
                dist.barrier()
                dist.destroy_process_group()
                with open(f"{out}.{rank}", "w") as f:
                    json.dump({"records": records, "raised": raised}, f)

            if __name__ == "__main__":
                torch.multiprocessing.spawn(main, args=(sys.argv[1],), nprocs=2)
            """
        )
    )
    out = tmp_path / "rank"
    init = f"file://{tmp_path / 'rendezvous'}"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    subprocess.run([sys.executable, str(script), str(out), init], check=True, env=env, timeout=300)
    rank0 = json.loads((tmp_path / "rank.0").read_text())
    rank1 = json.loads((tmp_path / "rank.1").read_text())
    assert rank0["raised"] and rank1["raised"]
    assert len(rank0["records"]) == 1 and "stray" in rank0["records"][0]
    assert rank1["records"] == []


def test_logger_choices(caplog):
    model = nn.Linear(2, 2)
    sd = {"weight": torch.zeros(2, 2), "stray": torch.zeros(1)}
    with caplog.at_level(logging.WARNING):
        load_state_dict(model, sd, logger="silent")
        assert not caplog.records
        load_state_dict(model, sd, logger="my.app")
        load_state_dict(model, sd, logger=logging.getLogger("given"))
        load_state_dict(model, sd, logger="current")
    assert [r.name for r in caplog.records] == ["my.app", "given", "ckptmap"]


def test_nothing_loaded_warns():
    model = nn.Linear(2, 2)
    sd = {"module.weight": torch.zeros(2, 2), "module.bias": torch.zeros(2)}
    with pytest.warns(NothingLoadedWarning, match="loaded 0 of 2"):
        result = load_state_dict(model, sd, logger="silent")
    assert result.nothing_loaded
    assert result.report().startswith("loaded 0 of 2 keys")
    with pytest.raises(StateDictMismatchError, match="loaded 0 of 2"):
        load_state_dict(model, sd, strict=True)


# --------------------------------------------------------------------------------------------
# Wrappers


def test_data_parallel_is_unwrapped_at_every_level():
    inner = nn.Linear(2, 2)
    model = nn.Sequential(data_parallel(inner), nn.Linear(2, 2))
    sd = {
        "0.weight": torch.ones(2, 2),
        "0.bias": torch.ones(2),
        "1.weight": torch.ones(2, 2),
        "1.bias": torch.ones(2),
    }
    result = load_state_dict(data_parallel(model), sd, logger="silent")
    assert result.ok
    assert torch.equal(inner.weight, torch.ones(2, 2))


def test_data_parallel_of_the_tests_never_moves_its_module():
    """On a machine with a GPU, nn.DataParallel moves its module to cuda:0 (in place); the
    tests' `data_parallel` builds the same wrapper and leaves the module where it is."""
    inner = nn.Linear(2, 2)
    weight = inner.weight
    with mock.patch.object(torch.cuda, "is_available", return_value=True):
        wrapper = data_parallel(inner)
    assert isinstance(wrapper, nn.DataParallel) and is_model_wrapper(wrapper)
    assert unwrap_model(wrapper) is inner and inner.weight is weight and weight.is_cpu
    assert list(wrapper.state_dict()) == ["module.weight", "module.bias"]


def test_distributed_data_parallel_is_unwrapped(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rdv'}", rank=0, world_size=1)
    try:
        inner = nn.Linear(2, 2)
        ddp = nn.parallel.DistributedDataParallel(inner)
        assert is_model_wrapper(ddp) and unwrap_model(ddp) is inner
        result = load_state_dict(
            ddp, {"weight": torch.ones(2, 2), "bias": torch.ones(2)}, logger="silent"
        )
        assert result.ok and torch.equal(inner.bias, torch.ones(2))
    finally:
        dist.destroy_process_group()


# --------------------------------------------------------------------------------------------
# Bad input


def test_not_a_mapping():
    with pytest.raises(InvalidStateDictError, match="mapping") as info:
        load_state_dict(nn.Linear(2, 2), [("weight", torch.zeros(2, 2))])  # type: ignore[arg-type]
    assert isinstance(info.value, TypeError)


def test_non_str_key_is_named():
    with pytest.raises(InvalidStateDictError, match="key 3 is a int"):
        load_state_dict(nn.Linear(2, 2), {3: torch.zeros(2)})  # type: ignore[dict-item]


def test_module_without_init_is_named():
    class NoInit(nn.Module):
        def __init__(self) -> None:  # forgets super().__init__()
            pass

    model = nn.Sequential(nn.Linear(2, 2))
    sd = model.state_dict()
    model._modules["broken"] = NoInit()
    with pytest.raises(AttributeError):
        model.load_state_dict(sd)
    with pytest.raises(AttributeError, match=r"NoInit at 'broken' has no .*__init__ called"):
        load_state_dict(model, sd)


def test_post_hook_returning_a_value():
    model = nn.Sequential(nn.Linear(2, 2))
    model[0].register_load_state_dict_post_hook(lambda m, ik: "oops")
    with pytest.raises(LoadHookError, match="not expected to return new values") as info:
        load_state_dict(model, model.state_dict())
    assert isinstance(info.value, AssertionError)


def test_source_is_not_modified():
    spec = {"kind": "renamer", "w": (2,), "children": [("c0", {"kind": "bn"})]}
    sd = build(spec, seed=1).state_dict()
    sd["old_w"] = sd.pop("w")
    del sd["c0.num_batches_tracked"]
    before = list(sd.items())
    meta_before = copy.deepcopy(sd._metadata)
    load_state_dict(build(spec, seed=0), sd, logger="silent", assign=True)
    assert list(sd.items()) == before
    assert sd._metadata == meta_before
