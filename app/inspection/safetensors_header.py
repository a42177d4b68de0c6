"""Validation of safetensors files from their header alone, in bounded time and memory (torch-free).

Written here rather than by calling the ``safetensors`` package so that nothing but the header is ever read:
an 8-byte little-endian length, then that many bytes of JSON naming each tensor's dtype, shape and byte range.
Hostile headers (a length past the end of the file, a huge header, overlapping or short ranges, unknown dtypes,
shapes whose byte count overflows) are refused with ``invalid_safetensors`` before any tensor byte is touched.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import IO, Any

from app.errors import InvalidUpload

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's own limit
MAX_TENSORS = 200_000
DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
    "U32": 4, "I32": 4, "F32": 4,
    "U64": 8, "I64": 8, "F64": 8,
}  # fmt: skip


def _bad(message: str, **details: Any) -> InvalidUpload:
    return InvalidUpload(f"invalid safetensors file: {message}", code="invalid_safetensors", details=details)


def looks_like_safetensors(head: bytes, size: int) -> bool:
    """An 8-byte length that fits the file, followed by the start of a JSON object."""
    if len(head) < 9 or size < 10:
        return False
    (n,) = struct.unpack("<Q", head[:8])
    return head[8:9] == b"{" and n >= 2


def read_safetensors_header(path: Path) -> dict[str, dict[str, Any]]:
    """The validated tensor table {name: {dtype, shape, data_offsets}} (``__metadata__`` dropped)."""
    with path.open("rb") as f:
        return parse_safetensors_header(f, path.stat().st_size)


def parse_safetensors_header(f: IO[bytes], size: int) -> dict[str, dict[str, Any]]:
    """As :func:`read_safetensors_header`, from a stream positioned at the start of a ``size``-byte file (an
    archive member); only the header is read."""
    raw_len = f.read(8)
    if len(raw_len) < 8:
        raise _bad("shorter than its 8-byte header length")
    (n,) = struct.unpack("<Q", raw_len)
    if n > MAX_HEADER_BYTES:
        raise _bad(f"header of {n} bytes is larger than the {MAX_HEADER_BYTES}-byte limit", header_bytes=n)
    if 8 + n > size:
        raise _bad(f"header length {n} runs past the end of the {size}-byte file", header_bytes=n)
    raw = f.read(n)
    if len(raw) != n:
        raise _bad(f"header length {n} runs past the end of the data")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise _bad("the header is not valid UTF-8 JSON") from exc
    if not isinstance(header, dict):
        raise _bad("the header is not a JSON object")
    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise _bad("__metadata__ must map strings to strings")
    if len(header) > MAX_TENSORS:
        raise _bad(f"more than {MAX_TENSORS} tensors")
    data_size = size - 8 - n
    spans: list[tuple[int, int, str]] = []
    for name, info in header.items():
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise _bad(f"tensor {name[:100]!r} needs exactly dtype, shape and data_offsets")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in DTYPE_BYTES:
            raise _bad(f"tensor {name[:100]!r} has unknown dtype {str(dtype)[:20]!r}")
        if not isinstance(shape, list) or len(shape) > 64:
            raise _bad(f"tensor {name[:100]!r} has an invalid shape")
        if not all(type(d) is int and d >= 0 for d in shape):
            raise _bad(f"tensor {name[:100]!r} has a negative or non-integer dimension")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
            raise _bad(f"tensor {name[:100]!r} has invalid data_offsets")
        begin, end = offsets
        nbytes = math.prod(shape) * DTYPE_BYTES[dtype]  # Python ints: no overflow, compared below
        if not 0 <= begin <= end <= data_size:
            raise _bad(f"tensor {name[:100]!r} lies outside the file's data", data_offsets=[begin, end])
        if end - begin != nbytes:
            raise _bad(f"tensor {name[:100]!r} needs {nbytes} bytes but its range holds {end - begin}")
        spans.append((begin, end, name))
    spans.sort()
    position = 0
    for begin, end, name in spans:
        if begin != position:
            what = "overlaps the previous one" if begin < position else "leaves a gap before it"
            raise _bad(f"tensor {name[:100]!r} {what}")
        position = end
    if position != data_size:
        raise _bad(f"the tensors cover {position} of the {data_size} data bytes")
    return header
