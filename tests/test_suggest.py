"""Tests of `ckptmap.suggest_rules`: inferred ``revise_keys`` on renamings of real architectures
(torchvision ResNet-50, ViT-B/16, Swin-T), adversarial key sets, a hypothesis property, and an
end-to-end load of a `torch.save` file with the suggested rules.

The bar: at least 95% of the model's tensors mapped correctly and none mapped wrongly, checked
against the ground truth that each renaming (tests/renamings.py) defines.
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from probes import ran_meanwhile
from renamings import RESNET, SWIN, VIT
from torch import nn
from torchvision.models import resnet50, swin_t, vit_b_16

import ckptmap
from ckptmap import KeyRules, suggest_rules
from ckptmap.suggest import SuggestResult

ARCHS: dict[str, Callable[[], nn.Module]] = {
    "resnet": resnet50,
    "vit": vit_b_16,
    "swin": swin_t,
}
CASES = [
    *(("resnet", n) for n in RESNET),
    *(("vit", n) for n in VIT),
    *(("swin", n) for n in SWIN),
]
RENAMINGS = {**RESNET, **VIT, **SWIN}
_META: dict[str, nn.Module] = {}


def meta_model(arch: str) -> nn.Module:
    """The architecture on the meta device (shapes and dtypes, no memory), built once."""
    if arch not in _META:
        with torch.device("meta"):
            _META[arch] = ARCHS[arch]()
    return _META[arch]


def judge(
    result: SuggestResult, checkpoint: Mapping[str, Any], truth: Mapping[str, str], model: Any
) -> tuple[int, list[tuple[str, str, str | None]]]:
    """`(correct, wrong)`: model tensors the rules fill from their true checkpoint key, and every
    checkpoint key the rules send onto a model key that is not its own (`truth` maps checkpoint
    keys to model keys; keys absent from it have no counterpart)."""
    model_keys = set(model)
    names = list(checkpoint)
    revised = KeyRules(result.rules).apply(names) if result.rules else names
    wrong = [
        (name, new, truth.get(name))
        for name, new in zip(names, revised, strict=True)
        if new in model_keys and new != truth.get(name)
    ]
    correct = sum(
        1
        for name, new in zip(names, revised, strict=True)
        if new == truth.get(name) and tuple(checkpoint[name].shape) == tuple(model[new].shape)
    )
    # What the result claims agrees with what the rules do.
    for name, target in result.mapping.items():
        assert truth.get(name) == target, (name, target)
    return correct, wrong


@pytest.mark.parametrize(("arch", "renaming"), CASES)
def test_real_architectures(arch: str, renaming: str) -> None:
    model = meta_model(arch)
    state = model.state_dict()
    rename = RENAMINGS[renaming]
    checkpoint = OrderedDict((rename(k), v) for k, v in state.items())
    assert len(checkpoint) == len(state), "the renaming must be one-to-one"
    truth = {rename(k): k for k in state}
    result = suggest_rules(checkpoint, model)
    correct, wrong = judge(result, checkpoint, truth, state)
    assert wrong == []
    assert correct >= 0.95 * len(state), result.format()
    assert result.coverage == correct
    assert result.check is not None and result.check.matched == correct
    # Compact: a rule per structural change, not one per key.
    assert len(result.rules) <= 16, result.rules
    assert all(e.keys > 0 for e in result.evidence)


def test_identity_needs_no_rules() -> None:
    model = meta_model("resnet")
    result = suggest_rules(model.state_dict(), model)
    assert result.rules == []
    assert result.coverage == result.model_tensors == 320
    assert result.coverage_ratio == 1.0
    assert result.unmatched_checkpoint == result.unmatched_model == []
    assert "rules: none needed" in result.format()


def test_ddp_prefix_is_one_rule() -> None:
    model = meta_model("vit")
    checkpoint = OrderedDict(("module." + k, v) for k, v in model.state_dict().items())
    result = suggest_rules(checkpoint, model)
    assert result.rules == [(r"^module\.", "")]
    assert result.evidence[0].keys == len(checkpoint)
    assert result.evidence[0].examples[0] == ("module.class_token", "class_token")


class Twins(nn.Module):
    """Two layers of the same shape, and one of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.left = nn.Linear(8, 8)
        self.right = nn.Linear(8, 8)
        self.out = nn.Linear(8, 3)


