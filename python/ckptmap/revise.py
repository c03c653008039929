"""Renaming state-dict keys with regex rules, as the seeds' `revise_keys` loop does, in one pass."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

from ckptmap._core import KeyRules, find_collisions
from ckptmap.state_metadata import check_state_metadata

RuleSpec = KeyRules | Iterable[tuple[Any, Any]]


class Collision(NamedTuple):
    """Several source keys revised to one key.

    Attributes:
        key: the revised key they share.
        sources: every source key that revised to it, in state-dict order.
        kept: the source key whose value the result holds.
    """

    key: str
    sources: tuple[str, ...]
    kept: str


class Revised(NamedTuple):
    """What `revise_keys` returns: the new state dict and every key collision."""

    state_dict: OrderedDict[str, Any]
    collisions: list[Collision]


def as_key_rules(rules: RuleSpec) -> KeyRules:
    """Returns `rules` compiled once (a `KeyRules` is returned as is)."""
    return rules if isinstance(rules, KeyRules) else KeyRules(rules)


def revise_keys(state_dict: Mapping[str, Any], rules: RuleSpec) -> Revised:
    """Renames the keys of `state_dict` by regex rules.

    The result equals the seeds' loop ``for p, r in rules: sd = OrderedDict({re.sub(p, r, k):
    v for k, v in sd.items()})``, including which value survives when keys collide, but runs
    the rules over all keys at once in the Rust engine. Unlike the seeds it keeps the
    `_metadata` attribute (torch's per-module version records), with its module paths revised
    by the same rules, and it reports every collision instead of dropping values silently.

    Args:
        state_dict: the mapping to revise; it is not modified.
        rules: `(pattern, replacement)` pairs applied in order as `re.sub`, or a `KeyRules`.

    Returns:
        `Revised(state_dict, collisions)`.

    Raises:
        re.error: a pattern or replacement template is invalid (before any key is touched).
        TypeError: a key is not a str.
    """
    key_rules = as_key_rules(rules)
    keys = list(state_dict.keys())
    values = list(state_dict.values())
    new_keys = key_rules.apply(keys)
    revised: OrderedDict[str, Any] = OrderedDict(zip(new_keys, values, strict=True))
    collisions: list[Collision] = []
    if len(revised) != len(keys):
        for members in find_collisions(new_keys):
            winner = _sequential_winner(key_rules, [keys[i] for i in members])
            kept = members[winner]
            revised[new_keys[kept]] = values[kept]
            collisions.append(
                Collision(new_keys[kept], tuple(keys[i] for i in members), keys[kept])
            )
    metadata = check_state_metadata(getattr(state_dict, "_metadata", None))
    if metadata is not None:
        revised._metadata = revise_metadata(metadata, key_rules)  # type: ignore[attr-defined]
    return Revised(revised, collisions)


def revise_metadata(metadata: Mapping[str, Any], rules: KeyRules) -> OrderedDict[str, Any]:
    """Revises the module paths that key torch's `_metadata` by the same rules as the keys.

    A module path is revised in its key-prefix form (`"backbone.bn1."`, `""` for the root),
    so a rule such as `^module\\.` maps `"module.bn1"` to `"bn1"` and the DDP module
    `"module"` to the root, as torch's `consume_prefix_in_state_dict_if_present` does. When
    paths collide the last entry wins.
    """
    paths = list(metadata.keys())
    prefixes = rules.apply([f"{p}." if p else "" for p in paths])
    out: OrderedDict[str, Any] = OrderedDict()
    for path, prefix in zip(paths, prefixes, strict=True):
        out[prefix[:-1] if prefix.endswith(".") else prefix] = metadata[path]
    return out


def _sequential_winner(rules: KeyRules, sources: list[str]) -> int:
    """Which of `sources` (all revised to one key) the seeds' rule-by-rule loop keeps.

    Each rule is a dict comprehension in the seeds: a merged key keeps its first position
    and its last value, so with several rules the survivor can differ from the plain last
    source. Only the colliding keys are replayed, one rule at a time.
    """
    stage: list[tuple[str, int]] = [(key, i) for i, key in enumerate(sources)]
    for rule in rules.rules:
        names = KeyRules([rule]).apply([key for key, _ in stage])
        merged: dict[str, int] = {}
        for name, (_, source) in zip(names, stage, strict=True):
            merged[name] = source
        stage = list(merged.items())
    return stage[-1][1]
