"""`ckptmap convert`: rewrite a checkpoint in another format, renamed, filtered or cast.

Any format ckptmap reads (torch zip, legacy torch, pickle, safetensors, sharded) goes to any it
writes: the target's name decides, as for `ckptmap.save.save_checkpoint`, which does the
writing (so every file is replaced atomically and a failed convert leaves the target as it
was). ``.safetensors`` targets carry the checkpoint's other entries (``meta`` ...) in their
metadata, and a safetensors or sharded source gives them back (`ckptmap.formats.codec`: JSON
values, tuples included, in their order, and the state dict's key order), so ``.pth`` ->
safetensors -> ``.pth`` keeps them.

Converting a file onto itself is allowed: the source is mapped lazily, so it is read into
memory in full before the target is written.
"""

from __future__ import annotations

import os
import re
import sys
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from ckptmap._core import KeyRules
from ckptmap.checkpoint import find_state_dict
from ckptmap.cli.common import add_allow_argument, allowed_globals_for, format_size, rule_arg
from ckptmap.errors import ConvertError, PrefixNotFoundError
from ckptmap.formats import load_file
from ckptmap.formats.codec import state_dict_key
from ckptmap.formats.index import read_index
from ckptmap.formats.sniff import sniff
from ckptmap.prefix import filter_prefix
from ckptmap.revise import revise_keys
from ckptmap.save import INDEX_SUFFIX, parse_size, save_checkpoint

__all__ = [
    "DTYPES",
    "ConvertResult",
    "add_convert_parser",
    "convert",
    "parse_dtype",
    "progress",
    "read_checkpoint",
    "run_convert",
]

T = TypeVar("T")

#: Names ``--dtype`` accepts.
DTYPES: dict[str, torch.dtype] = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
    "fp64": torch.float64,
    "float64": torch.float64,
    "double": torch.float64,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "float8_e5m2": torch.float8_e5m2,
}


def progress(iterable: Iterable[T], *, total: int | None = None, desc: str = "") -> Iterator[T]:
    """`iterable` with a tqdm bar on stderr when stderr is a terminal, plain otherwise."""
    if not sys.stderr.isatty():
        yield from iterable
        return
    from tqdm import tqdm  # type: ignore[import-untyped]

    yield from tqdm(iterable, total=total, desc=desc, leave=False, unit="tensor", mininterval=0.2)


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """The floating-point dtype named `name` (``bf16``, ``float16``, ``fp32`` ...)."""
    if isinstance(name, torch.dtype):
        if not name.is_floating_point:
            raise ConvertError(f"dtype {name} is not a floating-point dtype")
        return name
    dtype = DTYPES.get(name.lower().removeprefix("torch."))
    if dtype is None:
        raise ConvertError(
            f"unknown dtype {name!r}: use one of {', '.join(DTYPES)} (floating-point tensors "
            "are cast, integer and bool tensors are kept)"
        )
    return dtype


# --- reading ------------------------------------------------------------------------------------


def read_checkpoint(
    path: str | os.PathLike[str], *, allowed_globals: Iterable[Any] = ()
) -> tuple[Any, str]:
    """Reads a checkpoint for conversion: `(checkpoint, format name)`.

    Pickles come back as `torch.load` gives them (mapped where the format allows). Safetensors
    and sharded checkpoints written by `save_checkpoint` come back as they were saved, their
    entries decoded by `ckptmap.formats.codec` (others: their tensors; metadata that ckptmap
    did not write, such as a sharded index's ``total_size``, is not an entry).
    """

    sniffed = sniff(path)
    sniffed.raise_if_corrupt()
    checkpoint = load_file(sniffed.path, "cpu", allowed_globals=allowed_globals)
    return checkpoint, sniffed.format.value


def _index_of(path: str) -> str:
    try:
        from ckptmap.formats.index import find_index

        return find_index(path) if os.path.isdir(path) else path
    except Exception:
        return path


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def _targets(dst: str, sharded: bool) -> list[str]:

    if not sharded:
        return [dst]
    return [dst if dst.endswith(INDEX_SUFFIX) else dst + INDEX_SUFFIX]


def _materialize(obj: Any, seen: dict[tuple, torch.Tensor]) -> Any:
    """Deep copy of every tensor in `obj` (ties kept), so nothing refers to the mapped source."""
    if isinstance(obj, torch.Tensor):
        ident = (obj.untyped_storage().data_ptr(), obj.storage_offset(), obj.shape, obj.stride())
        if ident not in seen:
            seen[ident] = obj.clone()
        return seen[ident]
    if isinstance(obj, Mapping):
        out = OrderedDict((k, _materialize(v, seen)) for k, v in obj.items())
        metadata = getattr(obj, "_metadata", None)
        if metadata is not None:
            out._metadata = metadata  # type: ignore[attr-defined]
        return out if type(obj) is not dict else dict(out)
    if isinstance(obj, list):
        return [_materialize(v, seen) for v in obj]
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(_materialize(v, seen) for v in obj)
    return obj