def test_same_shaped_candidates_are_ambiguous_not_guessed() -> None:
    model = Twins()
    checkpoint = {
        "enc.a.weight": torch.zeros(8, 8),
        "enc.a.bias": torch.zeros(8),
        "enc.b.weight": torch.zeros(8, 8),
        "enc.b.bias": torch.zeros(8),
        "enc.out.weight": torch.zeros(3, 8),
        "enc.out.bias": torch.zeros(3),
    }
    result = suggest_rules(checkpoint, model)
    assert result.mapping == {"enc.out.weight": "out.weight", "enc.out.bias": "out.bias"}
    truth = {"enc.out.weight": "out.weight", "enc.out.bias": "out.bias"}
    _, wrong = judge(result, checkpoint, truth, model.state_dict())
    assert wrong == []
    ambiguous = {u.key: set(u.others) for u in result.unmatched_checkpoint}
    assert ambiguous["enc.a.weight"] == {"left.weight", "right.weight"}
    assert {u.reason for u in result.unmatched_checkpoint} == {"ambiguous"}
    assert {u.reason for u in result.unmatched_model} == {"ambiguous"}
    assert {a.key for a in result.ambiguities if a.side == "model"} == {
        "left.weight",
        "left.bias",
        "right.weight",
        "right.bias",
    }
    assert "ambiguous between" in result.format()


def test_shapes_that_disagree_are_reported_not_loaded() -> None:
    model = meta_model("resnet")
    state = model.state_dict()
    checkpoint = OrderedDict(("module." + k, v) for k, v in state.items())
    checkpoint["module.fc.weight"] = torch.zeros(10, 2048)
    checkpoint["module.fc.bias"] = torch.zeros(10)
    result = suggest_rules(checkpoint, model)
    truth = {"module." + k: k for k in state}
    correct, wrong = judge(result, checkpoint, truth, state)
    assert wrong == [] and correct == 318
    assert result.rules == [(r"^module\.", "")]
    reasons = {u.key: (u.reason, u.others) for u in result.unmatched_checkpoint}
    assert reasons["module.fc.weight"] == ("shape differs", ("fc.weight",))
    assert {u.key for u in result.unmatched_model} == {"fc.weight", "fc.bias"}
    assert result.check is not None
    assert {k for k, _, _ in result.check.mismatched} == {"fc.weight", "fc.bias"}


def test_extra_and_missing_tensors_on_both_sides() -> None:
    model = meta_model("resnet")
    state = model.state_dict()
    rename = RENAMINGS["resnet_timm_stages"]
    # The checkpoint lacks the last stage and has an auxiliary head and an EMA copy.
    checkpoint = OrderedDict((rename(k), v) for k, v in state.items() if not k.startswith("layer4"))
    checkpoint["backbone.aux_head.weight"] = torch.zeros(19, 1024, 1, 1)
    checkpoint["ema.step"] = torch.zeros((), dtype=torch.int64)
    truth = {rename(k): k for k in state}
    result = suggest_rules(checkpoint, model)
    correct, wrong = judge(result, checkpoint, truth, state)
    assert wrong == []
    present = sum(1 for k in state if not k.startswith("layer4"))
    assert correct == present
    unmatched = {u.key: u.reason for u in result.unmatched_checkpoint}
    assert unmatched["backbone.aux_head.weight"] == "no candidate"
    assert "ema.step" in unmatched
    assert {u.key for u in result.unmatched_model} == {k for k in state if k.startswith("layer4")}


