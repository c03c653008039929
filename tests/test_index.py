"""The key index: prefix filter, grouping by owning module, diff and collisions.

Each function is checked against the plain Python it replaces, and module ownership against
real `torch.nn.Module` trees.
"""

from __future__ import annotations

import gc
from collections import OrderedDict
from collections.abc import Callable

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from probes import ran_meanwhile
from torch import nn

from ckptmap._core import diff_keys, filter_prefix_keys, find_collisions, group_by_owner
from ckptmap.prefix import filter_prefix

# Small alphabets make shared prefixes, near-miss prefixes ("a" vs "a1") and repeats common.
SEGMENTS = ["a", "a1", "ab", "layer", "layer1", "0", "1", "10", ""]
segment = st.sampled_from(SEGMENTS)
dotted = st.lists(segment, min_size=1, max_size=4).map(".".join)
keys_lists = st.lists(dotted, max_size=30)
# Module paths as named_modules() yields them: no empty segment, "" for the root.
module_paths = st.lists(st.sampled_from(SEGMENTS[:-1]), max_size=3).map(".".join)
unicode_keys = st.lists(st.text(alphabet=st.sampled_from("aé.ü1\n 😀"), max_size=8), max_size=20)


def normalized(prefix: str) -> str:
    """The prefix as mmengine's `_load_checkpoint_with_prefix` matches it."""
    return prefix if prefix == "" or prefix.endswith(".") else prefix + "."


def naive_owner(key: str, paths: list[str]) -> int | None:
    """The deepest module owning `key`, by scanning every path (quadratic overall)."""
    owners = [i for i, p in enumerate(paths) if p == "" or key.startswith(p + ".")]
    return max(owners, key=lambda i: (len(paths[i]), -i), default=None)


def naive_groups(keys: list[str], paths: list[str]) -> list[list[int]]:
    groups: list[list[int]] = [[] for _ in range(len(paths) + 1)]
    for i, key in enumerate(keys):
        owner = naive_owner(key, paths)
        groups[len(paths) if owner is None else owner].append(i)
    return groups


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
    tensors = [torch.zeros(1), torch.ones(2)]
    state_dict = {"backbone.a": tensors[0], "head.b": torch.zeros(3), "backbone.c": tensors[1]}
    got = filter_prefix(state_dict, "backbone")
    assert list(got) == ["a", "c"]
    assert got["a"] is tensors[0] and got["c"] is tensors[1]
    assert not hasattr(got, "_metadata"), "no metadata in, none out"


def test_unchanged_names_are_the_callers_strings() -> None:
    keys = ["".join(["backbone.", str(i)]) for i in range(3)]
    _, names = filter_prefix_keys(keys, "backbone", strip=False)
    assert all(a is b for a, b in zip(names, keys, strict=True))


# --- _metadata -------------------------------------------------------------------------------


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2))
        self.backbone2 = nn.BatchNorm1d(2)
        self.head = nn.Linear(2, 1)


def test_metadata_restricted_and_rekeyed_like_the_submodule() -> None:
    net = Net()
    got = filter_prefix(net.state_dict(), "backbone")
    own = net.backbone.state_dict()
    assert list(got) == list(own)
    assert got._metadata == own._metadata  # type: ignore[attr-defined]
    assert list(got._metadata) == ["", "0", "1"]  # type: ignore[attr-defined]
    assert got._metadata["1"]["version"] == 2  # type: ignore[attr-defined]
    # With its metadata, the slice loads into the submodule alone, strictly.
    fresh = Net()
    assert not fresh.backbone.load_state_dict(got, strict=True).missing_keys


def test_metadata_without_strip_keeps_full_paths() -> None:
    sd = Net().state_dict()
    got = filter_prefix(sd, "backbone.", strip=False)
    assert list(got._metadata) == ["backbone", "backbone.0", "backbone.1"]  # type: ignore[attr-defined]
    assert all(got._metadata[k] is sd._metadata[k] for k in got._metadata)  # type: ignore[attr-defined]
    everything = filter_prefix(sd, "")
    assert everything._metadata == sd._metadata  # type: ignore[attr-defined]


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

LEAVES: dict[str, Callable[[], nn.Module]] = {
    "linear": lambda: nn.Linear(1, 1),
    "no_bias": lambda: nn.Linear(1, 1, bias=False),
    "bn": lambda: nn.BatchNorm1d(1),
    "empty": nn.Identity,
}
NAMES = st.sampled_from(["a", "a1", "ab", "layer", "layer1", "0", "1", "10"])
trees = st.recursive(
    st.sampled_from(sorted(LEAVES)),
    lambda children: st.tuples(
        st.booleans(), st.dictionaries(NAMES, children, min_size=1, max_size=4)
    ),
    max_leaves=10,
)


def build(spec: str | tuple[bool, dict]) -> nn.Module:
    if isinstance(spec, str):
        return LEAVES[spec]()
    own_param, children = spec
    module = nn.Module()
    if own_param:
        module.w = nn.Parameter(torch.zeros(1))
    module.register_buffer("scratch", torch.zeros(1), persistent=False)
    for name, child in children.items():
        module.add_module(name, build(child))
    return module


def direct_keys(path: str, module: nn.Module) -> list[str]:
    """The state-dict keys that `module._load_from_state_dict` itself consumes."""
    names = [n for n, p in module._parameters.items() if p is not None]
    names += [
        n
        for n, b in module._buffers.items()
        if b is not None and n not in module._non_persistent_buffers_set
    ]
    return [f"{path}.{n}" if path else n for n in names]


@given(spec=trees, extra=keys_lists)
def test_owners_match_named_modules(spec: str | tuple[bool, dict], extra: list[str]) -> None:
    model = build(spec)
    named = list(model.named_modules())
    paths = [p for p, _ in named]
    keys = list(model.state_dict()) + extra
    groups = group_by_owner(keys, paths)
    assert groups == naive_groups(keys, paths)
    assert groups[-1] == [], "the root owns what no deeper module does"
    # Each module gets exactly the keys its own _load_from_state_dict reads.
    n_state = len(model.state_dict())
    for (path, module), group in zip(named, groups[:-1], strict=True):
        assert [keys[i] for i in group if i < n_state] == direct_keys(path, module)


@given(spec=trees, extra=keys_lists, data=st.data())
def test_owners_without_root(spec: str | tuple[bool, dict], extra: list[str], data) -> None:
    model = build(spec)
    paths = [p for p, _ in model.named_modules()][1:]
    paths = data.draw(st.permutations(paths))
    keys = list(model.state_dict()) + extra
    groups = group_by_owner(keys, paths)
    assert groups == naive_groups(keys, paths)
    assert len(groups) == len(paths) + 1


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
