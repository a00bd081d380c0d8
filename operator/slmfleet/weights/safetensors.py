"""The safetensors header, read without the tensors: exact parameter counts and dtypes.

A safetensors file starts with an 8-byte little-endian unsigned length N, then N bytes of JSON
(possibly padded with spaces): `{"<tensor>": {"dtype": "BF16", "shape": [4096, 4096],
"data_offsets": [begin, end]}, ..., "__metadata__": {...}}`, then the tensor data. The operator
reads the first 8 bytes and then the header with two ranged reads (`read_header`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

from slmfleet.weights.manifest import reject_duplicate_keys

MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit
METADATA_KEY = "__metadata__"

# Bits per element; sub-byte formats are packed (safetensors requires whole bytes per tensor).
DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E4M3": 8, "F8_E5M2": 8, "F8_E8M0": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32,
    "I64": 64, "U64": 64, "F64": 64, "C64": 64,
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}
DTYPE_SIZES = {k: v / 8 for k, v in DTYPE_BITS.items()}


class SafetensorsError(ValueError):
    """Not a safetensors header this reader can trust."""


def header_length(first8: bytes) -> int:
    """N, the length of the JSON header, from the file's first 8 bytes."""
    if len(first8) != 8:
        raise SafetensorsError(f"expected the file's first 8 bytes, got {len(first8)}")
    n = int.from_bytes(first8, "little", signed=False)
    if n < 2:
        raise SafetensorsError(f"header length {n} is too small for a JSON object")
    if n > MAX_HEADER_BYTES:
        raise SafetensorsError(f"header length {n} exceeds {MAX_HEADER_BYTES} bytes (not a safetensors file?)")
    return n


_no_duplicates = reject_duplicate_keys(lambda message: SafetensorsError(f"{message} in the header"))


def _nbytes(name: str, dtype: str, shape: list[int]) -> int:
    bits = DTYPE_BITS.get(dtype)
    if bits is None:
        raise SafetensorsError(f"tensor {name!r}: unknown dtype {dtype!r}")
    return (math.prod(shape) * bits + 7) // 8


def parse_header(data: bytes) -> dict[str, dict[str, Any]]:
    """The tensors of a header (the N bytes after the length; `__metadata__` skipped):
    {name: {"dtype": str, "shape": [int, ...], "data_offsets": [begin, end]}}. The shapes, offsets
    and dtypes are checked against each other."""
    if len(data) > MAX_HEADER_BYTES:
        raise SafetensorsError(f"header exceeds {MAX_HEADER_BYTES} bytes")
    try:
        obj = json.loads(bytes(data).decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SafetensorsError(f"header is not JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise SafetensorsError("header is not a JSON object")
    tensors: dict[str, dict[str, Any]] = {}
    for name, info in obj.items():
        if name == METADATA_KEY:
            continue
        if not isinstance(info, dict):
            raise SafetensorsError(f"tensor {name!r}: not an object")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dtype, str):
            raise SafetensorsError(f"tensor {name!r}: dtype {dtype!r} is not a string")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise SafetensorsError(f"tensor {name!r}: shape {shape!r} is not a list of non-negative integers")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
                or not 0 <= offsets[0] <= offsets[1]):
            raise SafetensorsError(f"tensor {name!r}: data_offsets {offsets!r} are not [begin, end] with begin <= end")
        expected = _nbytes(name, dtype, shape)
        if offsets[1] - offsets[0] != expected:
            raise SafetensorsError(f"tensor {name!r}: {dtype} {shape} needs {expected} bytes, "
                                   f"data_offsets span {offsets[1] - offsets[0]}")
        tensors[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}
    return tensors


def metadata(data: bytes) -> dict[str, str]:
    """The header's `__metadata__` (string to string), or {}."""
    obj = json.loads(bytes(data).decode("utf-8"))
    meta = obj.get(METADATA_KEY) if isinstance(obj, dict) else None
    return dict(meta) if isinstance(meta, dict) else {}


def tensor_bytes(header: dict[str, dict[str, Any]]) -> int:
    """Bytes of all tensors: the sum of prod(shape) × dtype size."""
    return sum(_nbytes(name, t["dtype"], t["shape"]) for name, t in header.items())


def parameter_count(header: dict[str, dict[str, Any]]) -> int:
    """Elements of all tensors (a packed sub-byte tensor counts its elements, not its bytes)."""
    return sum(math.prod(t["shape"]) for t in header.values())


def dtype_bytes(header: dict[str, dict[str, Any]]) -> dict[str, int]:
    """Bytes per dtype, e.g. {"BF16": 987_000_000, "F32": 4096}."""
    out: dict[str, int] = {}
    for name, t in header.items():
        out[t["dtype"]] = out.get(t["dtype"], 0) + _nbytes(name, t["dtype"], t["shape"])
    return out


def read_header(read: Callable[[int, int], bytes]) -> dict[str, dict[str, Any]]:
    """The tensors of a file, given `read(start, length) -> bytes` (a ranged GET, a pread):
    two reads, the 8-byte length and then the header."""
    n = header_length(read(0, 8))
    data = read(8, n)
    if len(data) != n:
        raise SafetensorsError(f"the file ends inside its header ({len(data)} of {n} bytes)")
    return parse_header(data)
