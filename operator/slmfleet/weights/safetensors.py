"""The safetensors header, read without the tensors: exact parameter counts and dtypes.

A safetensors file starts with an 8-byte little-endian unsigned length N, then N bytes of JSON
(possibly padded with spaces): `{"<tensor>": {"dtype": "BF16", "shape": [4096, 4096],
"data_offsets": [begin, end]}, ..., "__metadata__": {...}}`, then the tensor data. The operator
reads the first 8 bytes and then the header with two ranged reads (`read_header`).

Limits. The safetensors library accepts headers up to 100 MB; a header that size took about 45 s
and 1.8 GiB to parse here. Real headers are far smaller: an entry is about 100-150 bytes, a shard
of a dense 70B model holds a few hundred tensors (tens of KB), and the shards of large MoE
models (thousands of expert tensors) have headers of a few hundred KB. So:

- `MAX_HEADER_BYTES` = 16 MiB, some 50 times the largest real shard header. A length prefix over
  it is refused after the first 8 bytes, before the header is requested or any buffer allocated.
- `MAX_TENSORS` = 100,000 tensors in one header (about what 16 MiB of ordinary entries hold),
  shapes of at most `MAX_DIMS` dimensions, at most `MAX_METADATA_ENTRIES` metadata entries.
- Before the JSON is parsed, its objects, arrays and members are counted on the bytes (see
  `manifest.json_within`), so a header that would expand into millions of Python objects (empty
  lists, long shapes, a huge `__metadata__`) is refused without building them. A header at both
  limits parses in about a second and some 100 MB; the tensors' objects are kept as parsed, not
  copied.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

from slmfleet.weights.manifest import json_within, reject_duplicate_keys

MAX_HEADER_BYTES = 16 * 1024 * 1024
MAX_TENSORS = 100_000
MAX_METADATA_ENTRIES = 10_000  # `__metadata__` is a string-to-string map: a format name, a few notes
MAX_DIMS = 8  # of a tensor's shape; models use at most 5 or so
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
        raise SafetensorsError(f"tensor {name[:100]!r}: unknown dtype {_short(dtype)}")
    return (math.prod(shape) * bits + 7) // 8


def parse_header(data: bytes) -> dict[str, dict[str, Any]]:
    """The tensors of a header (the N bytes after the length; `__metadata__` skipped):
    {name: {"dtype": str, "shape": [int, ...], "data_offsets": [begin, end]}}. The shapes, offsets
    and dtypes are checked against each other."""
    if len(data) > MAX_HEADER_BYTES:
        raise SafetensorsError(f"header exceeds {MAX_HEADER_BYTES} bytes")
    data = bytes(data)
    # Counted before parsing: per tensor one object, two arrays and at most 6 + MAX_DIMS members
    # and elements; the metadata one object and two per entry.
    if not json_within(data, objects=MAX_TENSORS + 2, arrays=2 * MAX_TENSORS,
                       items=(6 + MAX_DIMS) * MAX_TENSORS + 2 * MAX_METADATA_ENTRIES + 2):
        raise SafetensorsError(f"header has more than {MAX_TENSORS} tensors, or more JSON than that many "
                               "tensors need (not a safetensors file?)")
    try:
        obj = json.loads(data.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except SafetensorsError:  # a duplicate key
        raise
    except (ValueError, RecursionError) as exc:  # not UTF-8, not JSON, too deep, an int of 5,000 digits
        raise SafetensorsError(f"header is not JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise SafetensorsError("header is not a JSON object")
    if len(obj) - (METADATA_KEY in obj) > MAX_TENSORS:
        raise SafetensorsError(f"header has more than {MAX_TENSORS} tensors")
    meta = obj.get(METADATA_KEY)
    if isinstance(meta, dict) and len(meta) > MAX_METADATA_ENTRIES:
        raise SafetensorsError(f"header metadata has more than {MAX_METADATA_ENTRIES} entries")
    tensors: dict[str, dict[str, Any]] = {}
    for name, info in obj.items():
        if name == METADATA_KEY:
            continue
        shown = name[:100]
        if not isinstance(info, dict):
            raise SafetensorsError(f"tensor {shown!r}: not an object")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dtype, str):
            raise SafetensorsError(f"tensor {shown!r}: dtype {_short(dtype)} is not a string")
        if (not isinstance(shape, list) or len(shape) > MAX_DIMS
                or not all(type(d) is int and d >= 0 for d in shape)):
            raise SafetensorsError(f"tensor {shown!r}: shape {_short(shape)} is not a list of at most "
                                   f"{MAX_DIMS} non-negative integers")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
                or not 0 <= offsets[0] <= offsets[1]):
            raise SafetensorsError(f"tensor {shown!r}: data_offsets {_short(offsets)} are not [begin, end] "
                                   "with begin <= end")
        expected = _nbytes(shown, dtype, shape)
        if offsets[1] - offsets[0] != expected:
            raise SafetensorsError(f"tensor {shown!r}: {_short(dtype)} {shape} needs {expected} bytes, "
                                   f"data_offsets span {offsets[1] - offsets[0]}")
        # The parsed object itself, not a copy (a header may hold 100,000 of them).
        tensors[name] = info if len(info) == 3 else {"dtype": dtype, "shape": shape, "data_offsets": offsets}
    return tensors


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 100 else text[:100] + "..."


def metadata(data: bytes) -> dict[str, str]:
    """The header's `__metadata__` (string to string), or {}; SafetensorsError past the limits."""
    if len(data) > MAX_HEADER_BYTES or not json_within(
            bytes(data), objects=MAX_TENSORS + 2, arrays=2 * MAX_TENSORS,
            items=(6 + MAX_DIMS) * MAX_TENSORS + 2 * MAX_METADATA_ENTRIES + 2):
        raise SafetensorsError(f"header exceeds the limits ({MAX_HEADER_BYTES} bytes, {MAX_TENSORS} tensors)")
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
