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


def _copy(dst: list[torch.Tensor], src: list[torch.Tensor], engine: CopyEngine) -> None:
    place = engine.place
    pd = [place(t) for t in dst]
    ps = [place(t) for t in src]
    if all(p == HOST for p in pd) and all(p == HOST for p in ps):
        torch._foreach_copy_(dst, src)
        return
    keep = _independent(dst, src, pd, ps)
    devices = {p for p in pd if p >= 0} | {p for p in ps if p >= 0}
    if keep is None:
        _one_by_one(dst, src, range(len(dst)))
        engine.finish(devices)
        return
    host: list[int] = []
    single: list[int] = []
    uploads: dict[int, list[int]] = {}
    on_device: dict[int, list[int]] = {}
    for i in keep:
        to, source = pd[i], ps[i]
        if to == HOST and source == HOST:
            host.append(i)
        elif to < 0 or not dst[i].numel():
            single.append(i)
        elif source == HOST:
            uploads.setdefault(to, []).append(i)
        elif source == to:
            on_device.setdefault(to, []).append(i)
        else:
            single.append(i)
    try:
        if host:
            torch._foreach_copy_([dst[i] for i in host], [src[i] for i in host])
        for device, which in uploads.items():
            pieces, rest = _upload_pieces(dst, src, which, engine.slot_bytes)
            single += rest
            _run_ring(pieces, device, engine=engine)
        for device, which in on_device.items():
            dsts = [dst[i] for i in which]
            srcs = [src[i] for i in which]
            engine.issue(device, _on_device(dsts, srcs, engine.slot_bytes))
        _one_by_one(dst, src, single)
    finally:
        engine.finish(devices)


def _upload_pieces(
    dst: list[torch.Tensor], src: list[torch.Tensor], which: list[int], slot_bytes: int
) -> tuple[list[Piece], list[int]]:
    """The ring's pieces for host-to-device pairs, and the pairs left to `copy_` alone."""
    groups: dict[tuple[torch.dtype, torch.dtype], tuple[list[torch.Tensor], list[torch.Tensor]]]
    groups = {}
    large: list[Piece] = []
    rest: list[int] = []
    for i in which:
        d, s = dst[i], src[i]
        if d.nbytes < SMALL_BYTES and d.nbytes <= slot_bytes:
            ds, ss = groups.setdefault((s.dtype, d.dtype), ([], []))
            ds.append(d)
            ss.append(s)
        elif s.is_contiguous() and not s.is_neg():
            large += chunk_tensor(d, s, slot_bytes)
        else:
            rest.append(i)
    pieces: list[Piece] = []
    for ds, ss in groups.values():
        pieces += pack_tensors(ds, ss, slot_bytes)
    return pieces + large, rest


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


def _independent(
    dst: list[torch.Tensor], src: list[torch.Tensor], pd: list[int], ps: list[int]
) -> list[int] | None:
    """The pairs to copy when order cannot matter; None when it might.

    A copy of a tensor onto itself is dropped (it changes nothing); so is a copy into a
    tensor that a later pair writes again, whole and as the same view (the later copy wins, as
    in order). Then the destinations must be disjoint from one another and from every source
    (memory compared per device), the dropped copies' sources included: torch would still
    read them, and refuse one that partly overlaps its own destination.
    """
    n = len(dst)
    dptr = [t.data_ptr() for t in dst]
    sptr = [t.data_ptr() for t in src]
    reads: list[int] = []
    keep: list[int] = []
    seen: dict[tuple[int, int], int] = {}
    for i in range(n - 1, -1, -1):  # from the end: the last copy into a tensor is kept
        if ps[i] == pd[i] and sptr[i] == dptr[i] and _same_view(dst[i], src[i]):
            continue  # onto itself: changes nothing, and hides no earlier copy
        reads.append(i)
        key = (pd[i], dptr[i])
        j = seen.get(key)
        if j is not None:
            if not _same_view(dst[i], dst[j]):
                return None  # two views of the same memory: order decides
            continue
        seen[key] = i
        keep.append(i)
    keep.reverse()
    for p in {pd[i] for i in keep}:
        d = [i for i in keep if pd[i] == p]
        s = [i for i in reads if ps[i] == p]
        d_start = np.array([dptr[i] for i in d], dtype=np.int64)
        d_end = d_start + np.array([_span(dst[i]) for i in d], dtype=np.int64)
        s_start = np.array([sptr[i] for i in s], dtype=np.int64)
        s_end = s_start + np.array([_span(src[i]) for i in s], dtype=np.int64)
        if _overlap(d_start, d_end, s_start, s_end):
            return None
    return keep


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
