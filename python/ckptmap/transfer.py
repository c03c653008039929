"""How tensors reach parameters: `dst.copy_(src)` for many pairs at once, on any device.

A load ends in one `copy_` per tensor. Done one by one, 49k small tensors cost 49k kernel
launches or host-to-device transfers plus as many Python steps; `copy_tensors` does them
with a few calls, and the outcome of doing them in order:

- host to host: `torch._foreach_copy_` (on the CPU, `copy_` pair by pair in C++, in order);
- host to device: through `ckptmap.streaming`'s ring of pinned buffers. Small tensors are
  packed per (source dtype, destination dtype) with torch's C++ flatten, cast on the host
  where torch casts them (a host-to-device `copy_` converts on the host), sent with one
  transfer per slot and scattered on the device by `torch._foreach_copy_`; large ones are
  sent in slot-sized chunks straight into their destinations, read by several threads;
- device to device (same device): `torch._foreach_copy_` per dtype (a list mixing dtypes
  falls back to one copy per tensor); casts: the sources flattened, converted by one
  `.to(dtype)` (the kernel `copy_` uses), scattered like the rest;
- anything else (device to host, between devices, other devices): `copy_` one by one.

Batches reorder copies, so they are used only when order cannot matter: destinations that
are the same tensor (a tied weight reached under two names) keep only the last copy, as
`copy_` in order leaves it; a copy of a tensor onto itself is dropped; if any other overlap
remains between a destination and another destination or a source, everything is copied one
by one, in order. Every copy is complete when `copy_tensors` returns (the streams used are
synchronized): hooks and the caller see the loaded values, and may free the sources.

Device specifics live in `ckptmap.engines`; on a machine without a GPU the same code runs
with tensors standing in for a device's (see the tests), so every branch is exercised.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from ckptmap.engines import HOST, CopyEngine, current_engine, engine_override
from ckptmap.streaming import SMALL_BYTES, Piece, chunk_tensor, pack_tensors
from ckptmap.streaming import run_ring as _run_ring

__all__ = ["COPY_DTYPES", "PLAIN_TENSORS", "copy_tensors"]

#: dtypes whose copies (casts included) cannot fail or warn: the only ones batched.
COPY_DTYPES = frozenset(
    {
        torch.float16,
        torch.bfloat16,
        torch.float32,
        torch.float64,
        torch.uint8,
        torch.int8,
        torch.int16,
        torch.int32,
        torch.int64,
        torch.bool,
    }
)
#: The tensor types batched (subclasses may override `copy_`).
PLAIN_TENSORS = (torch.Tensor, nn.Parameter)


def copy_tensors(
    dst: list[torch.Tensor],
    src: list[torch.Tensor],
    *,
    host_only: bool = False,
) -> None:
    """Copies `src[i]` into `dst[i]` for every i, as `copy_` in order would, in a few calls.

    Every pair must be one whose copy cannot fail or warn, as the loader's fast path admits
    them (`ckptmap.module_load._matcher`): plain strided tensors in CPU memory or on a CUDA
    device, `COPY_DTYPES` dtypes, equal shapes, a contiguous destination outside inference
    mode. Runs under `torch.no_grad()`; every copy is complete on return (see the module doc).

    Args:
        dst: the destinations.
        src: the sources, one per destination.
        host_only: the caller knows every tensor is in CPU memory (the common case: one
            `torch._foreach_copy_`, nothing else looked at). Ignored while an engine is
            installed with `ckptmap.engines.using_engine`: that engine says where each tensor
            is (tests run the device paths on CPU that way).
    """
    if len(dst) != len(src):
        raise ValueError(f"{len(dst)} destinations for {len(src)} sources")
    if not dst:
        return
    with torch.no_grad():
        if host_only and engine_override() is None:
            torch._foreach_copy_(dst, src)
            return
        _copy(dst, src, current_engine())


def _one_by_one(dst: Sequence[torch.Tensor], src: Sequence[torch.Tensor], which) -> None:
    for i in which:
        dst[i].copy_(src[i])


class _Pairs:
    """What the planning needs of every pair, read once: places, addresses, sizes."""

    def __init__(self, dst: list[torch.Tensor], src: list[torch.Tensor], engine: CopyEngine):
        self.dst = dst
        self.src = src
        self.pd = np.array(engine.places(dst), dtype=np.int64)
        self.ps = np.array(engine.places(src), dtype=np.int64)
        self.dptr = np.array([t.data_ptr() for t in dst], dtype=np.int64)
        self.sptr = np.array([t.data_ptr() for t in src], dtype=np.int64)
        # Destinations are contiguous (the precondition): their bytes are their span.
        self.dbytes = np.array([t.nbytes for t in dst], dtype=np.int64)
        self.sspan = np.array([_span(t) for t in src], dtype=np.int64)


def _copy(dst: list[torch.Tensor], src: list[torch.Tensor], engine: CopyEngine) -> None:
    pairs = _Pairs(dst, src, engine)
    pd, ps = pairs.pd, pairs.ps
    if not (pd != HOST).any() and not (ps != HOST).any():
        torch._foreach_copy_(dst, src)
        return
    devices = {int(p) for p in np.unique(np.concatenate([pd, ps])) if p >= 0}
    keep = _independent(pairs)
    if keep is None:
        _one_by_one(dst, src, range(len(dst)))
        engine.finish(devices)
        return
    kd, ks, empty = pd[keep], ps[keep], pairs.dbytes[keep] == 0
    host = keep[(kd == HOST) & (ks == HOST)]
    to_device = (kd >= 0) & ~empty
    uploads = to_device & (ks == HOST)
    on_device = to_device & (ks == kd)
    single = [int(i) for i in keep[~uploads & ~on_device & ~((kd == HOST) & (ks == HOST))]]
    try:
        if len(host):
            torch._foreach_copy_([dst[i] for i in host], [src[i] for i in host])
        for device in np.unique(kd[uploads]):
            which = keep[uploads & (kd == device)]
            pieces, rest = _upload_pieces(pairs, which, engine.slot_bytes)
            single += rest
            _run_ring(pieces, int(device), engine=engine)
        for device in np.unique(kd[on_device]):
            which = keep[on_device & (kd == device)]
            dsts = [dst[i] for i in which]
            srcs = [src[i] for i in which]
            engine.issue(int(device), _on_device(dsts, srcs, engine.slot_bytes))
        _one_by_one(dst, src, single)
    finally:
        engine.finish(devices)


def _upload_pieces(
    pairs: _Pairs, which: np.ndarray, slot_bytes: int
) -> tuple[list[Piece], list[int]]:
    """The ring's pieces for host-to-device pairs `which`, and the pairs left to `copy_`."""
    small = pairs.dbytes[which] < min(SMALL_BYTES, slot_bytes + 1)
    dst, src = pairs.dst, pairs.src
    pieces: list[Piece] = []
    packed = which[small]
    if len(packed):
        dsts = [dst[i] for i in packed]
        srcs = [src[i] for i in packed]
        sizes = pairs.dbytes[packed]
        kinds = list(zip([t.dtype for t in srcs], [t.dtype for t in dsts], strict=True))
        if len(set(kinds)) == 1:
            pieces += pack_tensors(dsts, srcs, sizes, slot_bytes)
        else:
            groups: dict[tuple[torch.dtype, torch.dtype], list[int]] = {}
            for k, kind in enumerate(kinds):
                groups.setdefault(kind, []).append(k)
            for members in groups.values():
                pieces += pack_tensors(
                    [dsts[k] for k in members],
                    [srcs[k] for k in members],
                    sizes[members],
                    slot_bytes,
                )
    rest: list[int] = []
    for i in which[~small]:
        d, s = dst[i], src[i]
        if s.is_contiguous() and not s.is_neg():
            pieces += chunk_tensor(d, s, slot_bytes)
        else:
            rest.append(int(i))
    return pieces, rest


