"""Keeping the part of a state dict under one module, as `_load_checkpoint_with_prefix` does."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Any, TypeVar

from ckptmap._core import filter_prefix_keys
from ckptmap.state_metadata import check_state_metadata

V = TypeVar("V")


def filter_prefix(
    state_dict: Mapping[str, V], prefix: str, strip: bool = True
) -> OrderedDict[str, V]:
    """Keeps the entries of `state_dict` whose keys lie under `prefix`.

    As in mmengine's `_load_checkpoint_with_prefix`, a non-empty `prefix` that does not end in
    ``"."`` gets one appended: ``"backbone"`` keeps ``"backbone.conv.weight"`` but neither
    ``"backbone2.conv.weight"`` nor a key ``"backbone"`` itself. The empty prefix keeps every
    entry. The keys are matched in the Rust core, with the GIL released.

    The `_metadata` attribute (torch's per-module version records, keyed by module path
    without a trailing dot, ``""`` for the root) is restricted to the modules under the prefix
    and re-keyed the same way: stripping ``"backbone"`` turns ``"backbone"`` into ``""`` and
    ``"backbone.bn1"`` into ``"bn1"``, so BatchNorm layers still see their version when the
    result is loaded into the backbone alone.

    Args:
        state_dict: the mapping to filter; it is not modified.
        prefix: the module path to keep, with or without its trailing dot.
        strip: whether to remove the prefix from the kept keys.

    Returns:
        A new OrderedDict with the kept entries in their original order, holding the same
        value objects (nothing is copied). It is empty when no key lies under the prefix.

    Raises:
        TypeError: a key of `state_dict` (or of its `_metadata`) is not a str.
    """
    keys = list(state_dict.keys())
    positions, names = filter_prefix_keys(keys, prefix, strip)
    if type(state_dict) is dict:
        values = list(state_dict.values())
        kept_values = map(values.__getitem__, positions)
    else:
        # An OrderedDict's values() costs two hash lookups per entry, and a lazy mapping
        # would load every value: look up only the kept keys.
        kept_values = map(state_dict.__getitem__, map(keys.__getitem__, positions))
    kept: OrderedDict[str, V] = OrderedDict(zip(names, kept_values, strict=True))
    metadata = check_state_metadata(getattr(state_dict, "_metadata", None))
    if metadata is not None:
        kept._metadata = filter_prefix_metadata(metadata, prefix, strip)  # type: ignore[attr-defined]
    return kept


def filter_prefix_metadata(
    metadata: Mapping[str, Any], prefix: str, strip: bool = True
) -> OrderedDict[str, Any]:
    """Restricts torch's `_metadata` to the modules under `prefix`, as `filter_prefix` does keys.

    Each module path is matched in its key-prefix form (``"backbone.bn1."``, ``""`` for the
    root), so a module is kept exactly when its own parameters would be, and stripping maps the
    module at `prefix` itself to the root ``""``.
    """
    paths = list(metadata.keys())
    positions, names = filter_prefix_keys([p + "." if p != "" else p for p in paths], prefix, strip)
    # Every kept name is "" (the new root) or ends in the "." added above.
    return OrderedDict(
        (name[:-1], metadata[paths[i]]) for i, name in zip(positions, names, strict=True)
    )
