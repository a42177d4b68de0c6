"""Turn a ``.sqz`` file (Squeeze's storage encoding) back into an ONNX model.

    from squeeze.loader import load_onnx
    model = load_onnx("model.sqz")          # an onnx.ModelProto
    session = onnxruntime.InferenceSession(model.SerializeToString())

or ``squeeze.loader.decode("model.sqz", "model.onnx")``, or ``squeeze decode model.sqz -o model.onnx``.

The layout is documented in docs/SQUEEZE_FORMAT.md. This module needs numpy, zstandard and onnx only, and it is
the one decoder: the service's workers measure a ``.sqz`` result through it too. Files come from downloads, so
every offset, length, shape and count is checked against the file and against ``max_bytes`` before anything is
allocated, and every problem is a ``SqueezeFormatError`` that says what is wrong.
"""

from __future__ import annotations

import json
import math
import os
import struct
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import zstandard
from onnx import TensorProto

MAGIC = b"SQZ1"  # the container (preamble, header, payload); the header's version says what tensors may hold
FORMAT_VERSION = 2  # the newest header version this loader reads
# 1: quantized, sparse and dense tensors. 2: also codebook tensors (k-means weight sharing) and half tensors (a
# float32/float64 tensor stored as float16). The encoder writes 1 unless a tensor needs 2, so files without those
# stay readable by loaders that know only version 1.
READABLE_VERSIONS = (1, 2)
CODEBOOK_VERSION = 2
PREAMBLE = struct.Struct("<4sII")  # magic, header length as stored (zstd), header length as JSON
MAX_HEADER_BYTES = 64 << 20
DEFAULT_MAX_BYTES = 2**31 - 2**20  # a decoded model must fit one protobuf message (2 GiB)
MAX_RANK = 64
MAX_NAME = 4096
ZSTD_MAX_WINDOW = 1 << 27  # zstd's own default limit; the encoder never needs more

# Element types a tensor stream may hold: name -> (ONNX data type, numpy dtype of one element, little-endian).
# bfloat16 has no numpy dtype; its elements travel as their 16-bit patterns.
DTYPES: dict[str, tuple[int, str]] = {
    "float32": (TensorProto.FLOAT, "<f4"),
    "float16": (TensorProto.FLOAT16, "<f2"),
    "float64": (TensorProto.DOUBLE, "<f8"),
    "bfloat16": (TensorProto.BFLOAT16, "<u2"),
    "int8": (TensorProto.INT8, "i1"),
    "uint8": (TensorProto.UINT8, "u1"),
    "int16": (TensorProto.INT16, "<i2"),
    "uint16": (TensorProto.UINT16, "<u2"),
    "int32": (TensorProto.INT32, "<i4"),
    "uint32": (TensorProto.UINT32, "<u4"),
    "int64": (TensorProto.INT64, "<i8"),
    "uint64": (TensorProto.UINT64, "<u8"),
    "bool": (TensorProto.BOOL, "u1"),
}
QUANTIZABLE = ("float32", "float16", "float64")
SCALE_DTYPES = {"float16": "<f2", "float32": "<f4"}
ENCODINGS = ("quantized", "codebook", "sparse", "dense", "half")
VERSION_2_ENCODINGS = ("codebook", "half")
HALF_SOURCES = ("float32", "float64")  # the tensor types a half tensor may stand for
POSITIONS = ("bitmask", "gaps")
CODECS = ("zstd", "none")


class SqueezeFormatError(ValueError):
    """The file is not a valid ``.sqz`` file (or decodes to more than allowed); the message says why."""


@dataclass(frozen=True)
class Stream:
    """Bytes ``[offset, offset + length)`` of the payload; ``raw_length`` bytes once ``codec`` is undone."""

    offset: int
    length: int
    raw_length: int
    codec: str


