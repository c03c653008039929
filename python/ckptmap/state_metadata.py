"""torch's `_metadata` on a state dict, checked before anything trusts it.

`Module.state_dict()` attaches ``_metadata``: a mapping from each module's path (``""`` for the
root, ``"backbone.bn1"``) to a small dict of that module's records, ``{"version": 2}`` for
BatchNorm. Loading hands each module its record, and modules read it (BatchNorm compares the
version with ``<``). A checkpoint can carry anything there; torch then fails deep inside a
module with an AttributeError or TypeError that names neither the file nor the entry.
`check_state_metadata` refuses such a ``_metadata`` first, with an `InvalidStateDictError`
naming the module path and what is wrong.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ckptmap.errors import InvalidStateDictError

__all__ = ["check_state_metadata"]

_FIX = (
    "The state dict's per-module records (its `_metadata` attribute) are damaged: re-save it "
    "from model.state_dict(), or drop them (`del state_dict._metadata`) to load without them"
)


def _type(value: Any) -> str:
    return type(value).__name__


def check_state_metadata(metadata: Any, source: str = "the state dict") -> Any:
    """Checks torch's `_metadata` (None passes) and returns it unchanged.

    Args:
        metadata: the ``_metadata`` attribute of a state dict, or None.
        source: what it belongs to, for messages (e.g. the checkpoint's path).

    Raises:
        InvalidStateDictError: (a TypeError) not a mapping; a module path that is not a str;
            a record that is not a mapping; a ``"version"`` that is not an int.
    """
    if metadata is None:
        return None
    if not isinstance(metadata, Mapping):
        raise InvalidStateDictError(
            f"{source} has a _metadata of type {_type(metadata)}, not a mapping of module paths "
            f"to records. {_FIX}"
        )
    for path, record in metadata.items():
        if not isinstance(path, str):
            raise InvalidStateDictError(
                f"{source} has a _metadata entry keyed by {path!r} (a {_type(path)}), not a "
                f"module path. {_FIX}"
            )
        if not isinstance(record, Mapping):
            raise InvalidStateDictError(
                f"{source} has a _metadata record for module {path!r} of type {_type(record)}, "
                f"not a dict such as {{'version': 1}}. {_FIX}"
            )
        version = record.get("version")
        if version is not None and (not isinstance(version, int) or isinstance(version, bool)):
            raise InvalidStateDictError(
                f"{source} records version {version!r} (a {_type(version)}) for module "
                f"{path!r}; module versions are ints. {_FIX}"
            )
    return metadata