# --- converting ---------------------------------------------------------------------------------


@dataclass
class ConvertResult:
    """What `convert` wrote.

    Attributes:
        source: the input path; `source_format` its sniffed format.
        target: the path written (the index when sharded).
        tensors: tensors in the state dict written; `nbytes` their size.
        cast: floating-point tensors cast to `dtype`.
        entries: the checkpoint's other entries kept (``meta`` ...); `dropped` those removed.
        collisions: `(key, sources, kept)` for keys that the rules merged.
        in_place: the target was the source itself (read in full first).
    """

    source: str
    source_format: str
    target: str
    tensors: int = 0
    nbytes: int = 0
    cast: int = 0
    dtype: str | None = None
    shards: int | None = None
    entries: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    collisions: list[tuple[str, tuple[str, ...], str]] = field(default_factory=list)
    in_place: bool = False


def convert(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    rules: Iterable[tuple[str, str]] | KeyRules | None = None,
    prefix: str | None = None,
    dtype: str | torch.dtype | None = None,
    max_shard_size: int | str | None = None,
    drop: Sequence[str] = (),
    allowed_globals: Iterable[Any] = (),
    show_progress: bool = True,
) -> ConvertResult:
    """Rewrites the checkpoint `src` as `dst` (format by `dst`'s name, as `save_checkpoint`).

    Args:
        src: a checkpoint file, ``*.index.json`` or a directory with one.
        dst: the target; ``*.safetensors`` for safetensors, anything else for ``torch.save``.
        rules: `(pattern, repl)` key rules applied to the state dict as `re.sub`, in order.
        prefix: keep only the state dict's keys under this prefix (after the rules), stripped.
        dtype: cast floating-point tensors to this dtype (``"bf16"``, ``torch.float16`` ...).
        max_shard_size: write shards of at most this size plus an index (``"5GB"``).
        drop: top-level entries of the checkpoint to leave out (e.g. ``"optimizer"``, whose
            tensors safetensors metadata can not hold).
        allowed_globals: for pickle sources, as for `ckptmap.formats.load_file`.
        show_progress: a progress bar on a terminal while tensors are prepared.

    Raises:
        re.error, ConvertError, ValueError: bad rules, dtype or size (before anything is
            read); PrefixNotFoundError: nothing under `prefix`; the loaders' errors for a bad
            source and `save_checkpoint`'s for a failed write (the target is left as it was).
    """

    src, dst = os.fspath(src), os.fspath(dst)
    # Every argument is checked before the source is read.
    key_rules = rules if isinstance(rules, KeyRules) else KeyRules(list(rules or []))
    cast_to = None if dtype is None else parse_dtype(dtype)
    limit = None if max_shard_size is None else parse_size(max_shard_size)
    in_place = any(_same_file(_index_of(src), t) for t in _targets(dst, limit is not None))

    checkpoint, fmt = read_checkpoint(src, allowed_globals=allowed_globals)
    key = state_dict_key(checkpoint)
    state_dict = find_state_dict(checkpoint, src)
    rest: dict[str, Any] = (
        {k: v for k, v in checkpoint.items() if k != key} if key is not None else {}
    )
    for name in drop:
        if name not in rest:
            raise ConvertError(
                f"--drop {name!r}: {src!r} has no such entry besides the weights; it has "
                f"{', '.join(map(repr, rest)) or 'none'}"
            )
        del rest[name]
    result = ConvertResult(source=src, source_format=fmt, target=dst, in_place=in_place)
    result.dropped = list(drop)
    result.entries = list(rest)

    if len(key_rules):
        state_dict, collisions = revise_keys(state_dict, key_rules)
        result.collisions = [(c.key, tuple(c.sources), c.kept) for c in collisions]
    if prefix:
        kept = filter_prefix(state_dict, prefix, strip=True)
        if not kept:
            full = prefix if prefix.endswith(".") else prefix + "."
            tops = list(dict.fromkeys(str(k).split(".", 1)[0] for k in state_dict))[:10]
            raise PrefixNotFoundError(full, src, tops)
        state_dict = kept

    out: OrderedDict[str, Any] = OrderedDict()
    seen: dict[tuple, torch.Tensor] = {}
    items = (
        progress(
            state_dict.items(),
            total=len(state_dict),
            desc="reading" if in_place else "casting",
        )
        if show_progress and (in_place or cast_to is not None)
        else state_dict.items()
    )
    for name, value in items:
        if isinstance(value, torch.Tensor):
            if cast_to is not None and value.is_floating_point() and value.dtype != cast_to:
                ident = (value.untyped_storage().data_ptr(), value.storage_offset(),
                         value.shape, value.stride())  # fmt: skip
                if ident not in seen:
                    seen[ident] = value.to(cast_to)
                value = seen[ident]
                result.cast += 1
            elif in_place:
                value = _materialize(value, seen)
            result.tensors += 1
            result.nbytes += value.numel() * value.element_size()
        elif in_place:
            value = _materialize(value, seen)
        out[name] = value
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None:
        out._metadata = metadata  # type: ignore[attr-defined]
    if in_place:
        rest = _materialize(rest, seen)
    result.dtype = None if cast_to is None else str(cast_to).removeprefix("torch.")

    new: Any = out if key is None else {**rest, key: out}
    if key is not None:
        # The original order of the entries, the weights where they were.
        order = [k for k in checkpoint if k == key or k in rest]
        new = {k: new[k] for k in order}
    try:
        result.target = save_checkpoint(new, dst, max_shard_size=limit)
    except TypeError as err:  # NotSerializableError: an entry JSON metadata can't hold
        entry = re.match(r"checkpoint\[('[^']*')\]", str(err))
        if entry is None or key is None:
            raise
        raise ConvertError(f"{err}; or leave it out: --drop {entry.group(1)}") from err
    if limit is not None:
        result.shards = len(set(read_index(result.target)[0].values()))
    return result


