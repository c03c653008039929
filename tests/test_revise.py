"""revise_keys: equal to the seeds' rule-by-rule loop, plus metadata and collision reports."""

from __future__ import annotations

import re
from collections import OrderedDict

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from probes import ran_meanwhile
from torch import nn
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

from ckptmap import Collision, KeyRules, revise_keys


def seeds_loop(state_dict, rules):
    """mmengine's `_load_checkpoint_to_model` revise loop, verbatim in behaviour."""
    for pattern, repl in rules:
        state_dict = OrderedDict({re.sub(pattern, repl, k): v for k, v in state_dict.items()})
    return state_dict


# Small alphabets and rules that merge keys often, so collisions are common.
KEYS = st.lists(st.text(alphabet="ab.1", max_size=6), max_size=30)
RULES = st.lists(
    st.sampled_from(
        [
            (r"^a", ""),
            (r"b$", "a"),
            (r"\.", ""),
            (r"1+", "1"),
            (r"^(a)(b)", r"\2\1"),
            (r"(?<=a)b", "a"),  # lookbehind: runs on Python's re
            (r"x*", ""),
        ]
    ),
    max_size=3,
)


@given(keys=KEYS, rules=RULES)
def test_equals_seeds_loop_including_collision_survivors(keys, rules):
    state_dict = OrderedDict((k, i) for i, k in enumerate(keys))
    revised = revise_keys(state_dict, rules)
    assert list(revised.state_dict.items()) == list(seeds_loop(state_dict, rules).items())


@given(keys=KEYS, rules=RULES)
def test_collisions_name_every_source(keys, rules):
    state_dict = OrderedDict((k, i) for i, k in enumerate(dict.fromkeys(keys)))
    revised = revise_keys(state_dict, rules)
    final = KeyRules(rules).apply(list(state_dict))
    groups: dict[str, list[str]] = {}
    for source, key in zip(state_dict, final, strict=True):
        groups.setdefault(key, []).append(source)
    expected = {key: tuple(srcs) for key, srcs in groups.items() if len(srcs) > 1}
    assert {c.key: c.sources for c in revised.collisions} == expected
    for collision in revised.collisions:
        assert revised.state_dict[collision.key] == state_dict[collision.kept]
        assert collision.kept in collision.sources


def test_multi_rule_collision_keeps_what_the_seeds_keep():
    # Rule 1 merges A and C (C wins); rule 2 merges that with B, which comes later in
    # the intermediate dict, so B's value survives - not C's, the last source.
    state_dict = OrderedDict([("xa", "A"), ("yb", "B"), ("xc", "C")])
    rules = [(r"^x.", "X"), (r"^(X|yb)$", "Z")]
    revised = revise_keys(state_dict, rules)
    assert revised.state_dict == seeds_loop(state_dict, rules) == {"Z": "B"}
    assert revised.collisions == [Collision("Z", ("xa", "yb", "xc"), "yb")]


def test_values_are_the_same_objects_and_input_is_untouched():
    tensor = torch.zeros(2)
    state_dict = OrderedDict([("module.w", tensor), ("module.b", 3)])
    before = list(state_dict.items())
    revised = revise_keys(state_dict, [(r"^module\.", "")])
    assert revised.state_dict["w"] is tensor
    assert list(state_dict.items()) == before
    assert isinstance(revised.state_dict, OrderedDict)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 1)
        self.bn = nn.BatchNorm2d(2)
        self.blocks = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))


def test_metadata_prefixes_are_revised_like_torch():
    wrapped = nn.DataParallel(Net())  # keys and metadata under "module."
    state_dict = wrapped.state_dict()
    revised = revise_keys(state_dict, [(r"^module\.", "")])
    expected = OrderedDict(state_dict)
    expected._metadata = OrderedDict(state_dict._metadata)  # type: ignore[attr-defined]
    consume_prefix_in_state_dict_if_present(expected, "module.")
    assert list(revised.state_dict) == list(expected)
    assert revised.state_dict._metadata == expected._metadata  # type: ignore[attr-defined]
    # and it matches the unwrapped model's own metadata
    assert revised.state_dict._metadata == Net().state_dict()._metadata  # type: ignore[attr-defined]


def test_metadata_gets_a_prefix_when_a_rule_adds_one():
    state_dict = Net().state_dict()
    revised = revise_keys(state_dict, [(r"^", "backbone.")])
    assert set(revised.state_dict._metadata) == {  # type: ignore[attr-defined]
        "backbone" + (f".{p}" if p else "") for p in state_dict._metadata
    }


def test_invalid_rule_raises_re_error_before_any_work():
    with pytest.raises(re.error):
        revise_keys({"a": 1}, [(r"^ok$", ""), (r"(unclosed", "")])
    with pytest.raises(re.error, match="invalid group reference"):
        revise_keys({"a": 1}, [(r"a", r"\3")])


def test_non_str_key_is_a_type_error_naming_it():
    with pytest.raises(TypeError, match="key 1 is a int"):
        revise_keys({"a": 1, 2: 2}, [("a", "b")])


def test_apply_releases_the_gil():
    keys = [f"module.layers.{i}.experts.{i % 64}.weight" for i in range(400_000)]
    rules = KeyRules([(r"^module\.", ""), (r"experts\.(\d+)", r"e\1")])
    assert not ran_meanwhile(lambda: sorted(keys, reverse=True))  # a call holding the GIL
    assert ran_meanwhile(lambda: rules.apply(keys))


def test_apply_rejects_a_bare_string():
    with pytest.raises(TypeError, match="not one str"):
        KeyRules([("a", "b")]).apply("abc")
    assert KeyRules([("a", "b")]).sub("abc") == "bbc"
