"""Parse a safetensors file from bytes already in memory: the header's JSON and zero-copy tensor views.

The checkpoint loader reads the file once (one open, one read) and hashes, parses and loads from that
buffer; `safetensors.torch.load(bytes)` would copy every tensor out of it first (measured in
docs/benchmarks.md), and `safe_open` would read the file a second time. The format is small and
fixed: a little-endian u64 header length, that many bytes of JSON (`{name: {dtype, shape,
data_offsets}, "__metadata__": {str: str}}`), then the tensor bytes. Every inconsistency raises
ValueError naming it; nothing here runs code from the file.
"""

from __future__ import annotations

import json
import math
import struct
from typing import Any

import torch

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
MAX_HEADER = 100_000_000  # safetensors' own limit


def parse_header(buf: bytes | bytearray | memoryview) -> tuple[dict[str, Any], int]:
    """(header JSON object, offset of the tensor bytes); ValueError when it is not one."""
    if len(buf) < 8:
        raise ValueError(f"{len(buf)} bytes: no header length")
    (n,) = struct.unpack("<Q", bytes(buf[:8]))
    if n > MAX_HEADER or 8 + n > len(buf):
        raise ValueError(f"header length {n} does not fit in the file's {len(buf)} bytes")
    try:
        header = json.loads(bytes(buf[8 : 8 + n]))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"header is not valid JSON: {e}") from None
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    return header, 8 + n


def metadata(header: dict[str, Any]) -> dict[str, str]:
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise ValueError("__metadata__ is not a string-to-string map")
    return meta


def tensors(buf: bytearray, header: dict[str, Any], start: int) -> dict[str, torch.Tensor]:
    """Views into `buf` (no copy: they live as long as the buffer); checks every entry's dtype,
    shape and offsets, and that the entries tile the data section exactly, as safetensors does."""
    body = len(buf) - start
    spans: list[tuple[int, int]] = []
    out: dict[str, torch.Tensor] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = DTYPES[entry["dtype"]]
            shape = [int(s) for s in entry["shape"]]
            begin, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"tensor {name!r}: bad or unsupported header entry {entry!r}") from None
        size = math.prod(shape) * dtype.itemsize
        if min(shape, default=0) < 0 or not 0 <= begin <= end <= body or end - begin != size:
            raise ValueError(f"tensor {name!r}: offsets {begin}..{end} do not hold {shape} {dtype} "
                             f"in a data section of {body} bytes")
        spans.append((begin, end))
        if size == 0:
            out[name] = torch.empty(shape, dtype=dtype)
        else:
            flat = torch.frombuffer(buf, dtype=dtype, count=math.prod(shape), offset=start + begin)
            out[name] = flat.reshape(shape)
    position = 0
    for begin, end in sorted(spans):
        if begin != position:
            raise ValueError(f"tensor data overlaps or leaves a gap at byte {position}")
        position = end
    if position != body:
        raise ValueError(f"{body - position} bytes after the last tensor")
    return out
