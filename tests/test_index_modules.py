"""Module ownership and `_metadata` against real `torch.nn.Module` trees: `group_by_owner`
gives each module exactly the keys its own `_load_from_state_dict` reads, and `filter_prefix`
slices `_metadata` like the submodule's own state dict. The torch-free index tests are in
tests/core/test_index.py.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from hypothesis import given
from hypothesis import strategies as st
from index_reference import keys_lists, naive_groups
from torch import nn

from ckptmap._core import group_by_owner
from ckptmap.prefix import filter_prefix

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
