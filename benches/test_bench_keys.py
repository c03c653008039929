"""Key engine side by side with the Python it replaces, at 1M keys.

Run with `make bench` or `pytest benches/test_bench_keys.py --benchmark-enable`. Each group
compares ckptmap with the Python reference in the same run; pytest-benchmark prints the
ratio in parentheses. Every benchmark also checks that the outcomes are identical.
"""

from __future__ import annotations

import re
from collections import OrderedDict

import pytest

from ckptmap import KeyRules, revise_keys
from ckptmap.cli import DEMO_RULES, synthetic_keys

N_KEYS = 1_000_000


@pytest.fixture(scope="module")
def keys() -> list[str]:
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
    for pattern, repl in DEMO_RULES:
        state_dict = OrderedDict({re.sub(pattern, repl, k): v for k, v in state_dict.items()})
    return state_dict


@pytest.mark.benchmark(group="rules: apply 3 rules to 1M keys")
def test_keyrules_apply(benchmark, keys):
    rules = KeyRules(DEMO_RULES)
    assert all(rules.native)
    out = benchmark.pedantic(rules.apply, args=(keys,), rounds=5, iterations=1)
    assert out[:1000] == re_sub_loop(keys[:1000])


@pytest.mark.benchmark(group="rules: apply 3 rules to 1M keys")
def test_re_sub_loop(benchmark, keys):
    out = benchmark.pedantic(re_sub_loop, args=(keys,), rounds=2, iterations=1)
    assert out == KeyRules(DEMO_RULES).apply(keys)


@pytest.mark.benchmark(group="revise_keys: 1M-entry state dict")
def test_revise_keys(benchmark, state_dict):
    rules = KeyRules(DEMO_RULES)
    revised = benchmark.pedantic(revise_keys, args=(state_dict, rules), rounds=5, iterations=1)
    assert revised.collisions == []
    assert len(revised.state_dict) == len(state_dict)


@pytest.mark.benchmark(group="revise_keys: 1M-entry state dict")
def test_seeds_dict_comprehension(benchmark, state_dict):
    out = benchmark.pedantic(seeds_revise, args=(state_dict,), rounds=2, iterations=1)
    assert list(out.items()) == list(revise_keys(state_dict, DEMO_RULES).state_dict.items())