def _on_device(
    dsts: list[torch.Tensor], srcs: list[torch.Tensor], slot_bytes: int
) -> Callable[[], None]:
    """Copies between tensors of one device: per dtype pair, a few launches each."""

    def work() -> None:
        groups: dict[tuple[torch.dtype, torch.dtype], list[int]] = {}
        for i, (d, s) in enumerate(zip(dsts, srcs, strict=True)):
            groups.setdefault((s.dtype, d.dtype), []).append(i)
        for (from_dtype, to_dtype), which in groups.items():
            ds = [dsts[i] for i in which]
            ss = [srcs[i] for i in which]
            if from_dtype == to_dtype:
                torch._foreach_copy_(ds, ss)
            else:
                _cast_on_device(ds, ss, to_dtype, slot_bytes)

    return work


def _cast_on_device(
    dsts: list[torch.Tensor], srcs: list[torch.Tensor], dtype: torch.dtype, slot_bytes: int
) -> None:
    """Device-to-device copies with a cast: the small ones flattened, cast by one `.to` (the
    kernel `copy_` uses, element by element) and scattered, a slot's worth at a time."""
    itemsize = max(dtype.itemsize, srcs[0].dtype.itemsize)
    run_d: list[torch.Tensor] = []
    run_s: list[torch.Tensor] = []
    nbytes = 0

    def flush() -> None:
        if run_d:
            flat = _flatten_dense_tensors(run_s).to(dtype)
            torch._foreach_copy_(run_d, _unflatten_dense_tensors(flat, run_d))
            run_d.clear()
            run_s.clear()

    for d, s in zip(dsts, srcs, strict=True):
        size = d.numel() * itemsize
        if size >= SMALL_BYTES or size > slot_bytes:
            d.copy_(s)  # pairs are independent: no need to keep their order
            continue
        if nbytes + size > slot_bytes:
            flush()
            nbytes = 0
        run_d.append(d)
        run_s.append(s)
        nbytes += size
    flush()


