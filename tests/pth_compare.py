"""Helpers for the torch zip reader tests: deep equality with torch.load's result, checkpoints
with every kind of tensor, and a writer of big-endian files."""

from __future__ import annotations

import collections
import math
import sys
import unittest.mock
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

# complex32 tensors make torch warn on creation, also inside torch.load.
COMPLEX_HALF_WARNING = "ignore:ComplexHalf support is experimental:UserWarning"

CLASSIC_DTYPES = [
    torch.float64,
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.complex64,
    torch.complex128,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.uint8,
    torch.bool,
]
NEW_DTYPES = [
    getattr(torch, name)
    for name in (
        "float8_e4m3fn",
        "float8_e5m2",
        "float8_e4m3fnuz",
        "float8_e5m2fnuz",
        "float8_e8m0fnu",
        "float4_e2m1fn_x2",
        "uint16",
        "uint32",
        "uint64",
        "complex32",
    )
    if hasattr(torch, name)
]
ALL_DTYPES = CLASSIC_DTYPES + NEW_DTYPES


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """A contiguous tensor of `dtype` with arbitrary bit patterns (NaNs included)."""
    numel = math.prod(shape)
    gen = np.random.default_rng(seed)
    if dtype is torch.bool:
        return torch.from_numpy(gen.integers(0, 2, numel, dtype=np.uint8)).bool().reshape(shape)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "ComplexHalf support is experimental", UserWarning)
        if numel == 0:
            return torch.empty(shape, dtype=dtype)
        raw = gen.integers(0, 256, numel * dtype.itemsize, dtype=np.uint8)
        return torch.from_numpy(raw).view(dtype).reshape(shape)


def storage_bytes(t: torch.Tensor) -> bytes:
    """Every byte of `t`'s storage (CPU)."""
    storage = t.untyped_storage()
    if storage.nbytes() == 0:
        return b""
    return bytes(torch.empty(0, dtype=torch.uint8).set_(storage).numpy())


class Comparison:
    """Deep equality of two loaded checkpoints, storage sharing included."""

    def __init__(self) -> None:
        self.ours_to_theirs: dict[int, int] = {}
        self.theirs_to_ours: dict[int, int] = {}
        self.memory: dict[int, int] = {}
        self.tensors = 0

    def same(self, ours: Any, theirs: Any, path: str = "<root>") -> None:
        assert type(ours) is type(theirs), f"{path}: {type(ours)} != {type(theirs)}"
        if isinstance(ours, torch.Tensor):
            self.same_tensor(ours, theirs, path)
        elif isinstance(ours, dict):
            assert list(ours) == list(theirs), f"{path}: keys differ"
            for (key, a), b in zip(ours.items(), theirs.values(), strict=True):
                self.same(a, b, f"{path}.{key}")
            if hasattr(ours, "__dict__"):
                assert list(vars(ours)) == list(vars(theirs)), f"{path}: attributes"
                for key in vars(ours):
                    self.same(vars(ours)[key], vars(theirs)[key], f"{path}@{key}")
        elif isinstance(ours, list | tuple):
            assert len(ours) == len(theirs), f"{path}: lengths differ"
            for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
                self.same(a, b, f"{path}.{i}")
        elif isinstance(ours, float):
            assert ours == theirs or (math.isnan(ours) and math.isnan(theirs)), path
        elif isinstance(ours, complex):
            assert repr(ours) == repr(theirs), path
        elif isinstance(ours, np.ndarray):
            assert ours.dtype == theirs.dtype and np.array_equal(ours, theirs, equal_nan=True)
        else:
            assert ours == theirs, f"{path}: {ours!r} != {theirs!r}"

    def same_tensor(self, a: torch.Tensor, b: torch.Tensor, path: str) -> None:
        self.tensors += 1
        assert a.dtype == b.dtype, f"{path}: dtype {a.dtype} != {b.dtype}"
        assert a.shape == b.shape, f"{path}: shape {a.shape} != {b.shape}"
        assert a.stride() == b.stride(), f"{path}: stride {a.stride()} != {b.stride()}"
        assert a.storage_offset() == b.storage_offset(), f"{path}: storage offset"
        assert a.requires_grad == b.requires_grad, f"{path}: requires_grad"
        assert a.device == b.device, f"{path}: device"
        assert a.is_contiguous() == b.is_contiguous(), f"{path}: contiguity"
        sa, sb = a.untyped_storage(), b.untyped_storage()
        assert sa.nbytes() == sb.nbytes(), f"{path}: storage sizes differ"
        if a.device.type == "cpu":
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", "ComplexHalf", UserWarning)
                assert storage_bytes(a) == storage_bytes(b), f"{path}: bytes differ"
        if sa.nbytes():
            # The same partition of tensors into storage objects on both sides (the storage
            # itself, `_cdata`: two storages over the same memory are not one storage).
            pa, pb = sa._cdata, sb._cdata
            assert self.ours_to_theirs.setdefault(pa, pb) == pb, f"{path}: sharing differs"
            assert self.theirs_to_ours.setdefault(pb, pa) == pa, f"{path}: sharing differs"
            memory = self.memory.setdefault(sa.data_ptr(), sb.data_ptr())
            assert memory == sb.data_ptr(), f"{path}: aliasing differs"


def assert_same(ours: Any, theirs: Any) -> int:
    """Asserts deep equality; returns how many tensors were compared."""
    c = Comparison()
    c.same(ours, theirs)
    return c.tensors


def walk_tensors(obj: Any, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """Tensors in dicts, lists and tuples, named as `ckptmap inspect` names them."""
    if isinstance(obj, torch.Tensor):
        yield prefix or "<top level>", obj
    elif isinstance(obj, collections.abc.Mapping):
        for key, value in obj.items():
            yield from walk_tensors(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(obj, list | tuple):
        for i, value in enumerate(obj):
            yield from walk_tensors(value, f"{prefix}.{i}" if prefix else str(i))


def byteswapped(t: torch.Tensor) -> torch.Tensor:
    """`t`'s storage with every element's bytes reversed, as a big-endian machine holds it
    (complex numbers per half, as torch swaps them), viewed as `t` is."""
    storage = t.untyped_storage()
    unit = t.element_size() // (2 if t.is_complex() else 1)
    raw = np.frombuffer(storage_bytes(t), dtype=np.uint8).copy()
    if unit > 1 and raw.size:
        raw = raw.reshape(-1, unit)[:, ::-1].copy().reshape(-1)
    swapped = torch.from_numpy(raw)
    out = torch.empty(0, dtype=t.dtype).set_(
        swapped.untyped_storage(), t.storage_offset(), t.shape, t.stride()
    )
    assert out.untyped_storage().nbytes() == storage.nbytes()
    return out


def save_big_endian(obj: Any, path: Path) -> None:
    """Writes `obj` as torch.save does on a big-endian machine: the real writer, with the
    ``byteorder`` record it takes from ``sys.byteorder`` saying "big" and every tensor's
    bytes in big-endian order (`obj` must already hold byte-swapped tensors)."""
    with unittest.mock.patch.object(sys, "byteorder", "big"):
        torch.save(obj, path)
