"""`ckptmap inspect PATH`: what a checkpoint holds, from its header where the format allows.

`inspect_checkpoint` returns a JSON-ready summary (tensor count, bytes, dtypes, a prefix tree
with counts and bytes per prefix); `format_inspect` renders it for people. Nothing reads
tensor data:

- safetensors and sharded safetensors: the validated header (and index) only;
- torch zip: ``torch.load(mmap=True, weights_only=True)``, which builds tensors as views of
  the mapped file without touching their pages;
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
    tree = _fold(_build_tree((name, nbytes) for name, _dtype, nbytes in entries), depth, 0)
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


def _new_node(name: str) -> dict[str, Any]:
    return {"name": name, "count": 0, "bytes": 0, "children": {}}


def _build_tree(entries: Iterable[tuple[str, int]]) -> dict[str, Any]:
    root = _new_node("")
    for name, nbytes in entries:
        node = root
        node["count"] += 1
        node["bytes"] += nbytes
        for part in name.split("."):
            children = node["children"]
            node = children.get(part)
            if node is None:  # not setdefault: that builds a node per visit (600k for 100k)
                node = children[part] = _new_node(part)
            node["count"] += 1
            node["bytes"] += nbytes
    return root


def _merge_into(target: dict[str, Any], source: dict[str, Any]) -> None:
    target["count"] += source["count"]
    target["bytes"] += source["bytes"]
    for name, child in source["children"].items():
        if name in target["children"]:
            _merge_into(target["children"][name], child)
        else:
            target["children"][name] = _copy(child)


def _copy(node: dict[str, Any]) -> dict[str, Any]:
    copied = {k: v for k, v in node.items() if k != "_signature"}
    copied["children"] = {k: _copy(v) for k, v in node["children"].items()}
    return copied


def _fold(node: dict[str, Any], depth: int, level: int) -> dict[str, Any]:
    """Merges alike numbered siblings and cuts the tree at `depth`.

    ``layers.0`` .. ``layers.47`` with the same names and sizes inside become one node
    ``0-47`` (``repeat`` 48), placed where the first of them was, so a 48-layer model reads
    like its definition. Children become lists.
    """
    out = {k: v for k, v in node.items() if k not in ("children", "_signature")}
    if level >= depth or not node["children"]:
        out["children"] = []
        return out
    groups: dict[Any, list[dict[str, Any]]] = {}
    for name, child in node["children"].items():
        if name.isdigit():
            groups.setdefault(_signature(child), []).append(child)
    grouped: list[dict[str, Any]] = []
    emitted: set[int] = set()
    for name, child in node["children"].items():
        if not name.isdigit():
            grouped.append(child)
            continue
        members = groups[_signature(child)]
        if len(members) == 1:
            grouped.append(child)
        elif id(members) not in emitted:
            emitted.add(id(members))
            numbers = [int(m["name"]) for m in members]
            merged = _new_node(f"{min(numbers)}-{max(numbers)}")
            for member in sorted(members, key=lambda m: int(m["name"])):
                _merge_into(merged, member)
            merged["repeat"] = len(members)
            grouped.append(merged)
    out["children"] = [_fold(child, depth, level + 1) for child in grouped]
    return out


def _signature(node: dict[str, Any]) -> tuple:
    """What makes two numbered siblings alike: the names and sizes below them."""
    cached = node.get("_signature")
    if cached is None:
        cached = node["_signature"] = (
            node["bytes"],
            tuple((name, _signature(child)) for name, child in node["children"].items()),
        )
    return cached


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