@dataclass(frozen=True)
class TensorEntry:
    """One initializer as the header describes it."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    encoding: str  # "quantized" | "codebook" | "sparse" | "dense" | "half"
    streams: dict[str, Stream]
    nonzeros: int = 0  # quantized / codebook / sparse: elements stored in "values"
    positions: str = ""  # quantized / codebook / sparse: "bitmask" | "gaps"
    value_bits: int = 0  # quantized / codebook
    axis: int = 0  # quantized: the axis that has one scale per index
    scale_dtype: str = ""  # quantized
    codebook_dtype: str = ""  # codebook: element type of its 2**value_bits shared values
    fill: int = 0  # sparse: bit pattern of the elements not stored

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def itemsize(self) -> int:
        return np.dtype(DTYPES[self.dtype][1]).itemsize

    @property
    def stored_bytes(self) -> int:
        return sum(s.length for s in self.streams.values())


@dataclass(frozen=True)
class Header:
    graph: Stream
    tensors: list[TensorEntry]
    payload_bytes: int
    payload_crc32: int
    producer: str
    version: int = FORMAT_VERSION


# ----------------------------------------------------------------------------------------------------------
# Public entry points


def load_onnx(source: str | os.PathLike[str] | bytes, *, max_bytes: int = DEFAULT_MAX_BYTES) -> onnx.ModelProto:
    """The ONNX model stored in a ``.sqz`` file (a path, or the file's bytes)."""
    data = source if isinstance(source, bytes) else _read_file(Path(source), max_bytes)
    header, payload = split(data, max_bytes=max_bytes)
    return _decode(header, payload, max_bytes)


def decode(
    path: str | os.PathLike[str], out_path: str | os.PathLike[str], *, max_bytes: int = DEFAULT_MAX_BYTES
) -> Path:
    """Decode ``path`` into a self-contained ONNX file at ``out_path`` (written atomically); returns it."""
    model = load_onnx(path, max_bytes=max_bytes)
    out = Path(out_path)
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        tmp.write_bytes(model.SerializeToString())
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def read_header(source: str | os.PathLike[str] | bytes, *, max_bytes: int = DEFAULT_MAX_BYTES) -> Header:
    """The validated header: what each tensor is and how many bytes each stream takes."""
    data = source if isinstance(source, bytes) else _read_file(Path(source), max_bytes)
    return split(data, max_bytes=max_bytes)[0]


def reconstruct(symbols: np.ndarray, scales: np.ndarray, value_bits: int) -> np.ndarray:
    """Values of quantized symbols: ``(symbol - 2**(value_bits-1) + 0.5) * scale`` (float64; never zero)."""
    half = 1 << (value_bits - 1)
    return (symbols.astype(np.float64) - half + 0.5) * scales.astype(np.float64)


# ----------------------------------------------------------------------------------------------------------
# The container


def split(data: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES) -> tuple[Header, memoryview]:
    """Check the preamble, the header and the payload checksum; returns the header and the payload."""
    if len(data) < PREAMBLE.size:
        raise SqueezeFormatError(
            f"not a .sqz file: {len(data)} bytes is shorter than the {PREAMBLE.size}-byte preamble"
        )
    magic, stored_len, json_len = PREAMBLE.unpack_from(data)
    if magic != MAGIC:
        if magic[:3] == MAGIC[:3]:
            raise SqueezeFormatError(f"unsupported .sqz version {magic!r}; this loader reads {MAGIC!r}")
        raise SqueezeFormatError("not a .sqz file (no SQZ1 magic)")
    if json_len > MAX_HEADER_BYTES:
        raise SqueezeFormatError(f"header claims {json_len} bytes; the limit is {MAX_HEADER_BYTES}")
    if PREAMBLE.size + stored_len > len(data):
        raise SqueezeFormatError(
            f"truncated file: the header needs {stored_len} bytes, {len(data) - PREAMBLE.size} are left"
        )
    view = memoryview(data)
    header_bytes = _inflate(view[PREAMBLE.size : PREAMBLE.size + stored_len], json_len, "zstd", "header")
    try:
        raw = json.loads(header_bytes)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SqueezeFormatError(f"the header is not valid JSON: {exc}") from None
    header = _parse_header(raw, max_bytes)
    payload = view[PREAMBLE.size + stored_len :]
    if len(payload) != header.payload_bytes:
        raise SqueezeFormatError(
            f"truncated or padded file: the payload is {len(payload)} bytes, the header says {header.payload_bytes}"
        )
    if zlib.crc32(payload) != header.payload_crc32:
        raise SqueezeFormatError("the payload is corrupt (CRC-32 mismatch)")
    return header, payload


def _read_file(path: Path, max_bytes: int) -> bytes:
    size = path.stat().st_size
    if size > max_bytes + MAX_HEADER_BYTES:
        raise SqueezeFormatError(f"{path.name}: {size} bytes is more than a .sqz file within the limit can be")
    return path.read_bytes()


def _inflate(chunk: memoryview, raw_length: int, codec: str, what: str) -> bytes:
    """A stream's raw bytes; never allocates more than ``raw_length`` (checked against limits by the caller)."""
    if codec == "none":
        if len(chunk) != raw_length:
            raise SqueezeFormatError(f"{what}: stored length {len(chunk)} differs from raw length {raw_length}")
        return bytes(chunk)
    try:
        declared = zstandard.frame_content_size(chunk)
    except zstandard.ZstdError:
        raise SqueezeFormatError(f"{what}: not a zstd frame") from None
    # A frame that states its size is decompressed into a buffer of that size, so it must be the expected one.
    if declared != raw_length:
        raise SqueezeFormatError(f"{what}: the zstd frame holds {declared} bytes, the header says {raw_length}")
    try:
        out = zstandard.ZstdDecompressor(max_window_size=ZSTD_MAX_WINDOW).decompress(
            chunk, max_output_size=raw_length, allow_extra_data=False
        )
    except zstandard.ZstdError as exc:
        raise SqueezeFormatError(f"{what}: corrupt zstd data ({exc})") from None
    if len(out) != raw_length:
        raise SqueezeFormatError(f"{what}: decompressed to {len(out)} bytes, the header says {raw_length}")
    return out


# ----------------------------------------------------------------------------------------------------------
# Header validation: nothing in it is trusted


def _parse_header(raw: Any, max_bytes: int) -> Header:
    obj = _dict(raw, "header")
    version = obj.get("version")
    if obj.get("format") != "squeeze" or type(version) is not int or version not in READABLE_VERSIONS:
        raise SqueezeFormatError(
            f"header: format {obj.get('format')!r} version {version!r}; "
            f"this loader reads squeeze versions {', '.join(map(str, READABLE_VERSIONS))}"[:300]
        )
    payload_bytes = _int(obj, "payload_bytes", "header", 2**63)
    crc = _int(obj, "payload_crc32", "header", 2**32 - 1)
    producer = obj.get("producer", "")
    if not isinstance(producer, str) or len(producer) > MAX_NAME:
        raise SqueezeFormatError("header: producer must be a short string")
    graph = _stream(obj.get("graph"), "graph", payload_bytes)
    if graph.raw_length > max_bytes:
        raise SqueezeFormatError(f"graph: {graph.raw_length} bytes exceeds the limit of {max_bytes}")
    entries = obj.get("tensors")
    if not isinstance(entries, list):
        raise SqueezeFormatError("header: tensors must be a list")
    tensors: list[TensorEntry] = []
    names: set[str] = set()
    total = graph.raw_length
    for i, entry in enumerate(entries):
        tensor = _tensor_entry(entry, f"tensors[{i}]", payload_bytes, max_bytes)
        if tensor.encoding in VERSION_2_ENCODINGS and version < CODEBOOK_VERSION:
            raise SqueezeFormatError(
                f"tensor {tensor.name!r}: {tensor.encoding} tensors need format version {CODEBOOK_VERSION}, the header "
                f"says {version}"
            )
        if tensor.name in names:
            raise SqueezeFormatError(f"tensors[{i}]: duplicate name {tensor.name!r}")
        names.add(tensor.name)
        total += tensor.size * tensor.itemsize
        if total > max_bytes:
            raise SqueezeFormatError(f"the decoded model would exceed the limit of {max_bytes} bytes")
        tensors.append(tensor)
    return Header(graph, tensors, payload_bytes, crc, producer, version)


def _tensor_entry(raw: Any, where: str, payload_bytes: int, max_bytes: int) -> TensorEntry:
    obj = _dict(raw, where)
    name = obj.get("name")
    if not isinstance(name, str) or not name or len(name) > MAX_NAME:
        raise SqueezeFormatError(f"{where}: name must be a non-empty string of at most {MAX_NAME} characters")
    where = f"tensor {name!r}"
    dtype = _choice(obj, "dtype", DTYPES, where)
    shape_raw = obj.get("shape")
    if not isinstance(shape_raw, list) or len(shape_raw) > MAX_RANK:
        raise SqueezeFormatError(f"{where}: shape must be a list of at most {MAX_RANK} dimensions")
    shape = tuple(_int({"dim": d}, "dim", where, max_bytes) for d in shape_raw)
    n = math.prod(shape)
    itemsize = np.dtype(DTYPES[dtype][1]).itemsize
    if n * itemsize > max_bytes:
        raise SqueezeFormatError(f"{where}: shape {list(shape)} is {n * itemsize} bytes, over the limit {max_bytes}")
    encoding = _choice(obj, "encoding", ENCODINGS, where)
    streams_raw = _dict(obj.get("streams"), f"{where}: streams")
    expected: dict[str, tuple[int, int]]  # stream -> (least, most) raw length
    fields: dict[str, Any] = {}
    if encoding == "dense":
        expected = {"data": (n * itemsize, n * itemsize)}
    elif encoding == "half":
        if dtype not in HALF_SOURCES:
            raise SqueezeFormatError(f"{where}: only float32/float64 tensors can be stored as half")
        expected = {"data": (n * 2, n * 2)}
    else:
        nonzeros = _int(obj, "nonzeros", where, n)
        positions = _choice(obj, "positions", POSITIONS, where)
        fields.update(nonzeros=nonzeros, positions=positions)
        # gaps: one terminating byte per stored element, plus one 255 byte per 255 skipped elements
        span = (-(-n // 8), -(-n // 8)) if positions == "bitmask" else (nonzeros, nonzeros + (n - nonzeros) // 255)
        if encoding in ("quantized", "codebook"):
            if dtype not in QUANTIZABLE:
                raise SqueezeFormatError(f"{where}: {dtype} tensors cannot be quantized")
            bits = _int(obj, "value_bits", where, 8)
            if bits < 2:
                raise SqueezeFormatError(f"{where}: value_bits must be 2..8")
        if encoding == "codebook":
            book_dtype = _choice(obj, "codebook_dtype", SCALE_DTYPES, where)
            book = (1 << bits) * np.dtype(SCALE_DTYPES[book_dtype]).itemsize
            fields.update(value_bits=bits, codebook_dtype=book_dtype)
            expected = {"positions": span, "values": (nonzeros, nonzeros), "codebook": (book, book)}
        elif encoding == "quantized":
            if not shape:
                raise SqueezeFormatError(f"{where}: a quantized tensor needs at least one dimension")
            axis = _int(obj, "axis", where, len(shape) - 1)
            scale_dtype = _choice(obj, "scale_dtype", SCALE_DTYPES, where)
            channels = shape[axis] * np.dtype(SCALE_DTYPES[scale_dtype]).itemsize
            fields.update(value_bits=bits, axis=axis, scale_dtype=scale_dtype)
            expected = {"positions": span, "values": (nonzeros, nonzeros), "scales": (channels, channels)}
        else:
            fields["fill"] = _int(obj, "fill", where, 2 ** (8 * itemsize) - 1)
            values = nonzeros * itemsize
            expected = {"positions": span, "values": (values, values)}
    if set(streams_raw) != set(expected):
        raise SqueezeFormatError(f"{where}: a {encoding} tensor has streams {sorted(expected)}")
    streams = {}
    for key, (least, most) in expected.items():
        stream = _stream(streams_raw[key], f"{where}: {key}", payload_bytes)
        if not least <= stream.raw_length <= most:
            raise SqueezeFormatError(
                f"{where}: {key} stream is {stream.raw_length} bytes; its shape and counts allow {least}..{most}"
            )
        streams[key] = stream
    return TensorEntry(name=name, dtype=dtype, shape=shape, encoding=encoding, streams=streams, **fields)


def _stream(raw: Any, where: str, payload_bytes: int) -> Stream:
    obj = _dict(raw, where)
    offset = _int(obj, "offset", where, payload_bytes)
    length = _int(obj, "length", where, payload_bytes - offset)
    raw_length = _int(obj, "raw_length", where, 2**63)
    codec = _choice(obj, "codec", CODECS, where)
    return Stream(offset, length, raw_length, codec)


def _dict(raw: Any, where: str) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise SqueezeFormatError(f"{where}: expected a JSON object")
    return raw


def _int(obj: dict[str, Any], key: str, where: str, most: int) -> int:
    value = obj.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= most:
        raise SqueezeFormatError(f"{where}: {key} must be an integer in 0..{most}, not {value!r}"[:300])
    return value


def _choice(obj: dict[str, Any], key: str, allowed: Any, where: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or value not in allowed:
        raise SqueezeFormatError(f"{where}: {key} must be one of {', '.join(allowed)}, not {value!r}"[:300])
    return value


# ----------------------------------------------------------------------------------------------------------
# Decoding


def _decode(header: Header, payload: memoryview, max_bytes: int) -> onnx.ModelProto:
    model = onnx.ModelProto()
    try:
        model.ParseFromString(_read(payload, header.graph, "graph"))
    except Exception as exc:  # protobuf's DecodeError and friends
        raise SqueezeFormatError(f"graph: not an ONNX model ({type(exc).__name__})") from None
    if any(t.data_location == TensorProto.EXTERNAL for t in _all_tensors(model.graph)):
        raise SqueezeFormatError("graph: refers to external data; a decoded model must be self-contained")
    placeholders: dict[str, TensorProto] = {}
    for t in model.graph.initializer:
        if t.name in placeholders:
            raise SqueezeFormatError(f"graph: two initializers are named {t.name!r}")
        placeholders[t.name] = t
    for tensor in header.tensors:
        target = placeholders.get(tensor.name)
        if target is None:
            raise SqueezeFormatError(f"tensor {tensor.name!r} has no placeholder initializer in the graph")
        _check_placeholder(target, tensor)
        target.raw_data = _tensor_bytes(tensor, payload)
    if model.ByteSize() > max_bytes:
        raise SqueezeFormatError(f"the decoded model is {model.ByteSize()} bytes, over the limit of {max_bytes}")
    return model


def _check_placeholder(target: TensorProto, tensor: TensorEntry) -> None:
    if target.data_type != DTYPES[tensor.dtype][0] or tuple(target.dims) != tensor.shape:
        raise SqueezeFormatError(
            f"tensor {tensor.name!r}: the graph declares data type {target.data_type} and shape "
            f"{list(target.dims)}, the header {tensor.dtype} {list(tensor.shape)}"
        )
    rest = TensorProto()
    rest.CopyFrom(target)
    for field in ("name", "dims", "data_type", "doc_string", "metadata_props", "segment", "data_location"):
        rest.ClearField(field)
    if rest.ByteSize():
        raise SqueezeFormatError(f"tensor {tensor.name!r}: its placeholder in the graph already holds data")


def _read(payload: memoryview, stream: Stream, what: str) -> bytes:
    return _inflate(payload[stream.offset : stream.offset + stream.length], stream.raw_length, stream.codec, what)


def _tensor_bytes(tensor: TensorEntry, payload: memoryview) -> bytes:
    """The tensor's elements as ONNX ``raw_data`` (little-endian)."""
    what = f"tensor {tensor.name!r}"
    if tensor.encoding == "dense":
        return _read(payload, tensor.streams["data"], f"{what}: data")
    if tensor.encoding == "half":
        half = np.frombuffer(_read(payload, tensor.streams["data"], f"{what}: data"), dtype="<f2")
        if not np.all(np.isfinite(half)):
            raise SqueezeFormatError(f"{what}: a half value is not finite")
        return half.astype(DTYPES[tensor.dtype][1]).tobytes()
    n = tensor.size
    positions = _positions(tensor, _read(payload, tensor.streams["positions"], f"{what}: positions"))
    values = _read(payload, tensor.streams["values"], f"{what}: values")
    if tensor.encoding == "sparse":
        pattern = np.dtype(f"<u{tensor.itemsize}")
        out = np.full(n, tensor.fill, dtype=pattern)
        out[positions] = np.frombuffer(values, dtype=pattern)
        return out.tobytes()
    symbols = np.frombuffer(values, dtype=np.uint8)
    if symbols.size and int(symbols.max()) >= 1 << tensor.value_bits:
        raise SqueezeFormatError(f"{what}: a value symbol does not fit in {tensor.value_bits} bits")
    out = np.zeros(n, dtype=DTYPES[tensor.dtype][1])
    if tensor.encoding == "codebook":
        book = np.frombuffer(
            _read(payload, tensor.streams["codebook"], f"{what}: codebook"), dtype=SCALE_DTYPES[tensor.codebook_dtype]
        )
        if not np.all(np.isfinite(book)) or not np.all(book != 0):
            raise SqueezeFormatError(f"{what}: a codebook value is zero or not finite")
        out[positions] = book[symbols]
        return out.tobytes()
    scales = np.frombuffer(
        _read(payload, tensor.streams["scales"], f"{what}: scales"), dtype=SCALE_DTYPES[tensor.scale_dtype]
    )
    if not np.all(np.isfinite(scales)):
        raise SqueezeFormatError(f"{what}: a scale is not finite")
    inner = math.prod(tensor.shape[tensor.axis + 1 :])
    channel = (positions // inner) % tensor.shape[tensor.axis] if n else positions
    out[positions] = reconstruct(symbols, scales[channel], tensor.value_bits)
    return out.tobytes()


def _positions(tensor: TensorEntry, raw: bytes) -> np.ndarray:
    """Flat indices (C order) of the stored elements, strictly increasing, as many as the header says."""
    what = f"tensor {tensor.name!r}: positions"
    n, count = tensor.size, tensor.nonzeros
    data = np.frombuffer(raw, dtype=np.uint8)
    if tensor.positions == "bitmask":
        spare = 8 * len(data) - n
        if spare and int(data[-1]) & ((1 << spare) - 1):
            raise SqueezeFormatError(f"{what}: bits set past the end of the tensor")
        positions = np.flatnonzero(np.unpackbits(data, count=n))
        if len(positions) != count:
            raise SqueezeFormatError(f"{what}: the bitmask marks {len(positions)} elements, the header says {count}")
        return positions
    ends = data != 255
    if len(data) and not ends[-1]:
        raise SqueezeFormatError(f"{what}: the gap stream ends inside a gap")
    if int(ends.sum()) != count:
        raise SqueezeFormatError(f"{what}: {int(ends.sum())} gaps, the header says {count} elements")
    positions = np.cumsum(data, dtype=np.int64)[ends] + np.arange(count, dtype=np.int64)
    if count and positions[-1] >= n:
        raise SqueezeFormatError(f"{what}: a position lies past the end of the tensor ({n} elements)")
    return positions


def _all_tensors(graph: onnx.GraphProto) -> list[TensorProto]:
    found = list(graph.initializer)
    for sparse in graph.sparse_initializer:
        found += [sparse.values, sparse.indices]
    for node in graph.node:
        for attr in node.attribute:
            found += [attr.t] if attr.HasField("t") else []
            found += list(attr.tensors)
            for g in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                found += _all_tensors(g)
    return found
