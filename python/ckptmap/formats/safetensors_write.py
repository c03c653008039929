"""A streaming safetensors writer: the header, then each tensor's bytes straight to the file.

`safetensors.torch.save_file` builds the whole file in memory before writing it. Here the
header is computed from the tensors' dtypes and shapes alone, written first, and every tensor
is then written from its own memory (CPU tensors without a copy; tensors on other devices in
chunks), so saving needs no more memory than the largest non-contiguous tensor.

Layout, as the safetensors format defines it: 8 bytes little-endian header length, the JSON
header padded with spaces to a multiple of 8 bytes, then the tensor data. Tensors are laid out
by element size, largest first (insertion order otherwise), so every tensor starts at a
multiple of its element size from an 8-aligned data section: mmap loaders get aligned views.
Tensors that share memory (tied weights) are written once per name.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator, Mapping
from typing import IO, Any

import torch

from ckptmap._core import MAX_SAFETENSORS_HEADER_LEN
from ckptmap.errors import NotSerializableError

__all__ = [
    "MAX_HEADER_SIZE",
    "check_tensors",
    "safetensors_dtype",
    "tensor_nbytes",
    "write_safetensors",
]

#: The safetensors reference implementation refuses headers larger than this.
MAX_HEADER_SIZE = MAX_SAFETENSORS_HEADER_LEN

# Tensors not in CPU memory are copied over in pieces of this many bytes.
_DEVICE_CHUNK = 64 * 2**20


def _dtype_table() -> dict[torch.dtype, str]:
    names = {
        "float64": "F64",
        "float32": "F32",
        "float16": "F16",
        "bfloat16": "BF16",
        "int64": "I64",
        "int32": "I32",
        "int16": "I16",
        "int8": "I8",
        "uint8": "U8",
        "bool": "BOOL",
        "float8_e4m3fn": "F8_E4M3",
        "float8_e4m3fnuz": "F8_E4M3FNUZ",
        "float8_e5m2": "F8_E5M2",
        "float8_e5m2fnuz": "F8_E5M2FNUZ",
        "complex64": "C64",
        "uint64": "U64",
        "uint32": "U32",
        "uint16": "U16",
    }
    # Older torch builds lack some of these dtypes; they simply can't occur then.
    return {getattr(torch, n): code for n, code in names.items() if hasattr(torch, n)}


_DTYPES = _dtype_table()


def safetensors_dtype(dtype: torch.dtype) -> str:
    """The safetensors name of `dtype` (``torch.float32`` -> ``"F32"``).

    Only the dtypes `safetensors.torch` can load back are accepted.

    Raises:
        NotSerializableError: safetensors has no code for this dtype.
    """
    try:
        return _DTYPES[dtype]
    except KeyError:
        supported = ", ".join(sorted(str(d).removeprefix("torch.") for d in _DTYPES))
        raise NotSerializableError(
            f"a {dtype} tensor",
            "safetensors",
            f"safetensors has no code for {dtype} (it stores {supported})",
            "save to a .pth file instead, or convert the tensor first",
        ) from None


def tensor_nbytes(tensor: torch.Tensor) -> int:
    """Bytes the tensor's elements take once written contiguously."""
    return tensor.numel() * tensor.element_size()


def _check_tensor(name: str, value: Any) -> torch.Tensor:
    where = f"state_dict[{name!r}]"
    if not isinstance(name, str):
        raise NotSerializableError(
            f"key {name!r}", "safetensors", "tensor names must be str", "rename the key"
        )
    if name == "__metadata__":
        raise NotSerializableError(
            where,
            "safetensors",
            "the header keeps its metadata under that name",
            "rename the key, or save to a .pth file",
        )
    if not isinstance(value, torch.Tensor):
        raise NotSerializableError(
            where,
            "safetensors",
            f"it is a {type(value).__name__}, and safetensors files hold only tensors",
            "save to a .pth file, or move the value out of the state dict",
        )
    if value.layout != torch.strided or value.is_quantized or value.is_nested:
        raise NotSerializableError(
            where,
            "safetensors",
            f"it is a {value.layout} / quantized / nested tensor, and safetensors holds only "
            "dense ones",
            "save to a .pth file, or convert it with .to_dense() / .dequantize()",
        )
    if value.device.type == "meta":
        raise NotSerializableError(
            where, "safetensors", "it is on the meta device and has no data", "materialise it"
        )
    safetensors_dtype(value.dtype)
    return value