def test_result_to_json_round_trips() -> None:
    model = meta_model("vit")
    rename = RENAMINGS["vit_timm"]
    checkpoint = OrderedDict((rename(k), v) for k, v in model.state_dict().items())
    doc = json.loads(json.dumps(suggest_rules(checkpoint, model).to_json()))
    assert doc["coverage"] == doc["model_tensors"] == 152
    assert [tuple(r) for r in doc["rules"]] == [
        (e["pattern"], e["replacement"]) for e in doc["evidence"]
    ]
    assert doc["check"]["matched"] == 152
    assert doc["mapping"]["cls_token"] == "class_token"


def test_inputs_of_every_kind(tmp_path: Any) -> None:
    from safetensors.torch import save_file

    model = Twins()
    state = {"module." + k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    path = tmp_path / "twins.safetensors"
    save_file(state, str(path))
    expected = [(r"^module\.", "")]
    assert suggest_rules(path, model).rules == expected
    assert suggest_rules(str(path), model).rules == expected
    shapes = {k: (tuple(v.shape), str(v.dtype)) for k, v in state.items()}
    assert suggest_rules(shapes, model).rules == expected
    from ckptmap.formats.safetensors import SafetensorsFile

    with SafetensorsFile(str(path)) as opened:
        assert suggest_rules(opened, model).rules == expected
    # The model side may be a checkpoint too.
    assert suggest_rules(state, model.state_dict()).rules == expected
    with pytest.raises(TypeError, match="checkpoint must be"):
        suggest_rules(42, model)


def test_prefix_restricts_the_checkpoint() -> None:
    model = Twins()
    checkpoint = {"teacher." + k: v for k, v in model.state_dict().items()}
    checkpoint |= {"student." + k: v for k, v in model.state_dict().items()}
    # Both copies fit: nothing is guessed.
    assert suggest_rules(checkpoint, model).mapping == {}
    result = suggest_rules(checkpoint, model, prefix="student")
    assert result.rules == [(r"^student\.", "")]
    assert result.checkpoint_keys == 6 and result.coverage == 6


def test_load_checkpoint_with_suggested_rules_end_to_end(tmp_path: Any) -> None:
    torch.manual_seed(0)
    source = resnet50()
    rename = RENAMINGS["resnet_timm_stages"]
    path = tmp_path / "timm_resnet50.pth"
    torch.save({"state_dict": {rename(k): v for k, v in source.state_dict().items()}}, path)
    target = resnet50()
    result = suggest_rules(path, target)
    assert result.coverage == 320
    ckptmap.load_checkpoint(target, str(path), strict=True, revise_keys=result.rules)
    for (name, a), (other, b) in zip(
        source.state_dict().items(), target.state_dict().items(), strict=True
    ):
        assert name == other
        assert torch.equal(a, b), name


def test_gil_is_released_on_large_inputs() -> None:
    source = [
        (f"module.layers.{i}.experts.{j}.w.weight", (4, 4), "float32")
        for i in range(40)
        for j in range(2000)
    ]
    target = [(k[len("module.") :], s, d) for k, s, d in source]
    assert ran_meanwhile(lambda: ckptmap._core.suggest_rules(source, target))


def test_bad_tables_are_type_errors() -> None:
    with pytest.raises(TypeError, match="source must be"):
        ckptmap._core.suggest_rules("abc", [])
    with pytest.raises(TypeError, match=r"target\[0\] must be"):
        ckptmap._core.suggest_rules([], [("a", (-1,), None)])
    with pytest.raises(TypeError, match="keys must be str"):
        suggest_rules({1: torch.zeros(1)}, Twins())


# --- the property -----------------------------------------------------------------------------

WORDS = ["layer", "block", "conv", "norm", "attn", "proj", "mlp", "fc", "head", "embed", "qkv"]
LEAVES = ["weight", "bias", "running_mean", "scale"]


@st.composite
def structured_keys(draw: st.DrawFn) -> dict[str, tuple[int, ...]]:
    """A module tree: a few top-level modules, some holding a list of identical blocks."""
    keys: dict[str, tuple[int, ...]] = {}
    dims = st.sampled_from([1, 2, 3, 4])
    for top in draw(st.lists(st.sampled_from(WORDS), min_size=1, max_size=4, unique=True)):
        inner = draw(st.lists(st.sampled_from(WORDS), min_size=1, max_size=3, unique=True))
        leaves = draw(st.lists(st.sampled_from(LEAVES), min_size=1, max_size=3, unique=True))
        shapes = {(w, leaf): (draw(dims), draw(dims)) for w in inner for leaf in leaves}
        blocks = draw(st.integers(0, 4))
        for b in range(blocks) if blocks else [None]:
            base = top if b is None else f"{top}.{b}"
            for w in inner:
                for leaf in leaves:
                    keys[f"{base}.{w}.{leaf}"] = shapes[(w, leaf)]
    return keys


@st.composite
def renamings(draw: st.DrawFn) -> tuple[Callable[[str], str], bool]:
    """A composition of structural renamings like the ones codebases differ by, and whether it
    shifts an index."""
    steps: list[Callable[[str], str]] = []
    kinds = draw(st.lists(st.integers(0, 5), min_size=1, max_size=3))
    for kind in kinds:
        word = draw(st.sampled_from(WORDS))
        other = draw(st.sampled_from(["x" + w for w in WORDS]))
        wrapper = draw(st.sampled_from(["module", "model", "backbone"]))
        if kind == 0:
            steps.append(lambda k, p=wrapper: f"{p}.{k}")
        elif kind == 1:  # rename a segment
            steps.append(lambda k, w=word, o=other: re.sub(rf"(^|\.){w}(\.|$)", rf"\g<1>{o}\2", k))
        elif kind == 2:  # nest an index: word.N -> word.stages.N
            steps.append(lambda k, w=word: re.sub(rf"(^|\.){w}\.(\d+)\.", rf"\1{w}.stages.\2.", k))
        elif kind == 3:  # flatten an index into the name: word.N -> word_N
            steps.append(lambda k, w=word: re.sub(rf"(^|\.){w}\.(\d+)\.", rf"\1{w}_\2.", k))
        elif kind == 4:  # shift an index: word.N -> word.N+1
            steps.append(
                lambda k, w=word: re.sub(
                    rf"(^|\.){w}\.(\d+)\.", lambda m: f"{m[1]}{w}.{int(m[2]) + 1}.", k
                )
            )
        else:  # merge two segments: a.b -> a_b
            steps.append(lambda k, w=word: re.sub(rf"(^|\.){w}\.([a-z]+)\.", rf"\1{w}_\2.", k))

    def rename(key: str) -> str:
        for step in steps:
            key = step(key)
        return key

    return rename, 4 in kinds


@given(structured_keys(), renamings(), st.booleans())
def test_property_every_mapping_made_is_correct(
    keys: dict[str, tuple[int, ...]],
    renaming: tuple[Callable[[str], str], bool],
    drop_some: bool,
) -> None:
    rename, shifts = renaming
    # With an index shifted and some blocks dropped, the truth is not in the data: checkpoint
    # `layer.1` (once `layer.0`) against model `layer.0` and `layer.1` reads as the identity.
    assume(not (shifts and drop_some))
    model = OrderedDict((k, (shape, "float32")) for k, shape in keys.items())
    renamed = [rename(k) for k in keys]
    assume(len(set(renamed)) == len(renamed))
    checkpoint = OrderedDict(
        (new, (shape, "float32"))
        for i, (new, shape) in enumerate(zip(renamed, keys.values(), strict=True))
        if not (drop_some and i % 3 == 1)
    )
    truth = {new: old for new, old in zip(renamed, keys, strict=True)}
    result = suggest_rules(checkpoint, model)
    names = list(checkpoint)
    revised = KeyRules(result.rules).apply(names) if result.rules else names
    for name, new in zip(names, revised, strict=True):
        if new in model:
            assert new == truth[name], (name, new, result.rules)
    for name, target in result.mapping.items():
        assert truth[name] == target
