"""The key index: prefix filter, grouping by owning module, diff and collisions, each checked
against the plain Python it replaces. Module ownership against real `torch.nn.Module` trees is
in tests/test_index_modules.py; this file needs no torch.
"""

from __future__ import annotations

import gc
from collections import OrderedDict
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st
from index_reference import (
    dotted,
    keys_lists,
    module_paths,
    naive_groups,
    normalized,
    segment,
    unicode_keys,
)
from probes import ran_meanwhile

from ckptmap._core import diff_keys, filter_prefix_keys, find_collisions, group_by_owner
from ckptmap.prefix import filter_prefix

# --- prefix filter ---------------------------------------------------------------------------


@given(
    keys=st.one_of(keys_lists, unicode_keys), prefix=st.one_of(dotted, segment), strip=st.booleans()
)
def test_filter_prefix_keys_equals_comprehension(keys: list[str], prefix: str, strip: bool) -> None:
    p = normalized(prefix)
    positions, names = filter_prefix_keys(keys, prefix, strip)
    assert positions == [i for i, k in enumerate(keys) if k.startswith(p)]
    assert names == [k[len(p) :] if strip else k for k in keys if k.startswith(p)]


@given(
    items=st.dictionaries(st.one_of(dotted, st.text(max_size=6)), st.integers(), max_size=30),
    prefix=st.one_of(dotted, st.text(max_size=3)),
    strip=st.booleans(),
)
def test_filter_prefix_equals_dict_comprehension(
    items: dict[str, int], prefix: str, strip: bool
) -> None:
    state_dict = OrderedDict(items)
    p = normalized(prefix)
    cut = len(p) if strip else 0
    expected = {k[cut:]: v for k, v in state_dict.items() if k.startswith(p)}
    got = filter_prefix(state_dict, prefix, strip)
    assert type(got) is OrderedDict
    assert list(got.items()) == list(expected.items())
    assert list(state_dict.items()) == list(items.items()), "the input must not change"


def test_prefix_follows_mmengine() -> None:
    keys = ["backbone.x", "backbone2.x", "backbone", "backbone.y.z", "neck.backbone.w"]
    assert filter_prefix_keys(keys, "backbone") == ([0, 3], ["x", "y.z"])
    assert filter_prefix_keys(keys, "backbone.") == ([0, 3], ["x", "y.z"])
    assert filter_prefix_keys(keys, "backbone", strip=False) == ([0, 3], [keys[0], keys[3]])
    assert filter_prefix_keys(keys, "") == (list(range(5)), keys)
    assert filter_prefix_keys(keys, "head") == ([], [])


def test_filter_prefix_keeps_value_objects() -> None:
    values = [object(), object()]
    state_dict = {"backbone.a": values[0], "head.b": object(), "backbone.c": values[1]}
    got = filter_prefix(state_dict, "backbone")
    assert list(got) == ["a", "c"]
    assert got["a"] is values[0] and got["c"] is values[1]
    assert not hasattr(got, "_metadata"), "no metadata in, none out"


def test_unchanged_names_are_the_callers_strings() -> None:
    keys = ["".join(["backbone.", str(i)]) for i in range(3)]
    _, names = filter_prefix_keys(keys, "backbone", strip=False)
    assert all(a is b for a, b in zip(names, keys, strict=True))


# --- _metadata -------------------------------------------------------------------------------


@given(paths=st.lists(module_paths, unique=True, max_size=12), prefix=dotted, strip=st.booleans())
def test_metadata_follows_the_key_rule(paths: list[str], prefix: str, strip: bool) -> None:
    state_dict: OrderedDict[str, int] = OrderedDict()
    state_dict._metadata = OrderedDict((p, {"path": p}) for p in paths)  # type: ignore[attr-defined]
    p = normalized(prefix)
    cut = len(p) if strip else 0
    expected = OrderedDict()
    for path in paths:
        as_key = path + "." if path else ""
        if as_key.startswith(p):
            expected[as_key[cut:-1] if as_key[cut:] else ""] = {"path": path}
    assert filter_prefix(state_dict, prefix, strip)._metadata == expected  # type: ignore[attr-defined]


# --- ownership -------------------------------------------------------------------------------


@given(
    keys=st.one_of(keys_lists, unicode_keys),
    paths=st.lists(st.one_of(dotted, segment), max_size=10),
)
def test_owners_equal_quadratic_reference(keys: list[str], paths: list[str]) -> None:
    assert group_by_owner(keys, paths) == naive_groups(keys, paths)


def test_owner_is_the_deepest_dotted_prefix() -> None:
    paths = ["", "layer", "layer1", "layer1.0"]
    keys = ["layer1.0.w", "layer1.1.w", "layer.w", "layer10.w", "layer1", "w"]
    assert group_by_owner(keys, paths) == [[3, 4, 5], [2], [1], [0], []]
    assert group_by_owner(keys, ["layer1"]) == [[0, 1], [2, 3, 4, 5]]


def test_hostile_long_key_is_searched_only_as_deep_as_the_modules() -> None:
    # A million dots would cost a million lookups of up to a megabyte each without the bound.
    hostile = "a.b." + "." * 1_000_000
    assert group_by_owner([hostile, "a.bc"], ["", "a", "a.b"]) == [[], [1], [0], []]


