"""The checkpoint codec: a checkpoint as tensors plus string metadata, and back.

safetensors files (and shard indexes) hold tensors and a flat ``str -> str`` metadata table.
`encode` turns a checkpoint (``{"meta": ..., "state_dict": {...}, ...}`` or a bare state dict)
into the state dict's tensors, in order, and that table; `decode` turns a file's tensors and
metadata back into the same checkpoint. `save_checkpoint` writes with `encode`; every loader
(`ckptmap.formats.load_file`, `ckptmap convert`, the open/plan layer) reads with `decode`.

The table, version 1 (every value a JSON text):

==========================  ==================================================================
``<entry>``                 each entry of the checkpoint besides the state dict (``meta``...)
``ckptmap.codec``           ``"1"``: written by this codec
``ckptmap.entries``         the checkpoint's top-level names in order, the state dict's in its
                            place (only when the state dict sat under a key)
``ckptmap.state_dict_key``  that key (``"state_dict"`` or ``"model"``)
``ckptmap.key_order``       the state dict's keys in order (file headers may list them in
                            another order)
``ckptmap.state_dict_metadata``  the state dict's ``_metadata`` (module versions)
``ckptmap.tuples``          where the entries held tuples (JSON has none), as paths
``format``                  ``"pt"`` (not JSON), as `safetensors` and transformers expect,
                            unless the checkpoint has an entry of that name
==========================  ==================================================================

Entry values are JSON: None, bool, int, float, str, lists, tuples and dicts with str keys,
nested at most `MAX_DEPTH` deep; tuples come back as tuples. Files whose metadata has no
``ckptmap.`` entry were not written here: `decode` gives their tensors back as they are. Files
written before ``ckptmap.entries`` existed decode as before (every string entry is one).
Metadata is untrusted input: a malformed ``ckptmap.`` entry is ignored (the tensors still
load in the file's order), and a value that is not JSON comes back as the string it is.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ckptmap.errors import NotSerializableError
from ckptmap.statedict import state_dict_key

__all__ = [
    "CODEC_VERSION",
    "MAX_DEPTH",
    "PREFIX",
    "Encoded",
    "Layout",
    "decode",
    "encode",
    "layout",
    "split_checkpoint",
    "state_dict_key",
]

#: Names of the codec's own metadata entries start with this.
PREFIX = "ckptmap."
CODEC_VERSION = "1"
#: Entry values nested deeper than this are refused (and never parsed back).
MAX_DEPTH = 64

_CODEC = PREFIX + "codec"
_ENTRIES = PREFIX + "entries"
_KEY = PREFIX + "state_dict_key"
_ORDER = PREFIX + "key_order"
_SD_METADATA = PREFIX + "state_dict_metadata"
_TUPLES = PREFIX + "tuples"
_FORMAT = "format"
_FORMAT_VALUE = "pt"

Path = tuple[str | int, ...]


# --- encoding -----------------------------------------------------------------------------------


def split_checkpoint(checkpoint: Any, source: str) -> tuple[Mapping[str, Any], dict, str | None]:
    """``(state dict, the other entries in order, the state dict's key)``.

    Raises:
        NotSerializableError: `checkpoint` is not a mapping.
    """
    if not isinstance(checkpoint, Mapping):
        raise NotSerializableError(
            f"a {type(checkpoint).__name__} checkpoint",
            "safetensors or shards",
            "these need a dict of tensors, or a dict with a 'state_dict' entry",
            f"save {source} as a plain .pth instead",
        )
    key = state_dict_key(checkpoint)
    if key is None:
        return checkpoint, {}, None
    return checkpoint[key], {k: v for k, v in checkpoint.items() if k != key}, key


@dataclass(frozen=True)
class Encoded:
    """A checkpoint as a file holds it.

    Attributes:
        tensors: the state dict (keys in its order; values unchecked: the writer checks them).
        metadata: the ``str -> str`` table (see the module docstring).
        entries: the checkpoint's other entries, as given.
    """

    tensors: Mapping[str, Any]
    metadata: dict[str, str]
    entries: dict[str, Any] = field(default_factory=dict)


def _refuse(where: str, reason: str, hint: str = "save to a .pth file instead") -> None:
    raise NotSerializableError(where, "JSON metadata", reason, hint)


def _check_json(value: Any, where: str, path: Path, tuples: list[Path], depth: int = 0) -> None:
    if depth > MAX_DEPTH:
        _refuse(where, f"it is nested more than {MAX_DEPTH} levels deep")
    if value is None or isinstance(value, bool | int | float | str):
        return
    if isinstance(value, list | tuple):
        if isinstance(value, tuple):
            tuples.append(path)
        for i, item in enumerate(value):
            _check_json(item, f"{where}[{i}]", (*path, i), tuples, depth + 1)
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                _refuse(
                    f"{where}[{key!r}]",
                    f"its key is a {type(key).__name__}, and JSON keys are strings",
                    "use str keys, or save to a .pth file",
                )
            _check_json(item, f"{where}[{key!r}]", (*path, key), tuples, depth + 1)
        return
    _refuse(
        where,
        f"it is a {type(value).__name__}; only None, bool, int, float, str, lists, tuples and "
        "dicts fit in safetensors or index metadata",
        "save to a .pth file, or drop or convert that entry",
    )


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def encode(checkpoint: Any, source: str, *, reserved: tuple[str, ...] = ()) -> Encoded:
    """Splits `checkpoint` into its state dict and the metadata table that rebuilds the rest.

    Args:
        checkpoint: a state dict, or a mapping with one under ``"state_dict"`` / ``"model"``.
        source: the target's name, for messages.
        reserved: entry names the caller's container uses itself (``"total_size"`` in an
            index); a checkpoint entry of such a name is refused.

    Raises:
        NotSerializableError: `checkpoint` is not a mapping; an entry name that is not a str,
            starts with ``ckptmap.`` or is reserved; a value JSON can not hold (a tensor, an
            int dict key, an object, nesting deeper than `MAX_DEPTH`).
    """
    state_dict, rest, key = split_checkpoint(checkpoint, source)
    metadata: dict[str, str] = {_CODEC: CODEC_VERSION}
    tuples: list[Path] = []
    for name, value in rest.items():
        if not isinstance(name, str):
            _refuse(f"checkpoint key {name!r}", "metadata keys are strings", "use str keys")
        if name.startswith(PREFIX) or name in reserved:
            _refuse(
                f"checkpoint[{name!r}]",
                f"the name is taken by ckptmap's own metadata ({PREFIX}*, "
                f"{', '.join(reserved) or 'nothing else'})",
                "rename the entry",
            )
        _check_json(value, f"checkpoint[{name!r}]", (name,), tuples)
        metadata[name] = _dumps(value)
    if key is not None:
        metadata[_ENTRIES] = _dumps([k for k in checkpoint if k == key or k in rest])
        metadata[_KEY] = _dumps(key)
    if _FORMAT not in rest:
        metadata[_FORMAT] = _FORMAT_VALUE
    metadata[_ORDER] = _dumps(list(state_dict))
    sd_metadata = getattr(state_dict, "_metadata", None)
    if sd_metadata is not None:
        _check_json(sd_metadata, "state_dict._metadata", (), [])
        metadata[_SD_METADATA] = _dumps(sd_metadata)
    if tuples:
        metadata[_TUPLES] = _dumps(tuples)
    return Encoded(state_dict, metadata, rest)


# --- decoding -----------------------------------------------------------------------------------


def _loads(text: Any) -> tuple[bool, Any]:
    """``(True, value)`` for JSON text within `MAX_DEPTH`, else ``(False, None)``."""
    if not isinstance(text, str):
        return False, None
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return False, None
    return (True, value) if _depth_ok(value) else (False, None)


def _depth_ok(value: Any, depth: int = 0) -> bool:
    if depth > MAX_DEPTH + 1:
        return False
    if isinstance(value, list):
        return all(_depth_ok(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return all(_depth_ok(v, depth + 1) for v in value.values())
    return True


def _str_list(text: Any) -> list[str] | None:
    if not isinstance(text, str):
        return None
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return None
    if isinstance(value, list) and all(type(v) is str for v in value):
        return value
    return None


def _restore_tuples(values: dict[str, Any], paths: Any) -> None:
    if not isinstance(paths, list):
        return
    valid = [p for p in paths if isinstance(p, list) and p and isinstance(p[0], str)]
    # Deepest first, so a tuple inside a tuple is converted before its parent is.
    for path in sorted(valid, key=len, reverse=True):
        try:
            parent: Any = values
            for step in path[:-1]:
                parent = parent[step]
            last = path[-1]
            if isinstance(parent[last], list) and not isinstance(last, bool):
                parent[last] = tuple(parent[last])
        except (KeyError, IndexError, TypeError):
            continue  # a path that does not fit the values: tampered or foreign; skip it


@dataclass(frozen=True)
class Layout:
    """What a file's metadata says about the checkpoint around its tensors.

    Attributes:
        ours: the metadata was written by this codec (else `rebuild` returns the tensors).
        entries: the checkpoint's other entries, decoded, in order.
        order: every top-level name in order, the state dict's included (empty: the state
            dict is the whole checkpoint).
        key: where the state dict sits, or None when it is the whole checkpoint.
        key_order: the state dict's keys in order, when recorded.
        state_dict_metadata: the state dict's ``_metadata``, when recorded.
    """

    ours: bool = False
    entries: dict[str, Any] = field(default_factory=dict)
    order: tuple[str, ...] = ()
    key: str | None = None
    key_order: tuple[str, ...] | None = None
    state_dict_metadata: OrderedDict[str, Any] | None = None

    def rebuild(self, tensors: Mapping[str, Any]) -> Any:
        """The checkpoint: `tensors` put in order, under their key, beside the entries."""
        if not self.ours:
            return tensors
        names = list(tensors)
        if self.key_order is not None and list(self.key_order) != names:
            present = set(names)
            ordered = [n for n in dict.fromkeys(self.key_order) if n in present]
            placed = set(ordered)
            # Tensors the recorded order does not know (an edited file) follow, in file order.
            names = ordered + [n for n in names if n not in placed]
        state_dict: OrderedDict[str, Any] = OrderedDict([(n, tensors[n]) for n in names])
        if self.state_dict_metadata is not None:
            state_dict._metadata = OrderedDict(self.state_dict_metadata)  # type: ignore[attr-defined]
        if self.key is None:
            return state_dict
        return {name: state_dict if name == self.key else self.entries[name] for name in self.order}


def layout(metadata: Mapping[str, Any]) -> Layout:
    """Reads a file's metadata table (safetensors ``__metadata__`` or an index's ``metadata``).

    Never raises for malformed values: see the module docstring.
    """
    if not any(isinstance(k, str) and k.startswith(PREFIX) for k in metadata):
        return Layout()
    ok, key = _loads(metadata.get(_KEY))
    key = key if ok and isinstance(key, str) else None
    order = _str_list(metadata.get(_ENTRIES))
    if order is None:  # written before the entry list: every string entry is one
        order = [k for k, v in metadata.items() if not k.startswith(PREFIX) and isinstance(v, str)]
        if key is not None:
            order.append(key)
    if key is None:
        order = []
    elif key not in order:
        order.append(key)
    order = list(dict.fromkeys(order))
    entries: dict[str, Any] = {}
    for name in order:
        if name == key:
            continue
        raw = metadata.get(name)
        ok, value = _loads(raw)
        entries[name] = value if ok else raw
    ok, paths = _loads(metadata.get(_TUPLES))
    if ok:
        _restore_tuples(entries, paths)
    key_order = _str_list(metadata.get(_ORDER))
    ok, sd_metadata = _loads(metadata.get(_SD_METADATA))
    if not (ok and isinstance(sd_metadata, dict)):
        sd_metadata = None
    return Layout(
        ours=True,
        entries=entries,
        order=tuple(order),
        key=key,
        key_order=None if key_order is None else tuple(key_order),
        state_dict_metadata=None if sd_metadata is None else OrderedDict(sd_metadata),
    )


def decode(tensors: Mapping[str, Any], metadata: Mapping[str, Any]) -> Any:
    """The checkpoint that `encode` turned into `tensors` and `metadata`.

    Args:
        tensors: the file's tensors by name (any mapping; lazy ones are indexed, not copied).
        metadata: the safetensors header's ``__metadata__``, or a shard index's ``metadata``.

    Returns:
        For metadata written by `encode`: the checkpoint as it was saved (entries, their order,
        the state dict's key, key order and ``_metadata``). Otherwise `tensors` itself.
    """
    return layout(metadata).rebuild(tensors)
