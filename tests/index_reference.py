"""Plain-Python references for the key index (`ckptmap._core`'s prefix filter and grouping),
shared by tests/core/test_index.py and tests/test_index_modules.py. No torch here."""

from __future__ import annotations

from hypothesis import strategies as st

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