# --- diff and collisions ---------------------------------------------------------------------


def first_occurrences(keys: list[str], exclude: set[str]) -> list[str]:
    return [k for k in dict.fromkeys(keys) if k not in exclude]


@given(source=st.one_of(keys_lists, unicode_keys), expected=st.one_of(keys_lists, unicode_keys))
def test_diff_equals_set_operations(source: list[str], expected: list[str]) -> None:
    missing, unexpected = diff_keys(source, expected)
    assert set(missing) == set(expected) - set(source)
    assert set(unexpected) == set(source) - set(expected)
    # The documented order: each key once, at its first position.
    assert missing == first_occurrences(expected, set(source))
    assert unexpected == first_occurrences(source, set(expected))


def test_diff_order_example() -> None:
    source = ["u2", "a", "u1", "u2", "b"]
    expected = ["m1", "b", "m2", "m1", "a"]
    assert diff_keys(source, expected) == (["m1", "m2"], ["u2", "u1"])
    assert diff_keys([], []) == ([], [])


@given(keys=st.lists(st.sampled_from(["a", "b", "c", "a.b", "é"]), max_size=25))
def test_collisions_found_exactly(keys: list[str]) -> None:
    by_key: dict[str, list[int]] = {}
    for i, key in enumerate(keys):
        by_key.setdefault(key, []).append(i)
    assert find_collisions(keys) == [g for g in by_key.values() if len(g) > 1]


def test_collisions_after_renaming() -> None:
    revised = ["x.w", "y.w", "x.w", "z.w", "y.w", "x.w"]
    assert find_collisions(revised) == [[0, 2, 5], [1, 4]]
    assert find_collisions(["a", "b"]) == []


# --- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: filter_prefix_keys(["a", 1], "a"), r"keys\[1\] must be str, not int"),
        (lambda: group_by_owner(["a"], ["", None]), r"module_paths\[1\] must be str, not NoneType"),
        (lambda: group_by_owner([b"a"], [""]), r"keys\[0\] must be str, not bytes"),
        (lambda: diff_keys(["a"], ("b", "c", 2.0)), r"expected\[2\] must be str, not float"),
        (lambda: diff_keys([("a",)], []), r"source\[0\] must be str, not tuple"),
        (lambda: find_collisions(iter(["a", 3])), r"keys\[1\] must be str, not int"),
        (lambda: filter_prefix({"a.b": 1, 2: 2}, "a"), r"keys\[1\] must be str, not int"),
        (lambda: find_collisions("abc"), r"keys must be a sequence of str, not str"),
        (lambda: find_collisions(3), r"not iterable"),
    ],
)
def test_non_str_keys_raise_type_error(call: Callable[[], object], message: str) -> None:
    with pytest.raises(TypeError, match=message):
        call()


def test_lone_surrogate_is_a_clear_value_error() -> None:
    with pytest.raises(ValueError, match=r"keys\[1\] is not valid UTF-8") as info:
        find_collisions(["a", "\ud800"])
    assert isinstance(info.value.__cause__, UnicodeEncodeError)


def test_any_iterable_of_str_is_accepted() -> None:
    assert find_collisions(("a", "b", "a")) == [[0, 2]]
    assert find_collisions(k for k in ["a", "a"]) == [[0, 1]]
    assert diff_keys({"a": 1, "b": 2}.keys(), ["b"]) == ([], ["a"])


# --- the GIL ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def million_keys() -> tuple[list[str], list[str]]:
    keys = [f"module.layers.{i // 1000}.experts.{i % 1000}.weight" for i in range(1_000_000)]
    paths = ["", "module", "module.layers"]
    for n in range(1000):
        paths += [f"module.layers.{n}", f"module.layers.{n}.experts"]
    return keys, paths


def test_gil_is_released_on_large_inputs(million_keys: tuple[list[str], list[str]]) -> None:
    keys, paths = million_keys
    # The probe is sound: a call that keeps the GIL leaves it no chance.
    assert not ran_meanwhile(lambda: sorted(keys, reverse=True))
    assert ran_meanwhile(lambda: group_by_owner(keys, paths))
    assert ran_meanwhile(lambda: diff_keys(keys, keys[::-1]))


def test_large_grouping_is_right(million_keys: tuple[list[str], list[str]]) -> None:
    keys, paths = million_keys
    groups = group_by_owner(keys, paths)
    experts = paths.index("module.layers.7.experts")
    assert groups[experts] == list(range(7000, 8000))
    assert sum(map(len, groups)) == len(keys)


@pytest.mark.parametrize("enabled", [True, False])
def test_collector_state_is_restored(enabled: bool) -> None:
    was = gc.isenabled()
    (gc.enable if enabled else gc.disable)()
    try:
        assert group_by_owner(["a.b", "c"], ["", "a"]) == [[1], [0], []]
        assert find_collisions(["a", "a"]) == [[0, 1]]
        assert gc.isenabled() is enabled
    finally:
        (gc.enable if was else gc.disable)()
