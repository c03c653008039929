"""`ckptmap inspect PATH`: what a checkpoint holds, from its header where the format allows.

`inspect_checkpoint` returns a JSON-ready summary (tensor count, bytes, dtypes, a prefix tree
with counts and bytes per prefix); `format_inspect` renders it for people. Nothing reads
tensor data:

- safetensors and sharded safetensors: the validated header (and index) only;
- torch zip: the table the Rust reader takes from ``data.pkl`` (files only torch can read:
  ``torch.load(mmap=True, weights_only=True)``, whose tensors are views of the mapped file);
- legacy torch and plain pickles can not be mapped: they are read (``header_only`` False).

Tensors nested anywhere in a checkpoint (``state_dict``, ``optimizer.state`` ...) are listed
under their dotted path. Tensors that share storage (tied weights) count once per name.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from ckptmap.cli.common import add_allow_argument, format_size
from ckptmap.formats import allowlist
from ckptmap.opened import open_checkpoint
from ckptmap.report import printable

__all__ = ["add_inspect_parser", "format_inspect", "inspect_checkpoint", "run_inspect"]


def inspect_checkpoint(
    path: str | os.PathLike[str],
    *,
    depth: int = 3,
    max_children: int = 24,
    allowed_globals: Iterable[Any] = (),
) -> dict[str, Any]:
    """Summarises a checkpoint without reading tensor data where its format allows.

    Args:
        path: a checkpoint file, a ``*.index.json``, or a directory holding one.
        depth: how many dotted levels the prefix tree keeps; deeper levels are folded into
            their ancestor's totals.
        max_children: children shown per tree node; the rest are summed into one
            ``"(N more)"`` entry.
        allowed_globals: as for `ckptmap.formats.load_file` (pickle checkpoints only).

    Returns:
        A JSON-serialisable dict: ``path``, ``format``, ``looks_like``, ``file_bytes``,
        ``header_only``, ``tensor_count``, ``total_bytes``, ``dtypes`` (name to ``count`` and
        ``bytes``, largest first), ``tree`` (``name``, ``count``, ``bytes``, ``children``;
        runs of numbered siblings such as ``layers.0`` .. ``layers.47`` are merged into one
        node named ``"0-47"`` with ``repeat`` 48), ``metadata`` (safetensors ``__metadata__``)
        and ``shards`` (sharded checkpoints).

    Raises:
        The errors of `ckptmap.formats.load_file` (missing, corrupt, unsafe, TorchScript ...).
    """
    with open_checkpoint(path, allowed_globals=allowed_globals) as opened:
        entries = [(e.name, e.dtype, e.nbytes) for e in opened.all_entries()]
        metadata = opened.metadata or None
        shards = opened.shards
    dtypes: dict[str, dict[str, int]] = {}
    for _name, dtype, nbytes in entries:
        slot = dtypes.setdefault(dtype, {"count": 0, "bytes": 0})
        slot["count"] += 1
        slot["bytes"] += nbytes
    tree = _prefix_tree([(name, nbytes) for name, _dtype, nbytes in entries], depth)
    return {
        "path": opened.source,
        "format": opened.format.value if opened.format is not None else "object",
        "looks_like": opened.looks_like,
        "file_bytes": opened.size,
        "header_only": opened.header_only,
        "tensor_count": len(entries),
        "total_bytes": sum(nbytes for _n, _d, nbytes in entries),
        "dtypes": dict(sorted(dtypes.items(), key=lambda kv: (-kv[1]["bytes"], kv[0]))),
        "tree": _cap_children(tree, max_children),
        "metadata": metadata,
        "shards": shards,
    }


def format_inspect(summary: Mapping[str, Any]) -> str:
    """Renders `inspect_checkpoint`'s summary as text for a terminal."""
    lines = [
        f"{printable(summary['path'], 1000)}: {summary['looks_like']}, "
        f"{format_size(summary['file_bytes'])} on disk"
        + ("" if summary["header_only"] else " (read in full: this format has no header)"),
        f"tensors: {summary['tensor_count']:,}   bytes: {format_size(summary['total_bytes'])}"
        + (f"   shards: {summary['shards']}" if summary.get("shards") else ""),
    ]
    if summary["dtypes"]:
        lines.append("dtypes:")
        width = max(len(d) for d in summary["dtypes"])
        for dtype, slot in summary["dtypes"].items():
            lines.append(
                f"  {dtype:<{width}}  {slot['count']:>9,}  {format_size(slot['bytes']):>10}"
            )
    if summary.get("metadata"):
        lines.append("metadata:")
        for key, value in summary["metadata"].items():
            lines.append(f"  {printable(key, 60)}: {printable(value, 73)}")
    children = summary["tree"]["children"]
    if children:
        rows = list(_tree_rows(children, 0))
        width = min(60, max(len(label) for label, _c, _b in rows))
        lines.append("tree:")
        for label, count, nbytes in rows:
            lines.append(f"  {label:<{width}}  {count:>9,}  {format_size(nbytes):>10}")
    return "\n".join(lines)