def format_convert(result: ConvertResult) -> str:

    shards = f", {result.shards} shard(s)" if result.shards is not None else ""
    lines = [
        f"converted {result.source} ({result.source_format}) -> {result.target}{shards}"
        + (" (in place: the source was read in full first)" if result.in_place else ""),
        f"  tensors: {result.tensors:,} ({format_size(result.nbytes)})"
        + (f", {result.cast:,} floating-point cast to {result.dtype}" if result.dtype else ""),
    ]
    if result.entries:
        lines.append(f"  entries kept beside the weights: {', '.join(result.entries)}")
    if result.dropped:
        lines.append(f"  entries dropped: {', '.join(result.dropped)}")
    if result.collisions:
        lines.append(f"  collisions after the rules ({len(result.collisions)}), last one kept:")
        lines.extend(f"    {k} <- {', '.join(s)} (kept {kept})" for k, s, kept in result.collisions)
    return "\n".join(lines)


# --- the command line -------------------------------------------------------------------------

CONVERT_EPILOG = """\
The target's name picks the format: *.safetensors writes safetensors (the checkpoint's other
entries, e.g. meta, go into its metadata as JSON), anything else torch.save's format; with
--max-shard-size, shards plus OUT.index.json. Every file is written to a temp file and renamed
into place, so a failed convert leaves OUT as it was; OUT may be IN itself.

examples:
  ckptmap convert epoch_12.pth model.safetensors --revise '^module\\.=>' --drop optimizer
  ckptmap convert model.pth model.safetensors --dtype bf16 --max-shard-size 2GB
  ckptmap convert model.safetensors.index.json model.pth
  ckptmap convert ddp.pth backbone.pth --prefix module.backbone
"""


def add_convert_parser(subparsers: Any) -> Any:
    """Adds the ``convert`` subcommand to `ckptmap`'s argument parser."""
    import argparse

    parser = subparsers.add_parser(
        "convert",
        help="rewrite a checkpoint: .pth <-> (sharded) safetensors, renamed, filtered, cast",
        description="Reads IN (any format ckptmap loads) and writes OUT atomically, keeping "
        "the checkpoint's other entries (meta ...), optionally renaming keys, keeping one "
        "prefix, casting floating-point tensors and sharding.",
        epilog=CONVERT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("source", metavar="IN", help="checkpoint file, index or directory")
    parser.add_argument("target", metavar="OUT", help="file to write (.safetensors or other)")
    parser.add_argument(
        "--revise",
        metavar="PATTERN=>REPL",
        type=rule_arg,
        action="append",
        default=[],
        help="rename keys as re.sub(PATTERN, REPL, key); repeatable, applied in order",
    )
    parser.add_argument("--prefix", metavar="P", help="keep only keys under P, stripping P")
    parser.add_argument(
        "--dtype",
        metavar="D",
        help="cast floating-point tensors to D (bf16, fp16, fp32, fp64, float8_e4m3fn, ...)",
    )
    parser.add_argument(
        "--max-shard-size",
        metavar="S",
        help="write shards of at most S (e.g. 5GB, 512MiB) plus OUT.index.json",
    )
    parser.add_argument(
        "--drop",
        metavar="ENTRY",
        action="append",
        default=[],
        help="leave out a top-level entry besides the weights (e.g. optimizer); repeatable",
    )
    add_allow_argument(parser)
    parser.set_defaults(run=run_convert)
    return parser


def run_convert(args: Any) -> int:
    """Runs ``ckptmap convert`` with parsed `args`; returns the exit status."""

    if args.dtype is not None:
        parse_dtype(args.dtype)
    result = convert(
        args.source,
        args.target,
        rules=args.revise,
        prefix=args.prefix,
        dtype=args.dtype,
        max_shard_size=args.max_shard_size,
        drop=args.drop,
        allowed_globals=allowed_globals_for(args.allow),
    )
    print(format_convert(result))
    return 0