def check_tensors(tensors: Mapping[str, Any]) -> list[tuple[str, torch.Tensor]]:
    """The `(name, tensor)` pairs of `tensors`, once each is known to fit in safetensors.

    Raises:
        NotSerializableError: a key that is not a str, a value that is not a dense tensor with
            data, or a dtype safetensors has no code for.
    """
    return [(name, _check_tensor(name, value)) for name, value in tensors.items()]


def _build_header(
    entries: list[tuple[str, torch.Tensor]], metadata: Mapping[str, str] | None
) -> tuple[bytes, list[tuple[str, torch.Tensor]]]:
    # Largest element size first keeps every tensor aligned to its element size.
    ordered = sorted(entries, key=lambda item: -item[1].element_size())
    header: dict[str, Any] = {}
    if metadata:
        for key, value in metadata.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise NotSerializableError(
                    f"metadata[{key!r}]",
                    "safetensors metadata",
                    "safetensors metadata maps str to str",
                    "encode the value as a string (e.g. with json.dumps)",
                )
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name, tensor in ordered:
        end = offset + tensor_nbytes(tensor)
        header[name] = {
            "dtype": safetensors_dtype(tensor.dtype),
            "shape": list(tensor.shape),
            "data_offsets": [offset, end],
        }
        offset = end
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    if len(raw) > MAX_HEADER_SIZE:
        raise NotSerializableError(
            "the header",
            "safetensors",
            f"it would take {len(raw)} bytes, over the {MAX_HEADER_SIZE}-byte limit readers "
            "enforce",
            "shard the state dict (max_shard_size) or move metadata out of it",
        )
    return raw, ordered


def _chunks(tensor: torch.Tensor) -> Iterator[memoryview]:
    tensor = tensor.detach()
    if tensor.numel() == 0:
        return
    flat = tensor.resolve_conj().resolve_neg().contiguous().reshape(-1).view(torch.uint8)
    if flat.device.type == "cpu":
        yield memoryview(flat.numpy())  # type: ignore[arg-type]  # ndarray is a buffer
        return
    for start in range(0, flat.numel(), _DEVICE_CHUNK):
        yield memoryview(flat[start : start + _DEVICE_CHUNK].cpu().numpy())  # type: ignore[arg-type]


def write_safetensors(
    fileobj: IO[bytes],
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
) -> int:
    """Writes `tensors` to `fileobj` in the safetensors format, tensor by tensor.

    Everything is checked before the first byte is written, so a bad input leaves the file
    empty. `fileobj` only needs ``write``; it is not seeked.

    Args:
        fileobj: a binary file-like opened for writing.
        tensors: names to dense tensors of a dtype safetensors knows (any device).
        metadata: the header's ``__metadata__``, str to str.

    Returns:
        The number of bytes written.

    Raises:
        NotSerializableError: a non-tensor value, an unsupported dtype or layout, a metadata
            value that is not a str, or a header over `MAX_HEADER_SIZE`.
    """
    if sys.byteorder != "little":  # pragma: no cover - no big-endian CI
        raise NotImplementedError("writing safetensors on a big-endian machine")
    header, ordered = _build_header(check_tensors(tensors), metadata)
    fileobj.write(len(header).to_bytes(8, "little"))
    fileobj.write(header)
    written = 8 + len(header)
    for _, tensor in ordered:
        for chunk in _chunks(tensor):
            fileobj.write(chunk)
            written += chunk.nbytes
    return written