def add_inspect_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Adds the ``inspect`` subcommand to `ckptmap`'s argument parser."""
    parser = subparsers.add_parser(
        "inspect",
        help="summarise a checkpoint from its header: tensors, bytes, dtypes, prefix tree",
        description="Prints what a checkpoint holds without reading tensor data where the "
        "format allows it (safetensors, sharded, torch zip). Pickles load with "
        "weights_only=True (numpy values and mmengine Runner state included); --allow "
        "names any other class a trusted checkpoint needs.",
    )
    parser.add_argument("path", help="checkpoint file, *.index.json, or a directory with one")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument(
        "--depth", type=int, default=3, help="levels of the prefix tree to show (3)"
    )
    add_allow_argument(parser)
    parser.set_defaults(run=run_inspect)
    return parser


def run_inspect(args: argparse.Namespace) -> int:
    """Runs ``ckptmap inspect`` with parsed `args`; returns the exit status."""

    allowed = allowlist.globals_for(args.allow)
    summary = inspect_checkpoint(args.path, depth=args.depth, allowed_globals=allowed)
    print(json.dumps(summary, indent=2) if args.json else format_inspect(summary))
    return 0


def _prefix_tree(rows: list[tuple[str, int]], depth: int) -> dict[str, Any]:
    """The prefix tree of `rows` (name, bytes), `depth` levels deep, as nested dicts."""
    return _fold(_build_tree(rows, depth), depth, signature=_Signatures(rows))


# The prefix tree's nodes are lists, [count, bytes, children by name, rows below], built only
# `depth` levels deep; `rows` are the positions of the entries below a node, from which two
# numbered siblings are compared.
_COUNT, _BYTES, _CHILDREN, _ROWS = 0, 1, 2, 3


def _build_tree(entries: list[tuple[str, int]], depth: int) -> list[Any]:
    root: list[Any] = [0, 0, {}, []]
    for row, (name, nbytes) in enumerate(entries):
        node = root
        node[_COUNT] += 1
        node[_BYTES] += nbytes
        for part in name.split(".", depth)[:depth]:
            children = node[_CHILDREN]
            child = children.get(part)
            if child is None:
                child = children[part] = [0, 0, {}, []]
            child[_COUNT] += 1
            child[_BYTES] += nbytes
            child[_ROWS].append(row)
            node = child
    return root


class _Signatures:
    """What makes two numbered siblings alike: the names below them (relative to them) and
    their sizes, in order. Computed once per node, as a small int."""

    def __init__(self, entries: list[tuple[str, int]]) -> None:
        self._entries = entries
        self._ids: dict[tuple[Any, ...], int] = {}
        self._of: dict[int, int] = {}

    def __call__(self, node: list[Any], level: int) -> int:
        found = self._of.get(id(node))
        if found is None:
            shape = tuple(
                (self._below(self._entries[row][0], level), self._entries[row][1])
                for row in node[_ROWS]
            )
            found = self._of[id(node)] = self._ids.setdefault(shape, len(self._ids))
        return found

    @staticmethod
    def _below(name: str, level: int) -> str | None:
        parts = name.split(".", level)
        return parts[level] if len(parts) > level else None


def _fold(
    node: list[Any],
    depth: int,
    level: int = 0,
    *,
    name: str = "",
    scale: int = 1,
    repeat: int | None = None,
    signature: _Signatures,
) -> dict[str, Any]:
    """The tree's top `depth` levels as dicts, alike numbered siblings merged.

    ``layers.0`` .. ``layers.47`` with the same names and sizes inside become one node
    ``0-47`` (``repeat`` 48), placed where the first of them was, so a 48-layer model reads
    like its definition. A merged node's subtree is its first member's with counts and
    bytes multiplied by `scale` (the members are alike, so that is their sum).
    """
    out: dict[str, Any] = {
        "name": name,
        "count": node[_COUNT] * scale,
        "bytes": node[_BYTES] * scale,
    }
    if repeat is not None:
        out["repeat"] = repeat
    children = node[_CHILDREN]
    if level >= depth or not children:
        out["children"] = []
        return out
    groups: dict[int, list[str]] = {}
    for child_name, child in children.items():
        if child_name.isdecimal():
            groups.setdefault(signature(child, level + 1), []).append(child_name)
    folded = []
    for child_name, child in children.items():
        members = groups[signature(child, level + 1)] if child_name.isdecimal() else None
        if members is None or len(members) == 1:
            folded.append(
                _fold(child, depth, level + 1, name=child_name, scale=scale, signature=signature)
            )
        elif members[0] == child_name:  # a group is placed where its first member was
            first = min(members, key=int)
            label = f"{first}-{max(members, key=int)}"
            folded.append(
                _fold(
                    children[first],
                    depth,
                    level + 1,
                    name=label,
                    scale=scale * len(members),
                    repeat=len(members),
                    signature=signature,
                )
            )
    out["children"] = folded
    return out


def _cap_children(node: dict[str, Any], limit: int) -> dict[str, Any]:
    children = [_cap_children(child, limit) for child in node["children"]]
    if len(children) > limit:
        rest = children[limit - 1 :]
        children = children[: limit - 1]
        children.append(
            {
                "name": f"({len(rest)} more)",
                "count": sum(c["count"] for c in rest),
                "bytes": sum(c["bytes"] for c in rest),
                "children": [],
            }
        )
    return {**node, "children": children}


def _tree_rows(children: list[dict[str, Any]], level: int) -> Iterator[tuple[str, int, int]]:
    for child in children:
        name = printable(child["name"])
        if "repeat" in child:
            name = f"[{name}] x{child['repeat']}"
        yield "  " * level + name, child["count"], child["bytes"]
        yield from _tree_rows(child["children"], level + 1)