# --- order independence ---------------------------------------------------------------------


def _span(t: torch.Tensor) -> int:
    """Bytes from `t.data_ptr()` to past its last element."""
    if t.is_contiguous():
        return t.nbytes
    if not t.numel():
        return 0
    last = sum((n - 1) * s for n, s in zip(t.shape, t.stride(), strict=True))
    return (last + 1) * t.element_size()


def _same_view(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride()


def _independent(pairs: _Pairs) -> np.ndarray | None:
    """The pairs to copy when order cannot matter (their indices, in order); None when it might.

    A copy of a tensor onto itself is dropped (it changes nothing); so is a copy into a
    tensor that a later pair writes again, whole and as the same view (the later copy wins, as
    in order). Then the destinations must be disjoint from one another and from every source
    (memory compared per device), the dropped copies' sources included: torch would still
    read them, and refuse one that partly overlaps its own destination.
    """
    dst, src = pairs.dst, pairs.src
    pd, ps, dptr, sptr = pairs.pd, pairs.ps, pairs.dptr, pairs.sptr
    reads = np.ones(len(dst), dtype=bool)
    for i in np.flatnonzero((pd == ps) & (dptr == sptr)):
        if _same_view(dst[i], src[i]):
            reads[i] = False  # onto itself: changes nothing, and hides no earlier copy
    keep = reads.copy()
    # Destinations at the same address on the same device, in pair order: all but the last
    # are written again later.
    candidates = np.flatnonzero(reads)
    order = candidates[np.lexsort((candidates, dptr[candidates], pd[candidates]))]
    again = (pd[order][1:] == pd[order][:-1]) & (dptr[order][1:] == dptr[order][:-1])
    for k in np.flatnonzero(again):
        earlier, later = order[k], order[k + 1]
        if not _same_view(dst[earlier], dst[later]):
            return None  # two views of the same memory: order decides
        keep[earlier] = False
    kept = np.flatnonzero(keep)
    for p in np.unique(pd[kept]):
        d = kept[pd[kept] == p]
        s = np.flatnonzero(reads & (ps == p))
        if _overlap(dptr[d], dptr[d] + pairs.dbytes[d], sptr[s], sptr[s] + pairs.sspan[s]):
            return None
    return kept


def _overlap(d_start: np.ndarray, d_end: np.ndarray, s_start: np.ndarray, s_end: np.ndarray):
    """Whether any two destination intervals, or a source and a destination, intersect.

    Intervals are [start, end) in bytes; empty ones never intersect anything.
    """
    used = d_end > d_start
    d_start, d_end = d_start[used], d_end[used]
    order = np.argsort(d_start, kind="stable")
    d_start, d_end = d_start[order], d_end[order]
    if len(d_start) > 1 and bool((d_start[1:] < np.maximum.accumulate(d_end)[:-1]).any()):
        return True
    used = s_end > s_start
    s_start, s_end = s_start[used], s_end[used]
    if not len(s_start) or not len(d_start):
        return False
    # Destinations are now disjoint and sorted: the last one starting before a source ends
    # is the only one that can reach into it.
    k = np.searchsorted(d_start, s_end, side="left") - 1
    hit = k >= 0
    return bool((d_end[k[hit]] > s_start[hit]).any())
