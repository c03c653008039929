"""Key work: the rule engine and `revise_keys` beside the Python they replace, at 1M keys.

Run with ``python benches/report.py`` (or ``pytest benches/test_bench_keys.py
--benchmark-enable``; skipped otherwise). The keys are a DDP-wrapped mixture-of-experts
model's (``module.backbone.layers.{i}.experts.{j}.w{k}.weight``) and the rules the demo's:
strip ``module.``, rename ``backbone`` to ``encoder``, ``w1..w3`` to ``proj1..proj3``. Every
row also checks that its outcome is the reference's, key for key.
"""

from __future__ import annotations

import re
from collections import OrderedDict

import pytest
from harness import Rounds, Side, require_enabled, sized, timed

from ckptmap import KeyRules, revise_keys
from ckptmap.cli import DEMO_RULES, synthetic_keys

N_KEYS = sized(1_000_000, 50_000)
ROUNDS = Rounds(3, 1)
RULES_GROUP = f"apply the demo's 3 rules to {N_KEYS:,} keys"
REVISE_GROUP = f"revise_keys: a {N_KEYS:,}-entry state dict, 3 rules"


@pytest.fixture(scope="module")
def keys(request: pytest.FixtureRequest) -> list[str]:
    require_enabled(request)
    return synthetic_keys(N_KEYS)


@pytest.fixture(scope="module")
def state_dict(keys: list[str]) -> OrderedDict[str, int]:
    return OrderedDict((k, i) for i, k in enumerate(keys))


def re_sub_loop(keys: list[str]) -> list[str]:
    out = []
    for key in keys:
        for pattern, repl in DEMO_RULES:
            key = re.sub(pattern, repl, key)
        out.append(key)
    return out


def seeds_revise(state_dict: OrderedDict[str, int]) -> OrderedDict[str, int]:
    """What mmengine's `_load_checkpoint_to_model` does with `revise_keys`."""
    for pattern, repl in DEMO_RULES:
        state_dict = OrderedDict({re.sub(pattern, repl, k): v for k, v in state_dict.items()})
    return state_dict


@pytest.mark.benchmark(group=RULES_GROUP)
def test_rules_ckptmap(benchmark, keys):
    rules = KeyRules(DEMO_RULES)
    assert all(rules.native)
    side = Side("ckptmap", "`KeyRules(rules).apply(keys)`", "rename")
    out = timed(benchmark, side, lambda: rules.apply(keys), ROUNDS, kind="key work")
    assert out[:1000] == re_sub_loop(keys[:1000])


@pytest.mark.benchmark(group=RULES_GROUP)
def test_rules_re_sub(benchmark, keys):
    side = Side("python", "`re.sub` of each rule on each key", "rename")
    out = timed(benchmark, side, lambda: re_sub_loop(keys), ROUNDS, kind="key work")
    assert out == KeyRules(DEMO_RULES).apply(keys)


@pytest.mark.benchmark(group=REVISE_GROUP)
def test_revise_ckptmap(benchmark, state_dict):
    side = Side("ckptmap", "`revise_keys(state_dict, rules)`", "rename")
    revised = timed(
        benchmark, side, lambda: revise_keys(state_dict, DEMO_RULES), ROUNDS, kind="key work"
    )
    assert revised.collisions == []
    assert len(revised.state_dict) == len(state_dict)


@pytest.mark.benchmark(group=REVISE_GROUP)
def test_revise_mmengine(benchmark, state_dict):
    side = Side(
        "mmengine",
        "`revise_keys` loop: one dict comprehension of `re.sub` per rule",
        "rename",
        "mmengine's `revise_keys`: the loop of `_load_checkpoint_to_model`, written out (it "
        "has no public function of its own)",
    )
    out = timed(benchmark, side, lambda: seeds_revise(state_dict), ROUNDS, kind="key work")
    assert list(out.items()) == list(revise_keys(state_dict, DEMO_RULES).state_dict.items())


# What a rule on Python's `re` costs next to a native one (README, "what a fallback costs"):
# the same three renames, native, with callable replacements, and with lookarounds; the native
# rules also over keys that need their exact form. The ASCII row pairs with a `re.sub` loop.
N_FALLBACK = sized(100_000, 10_000)
FALLBACK_GROUP = f"rules: native vs fallback, {N_FALLBACK:,} keys"
_NATIVE = [(r"^module\.", ""), (r"layers\.(\d+)", r"blocks.\1"), (r"\.weight$", ".w")]
_CALLABLE = [
    (r"^module\.", lambda m: ""),
    (r"layers\.(\d+)", lambda m: "blocks." + m.group(1)),
    (r"\.weight$", lambda m: ".w"),
]
_LOOKAROUND = [
    (r"^(m)odule\.(?!\1)", ""),
    (r"layers\.(\d+)(?=\.)", r"blocks.\1"),
    (r"\.weight$(?<=t)", ".w"),
]
# kind -> (rules, key maker, semantics)
_KINDS = {
    "native": (_NATIVE, lambda k: k, "rename"),
    "native, non-ASCII keys": (
        _NATIVE,
        lambda k: k.replace("weight", "wéight"),
        "rename non-ASCII keys (exact form)",
    ),
    "native, keys ending in newline": (
        _NATIVE,
        lambda k: k + "\n",
        "rename keys ending in a newline (exact form)",
    ),
    "callable replacements": (_CALLABLE, lambda k: k, "rename on re: callable replacements"),
    "lookarounds": (_LOOKAROUND, lambda k: k, "rename on re: lookarounds"),
}


def _native_loop(keys: list[str]) -> list[str]:
    out = []
    for key in keys:
        for pattern, repl in _NATIVE:
            key = re.sub(pattern, repl, key)
        out.append(key)
    return out


@pytest.mark.benchmark(group=FALLBACK_GROUP)
@pytest.mark.parametrize("kind", list(_KINDS))
def test_native_vs_fallback(benchmark, keys, kind):
    rules, make, semantics = _KINDS[kind]
    some = [make(k) for k in keys[:N_FALLBACK]]
    kr = KeyRules(rules)
    assert all(kr.native) == kind.startswith("native")
    side = Side("ckptmap", f"`KeyRules(rules).apply(keys)`, {kind}", semantics)
    out = timed(benchmark, side, lambda: kr.apply(some), ROUNDS, kind="key work")
    assert out[:500] == _native_loop(some[:500])


@pytest.mark.benchmark(group=FALLBACK_GROUP)
def test_native_vs_fallback_re_sub_loop(benchmark, keys):
    some = keys[:N_FALLBACK]
    side = Side("python", "`re.sub` of each rule on each key", "rename")
    out = timed(benchmark, side, lambda: _native_loop(some), ROUNDS, kind="key work")
    assert out == KeyRules(_NATIVE).apply(some)
