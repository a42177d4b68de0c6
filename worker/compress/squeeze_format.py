"""The ``encode/squeeze`` step and the ``squeeze`` format: Deep Compression's storage stage for ONNX models.

Each weight of a Conv, Gemm or MatMul (the tensors pruning acts on) is stored as the positions of its non-zeros
(a bitmask, or the gaps between them, whichever is smaller) plus each non-zero value as a ``value_bits`` symbol:
quantized uniformly per output channel (one fp16 scale per channel), or, with ``value_coding="kmeans"``, an index
into a per-tensor codebook of ``2**value_bits`` shared values (Deep Compression's weight sharing); every other
initializer is stored losslessly
(also sparsely when that is smaller), and the graph as the ModelProto with empty placeholders for those
initializers. Each stream is zstd-compressed unless that makes it larger. The layout is in docs/SQUEEZE_FORMAT.md.

Decoding lives in ``squeeze.loader`` (the client package), the one implementation users and this backend share:
the step measures its quantization error on what the loader decodes.

Entropy coder: zstd (its literals are Huffman-coded). An ANS coder (``constriction``) was measured on the 90%-pruned
digits CNN: once each tensor's symbol histogram is stored it was no smaller (8-bit values 3895 vs 3602 bytes,
4-bit 1656 vs 1668), so it is not a dependency.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import weakref
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import zstandard
from onnx import TensorProto, numpy_helper

from app.jobs.spec import EncodeSqueeze, PruneMagnitude
from squeeze.loader import (
    CODEBOOK_VERSION,
    DEFAULT_MAX_BYTES,
    DTYPES,
    HALF_SOURCES,
    MAGIC,
    PREAMBLE,
    QUANTIZABLE,
    SCALE_DTYPES,
    VERSION_2_ENCODINGS,
    SqueezeFormatError,
    load_onnx,
    read_header,
)
from worker.compress.backend import FormatBackend, QuantizeStepT
from worker.compress.types import CompressionError, EvalData, Runner, StepContext, StepReport

# Lossless tensors are also tried as "sparse" (positions + the other elements) when this share equals the fill.
_SPARSE_TRY_SHARE = 0.1
_DTYPE_NAMES = {onnx_type: name for name, (onnx_type, _) in DTYPES.items()}
BOUND_GOAL = 1.10  # encoded weights within 10% of their entropy bound
LOSSY = ("quantized", "codebook")
_KMEANS_MAX_ITERATIONS = 300


# ----------------------------------------------------------------------------------------------------------
# Encoding


@dataclass
class _Tensor:
    """One initializer ready to store: its header entry (streams without offsets yet) and its statistics."""

    entry: dict[str, Any]
    streams: dict[str, tuple[str, bytes, int]]  # name -> (codec, stored bytes, raw length)
    bound_parts: dict[str, float]  # entropy bound in bits, by stream
    row: dict[str, Any] = field(default_factory=dict)

    @property
    def bound_bits(self) -> float:
        return sum(self.bound_parts.values())

    @property
    def stored_bytes(self) -> int:
        return sum(len(data) for _, data, _ in self.streams.values())


@dataclass
class EncodedModel:
    data: bytes  # the .sqz file
    tensors: list[_Tensor]
    graph_bytes: int
    header_bytes: int
    version: int  # the header's format version

    @property
    def weights_bytes(self) -> int:
        return sum(t.stored_bytes for t in self.tensors)

    @property
    def bound_bytes(self) -> float:
        return sum(t.bound_bits for t in self.tensors) / 8


class _Packer:
    """zstd at one level; a stream that zstd would not shrink is stored as it is."""

    def __init__(self, level: int) -> None:
        self.cctx = zstandard.ZstdCompressor(level=level, write_content_size=True, write_checksum=False)

    def pack(self, raw: bytes) -> tuple[str, bytes, int]:
        if raw:
            packed = self.cctx.compress(raw)
            if len(packed) < len(raw):
                return "zstd", packed, len(raw)
        return "none", raw, len(raw)


def encode_model(
    model: onnx.ModelProto,
    channel_axes: dict[str, int],
    *,
    value_bits: int,
    level: int,
    producer: str = "squeeze",
    value_coding: str = "uniform",
    float_tensors: str = "exact",
) -> EncodedModel:
    """Encode ``model`` (modified in place: its stored initializers become placeholders) as a ``.sqz`` file.

    ``channel_axes`` names the float weights to quantize and, for each, the axis with one scale per index
    (``uniform``; ``kmeans`` makes one codebook per tensor and falls back to ``uniform`` for a tensor it cannot
    code: no non-zeros, or values no float16/float32 codebook can hold without a zero).
    Initializers of a type the layout has no element type for (strings, 4-bit types) stay in the graph.
    ``float_tensors``: the other float32/float64 tensors (biases, norms, tables) ``exact``, or ``float16`` (stored as
    half when that is smaller than their exact encoding and every value stays finite and non-zero ones non-zero).
    """
    packer = _Packer(level)
    tensors: list[_Tensor] = []
    for initializer in model.graph.initializer:
        dtype = _DTYPE_NAMES.get(initializer.data_type)
        if dtype is None or initializer.data_location == TensorProto.EXTERNAL:
            continue
        try:
            array = numpy_helper.to_array(initializer)
        except Exception as exc:  # a malformed tensor in the user's graph
            raise CompressionError("invalid_model", f"cannot read tensor {initializer.name!r}: {exc}"[:2000]) from exc
        encoded = None
        if initializer.name in channel_axes and dtype in QUANTIZABLE:
            if value_coding == "kmeans":
                encoded = _codebook(initializer.name, dtype, array, value_bits, packer)
            if encoded is None:
                encoded = _quantized(initializer.name, dtype, array, channel_axes[initializer.name], value_bits, packer)
        if encoded is None:
            encoded = _lossless(initializer.name, dtype, array, packer)
            half = _half(initializer.name, dtype, array, packer) if float_tensors == "float16" else None
            if half is not None and half.stored_bytes < encoded.stored_bytes:
                encoded = half
        tensors.append(encoded)
        _clear_data(initializer)
    graph = packer.pack(model.SerializeToString())
    chunks: list[bytes] = []
    offset = 0

    def place(codec: str, data: bytes, raw_length: int) -> dict[str, Any]:
        nonlocal offset
        chunks.append(data)
        offset += len(data)
        return {"offset": offset - len(data), "length": len(data), "raw_length": raw_length, "codec": codec}

    graph_stream = place(*graph)
    entries = []
    for tensor in tensors:
        entries.append({**tensor.entry, "streams": {name: place(*s) for name, s in tensor.streams.items()}})
    payload = b"".join(chunks)
    # Version 1 unless a codebook or half tensor needs 2: files without one stay readable by version-1 loaders.
    version = CODEBOOK_VERSION if any(t.entry["encoding"] in VERSION_2_ENCODINGS for t in tensors) else 1
    header = {
        "format": "squeeze",
        "version": version,
        "producer": producer,
        "payload_bytes": len(payload),
        "payload_crc32": zlib.crc32(payload),
        "graph": graph_stream,
        "tensors": entries,
    }
    header_json = _json(header)
    header_packed = zstandard.ZstdCompressor(level=level).compress(header_json)
    data = PREAMBLE.pack(MAGIC, len(header_packed), len(header_json)) + header_packed + payload
    return EncodedModel(data, tensors, len(graph[1]), PREAMBLE.size + len(header_packed), version)


def _quantized(name: str, dtype: str, array: np.ndarray, axis: int, bits: int, packer: _Packer) -> _Tensor | None:
    """Positions + per-channel uniform symbols + scales; None when the weights cannot be (non-finite, tiny)."""
    w = array.astype(np.float64)
    if w.ndim == 0 or not np.all(np.isfinite(w)):
        return None
    axis %= w.ndim
    channels, inner = w.shape[axis], math.prod(w.shape[axis + 1 :])
    half = 1 << (bits - 1)
    amax = np.abs(np.moveaxis(w, axis, 0).reshape(channels, -1)).max(axis=1) if w.size else np.zeros(channels)
    scales = _stored_scales(amax / half)
    if scales is None:
        return None
    flat = w.reshape(-1)
    positions = np.flatnonzero(flat)
    step = scales[1].astype(np.float64)[(positions // inner) % channels] if positions.size else np.zeros(0)
    # Uniform mid-rise cells over [-max, max]: 2**bits cells, reconstructed at their centres, none at zero, so a
    # non-zero weight stays non-zero and the bitmask stays exact.
    symbols = np.clip(np.floor(flat[positions] / step) + half, 0, 2 * half - 1).astype(np.uint8)
    return _symbol_tensor(
        (name, dtype, w.shape, "quantized", bits),
        {"axis": axis, "scale_dtype": scales[0]},
        positions,
        symbols,
        ("scales", scales[1]),
        packer,
    )


def _codebook(name: str, dtype: str, array: np.ndarray, bits: int, packer: _Packer) -> _Tensor | None:
    """Positions + indices into ``2**bits`` shared values placed by k-means over the tensor's non-zeros (Deep
    Compression's weight sharing); None when there are none, or when they are not finite, or when no float16 or
    float32 codebook holds every used value as a normal (non-zero) number."""
    w = array.astype(np.float64)
    flat = w.reshape(-1)
    positions = np.flatnonzero(flat)
    values = flat[positions]
    if w.ndim == 0 or not values.size or not np.all(np.isfinite(values)):
        return None
    centroids = _kmeans_1d(values, 1 << bits)
    # A float16 weight only takes a float16 codebook: a float32 value could round to zero in the tensor's own type.
    for book_dtype in ("float16",) if dtype == "float16" else ("float16", "float32"):
        with np.errstate(over="ignore"):  # beyond float16's range: inf, and the float32 codebook is tried
            book = centroids.astype(SCALE_DTYPES[book_dtype])
        if not np.all(np.isfinite(book)):
            continue
        # Each value goes to its nearest *stored* centroid (the codebook is sorted, so nearest = between midpoints).
        stored = book.astype(np.float64)
        symbols = np.searchsorted((stored[1:] + stored[:-1]) / 2, values).astype(np.uint8)
        used = np.bincount(symbols, minlength=book.size) > 0
        # An empty cluster (the paper's linear init leaves some in the pruned gap around zero) is never referenced;
        # it takes a used neighbour's value so that the codebook holds no zero and stays sorted.
        nearest_used = np.flatnonzero(used)[
            np.clip(np.searchsorted(np.flatnonzero(used), np.arange(book.size)), 0, int(used.sum()) - 1)
        ]
        book = book[np.where(used, np.arange(book.size), nearest_used)]
        if np.all(np.abs(book) >= np.finfo(book.dtype).tiny):
            return _symbol_tensor(
                (name, dtype, w.shape, "codebook", bits),
                {"codebook_dtype": book_dtype},
                positions,
                symbols,
                ("codebook", book),
                packer,
            )
    return None


def _kmeans_1d(values: np.ndarray, k: int) -> np.ndarray:
    """``k`` sorted centroids of ``values`` (1-D, float64) by Lloyd's algorithm from Deep Compression's linear
    initialisation (evenly over [min, max], which the paper found best: it keeps centroids on the few large weights).

    A small numpy Lloyd rather than scikit-learn's KMeans: scikit-learn is not a worker dependency, and in one
    dimension each iteration is exact and cheap on the sorted values (cells are intervals between midpoints, so
    their sums come from one prefix sum: O(k log n) per iteration), with a result that depends on nothing but the
    values (no threads, no random restarts).
    """
    ordered = np.sort(values)
    prefix = np.concatenate([[0.0], np.cumsum(ordered)])
    centroids = np.linspace(ordered[0], ordered[-1], k)
    for _ in range(_KMEANS_MAX_ITERATIONS):
        # Cell i holds the values in (mid[i-1], mid[i]]: ends[i] is one past its last value in ``ordered``.
        ends = np.concatenate(
            [np.searchsorted(ordered, (centroids[1:] + centroids[:-1]) / 2, side="right"), [len(ordered)]]
        )
        starts = np.concatenate([[0], ends[:-1]])
        counts = ends - starts
        means = (prefix[ends] - prefix[starts]) / np.maximum(counts, 1)
        # An empty cell keeps its centroid. Each mean lies inside its cell, so the centroids stay sorted; the sort
        # only guards against rounding in the prefix sums (cells are found by midpoints, which need the order).
        moved = np.sort(np.where(counts > 0, means, centroids))
        if np.array_equal(moved, centroids):
            break
        centroids = moved
    return centroids


def _symbol_tensor(
    what: tuple[str, str, tuple[int, ...], str, int],
    fields: dict[str, Any],
    positions: np.ndarray,
    symbols: np.ndarray,
    side: tuple[str, np.ndarray],
    packer: _Packer,
) -> _Tensor:
    """A lossy tensor (``what``: name, dtype, shape, encoding, value bits): positions, one symbol per non-zero, and
    the side information that gives the symbols their values (per-channel scales, or a codebook), each part with
    its entropy bound (the side information counted as stored)."""
    name, dtype, shape, encoding, bits = what
    n, k = math.prod(shape), positions.size
    kind, position_stream = _positions(positions, n, packer)
    side_name, side_values = side
    bound = {"positions": _mask_bits(n, k), "values": _entropy_bits(symbols), side_name: 8.0 * side_values.nbytes}
    entry = {
        "name": name,
        "dtype": dtype,
        "shape": list(shape),
        "encoding": encoding,
        "nonzeros": int(k),
        "positions": kind,
        "value_bits": bits,
        **fields,
    }
    streams = {
        "positions": position_stream,
        "values": packer.pack(symbols.tobytes()),
        side_name: packer.pack(side_values.tobytes()),
    }
    return _Tensor(entry, streams, bound)


def _stored_scales(step: np.ndarray) -> tuple[str, np.ndarray] | None:
    """Scales as stored: fp16 when every non-zero one is a normal fp16 number, else fp32 (else None).

    Rounded up, so that no weight lies beyond the outermost cell and every error stays within half a step.
    """
    for dtype in ("float16", "float32"):
        stored = step.astype(SCALE_DTYPES[dtype])
        stored = np.where(stored < step, np.nextafter(stored, np.asarray(np.inf, stored.dtype)), stored)
        if np.all(np.isfinite(stored)) and np.all((step == 0) | (stored >= np.finfo(stored.dtype).tiny)):
            return dtype, stored
    return None


def _lossless(name: str, dtype: str, array: np.ndarray, packer: _Packer) -> _Tensor:
    """Bit-exact: the elements as they are ("dense"), or as positions + the elements that differ from the most
    common bit pattern ("sparse"), whichever is smaller."""
    itemsize = np.dtype(DTYPES[dtype][1]).itemsize
    pattern = np.ascontiguousarray(array).reshape(-1).view(f"u{itemsize}").astype(f"<u{itemsize}")
    n = pattern.size
    base = {"name": name, "dtype": dtype, "shape": [int(d) for d in array.shape]}
    dense_bound = _entropy_bits(pattern) if itemsize == 1 else 8.0 * n * itemsize
    best = _Tensor({**base, "encoding": "dense"}, {"data": packer.pack(pattern.tobytes())}, {"data": dense_bound})
    fill = int(np.bincount(pattern).argmax()) if itemsize == 1 and n else 0
    stored = pattern != fill
    k = int(stored.sum())
    if n and n - k >= _SPARSE_TRY_SHARE * n:
        positions = np.flatnonzero(stored)
        values = pattern[positions]
        kind, position_stream = _positions(positions, n, packer)
        value_bits = _entropy_bits(values) if itemsize == 1 else 8.0 * k * itemsize
        sparse = _Tensor(
            {**base, "encoding": "sparse", "nonzeros": k, "positions": kind, "fill": fill},
            {"positions": position_stream, "values": packer.pack(values.tobytes())},
            {"positions": _mask_bits(n, k), "values": value_bits},
        )
        if sparse.stored_bytes < best.stored_bytes:
            best = sparse
    return best


def _half(name: str, dtype: str, array: np.ndarray, packer: _Packer) -> _Tensor | None:
    """A float32/float64 tensor as float16 (lossy), or None when float16 cannot hold it: a value overflows, or a
    non-zero one would become zero."""
    if dtype not in HALF_SOURCES or not np.all(np.isfinite(array)):
        return None
    with np.errstate(over="ignore"):
        half = np.ascontiguousarray(array, dtype="<f2").reshape(-1)
    flat = array.reshape(-1)
    if not np.all(np.isfinite(half)) or np.any((half == 0) & (flat != 0)):
        return None
    entry = {"name": name, "dtype": dtype, "shape": [int(d) for d in array.shape], "encoding": "half"}
    return _Tensor(entry, {"data": packer.pack(half.tobytes())}, {"data": 16.0 * half.size})


def _positions(positions: np.ndarray, n: int, packer: _Packer) -> tuple[str, tuple[str, bytes, int]]:
    """The smaller of a bitmask (MSB first) and the gaps between stored elements, each as packed."""
    mask = np.zeros(n, dtype=bool)
    mask[positions] = True
    bitmask = packer.pack(np.packbits(mask).tobytes())
    gaps = packer.pack(gap_bytes(positions))
    return ("bitmask", bitmask) if len(bitmask[1]) <= len(gaps[1]) else ("gaps", gaps)


def gap_bytes(positions: np.ndarray) -> bytes:
    """Relative indices: before each stored element, the number of skipped ones as bytes of 255 (each: skip 255
    more) ending in one byte below 255 (skip that many). Deep Compression's relative indices, without fillers."""
    skipped = np.diff(positions, prepend=-1) - 1
    runs = skipped // 255 + 1
    out = np.full(int(runs.sum()), 255, dtype=np.uint8)
    out[np.cumsum(runs) - 1] = skipped % 255
    return out.tobytes()


def _mask_bits(n: int, k: int) -> float:
    """n * H(k/n): the least a coder that knows only the density needs to say which elements are stored."""
    if k in (0, n):
        return 0.0
    p = k / n
    return -n * (p * math.log2(p) + (1 - p) * math.log2(1 - p))


def _entropy_bits(symbols: np.ndarray) -> float:
    """len(symbols) * H(empirical distribution of the symbols) (order 0)."""
    if symbols.size == 0:
        return 0.0
    counts = np.bincount(symbols.astype(np.int64)).astype(np.float64)
    counts = counts[counts > 0]
    return float(-(counts * np.log2(counts / symbols.size)).sum())


def lean_graph(model: onnx.ModelProto) -> dict[str, int]:
    """Drop what a runtime never reads from the graph a ``.sqz`` stores: every node's ``metadata_props`` and
    ``doc_string`` (torch exporters' stack traces with the exporting machine's paths, FX node text, name scopes,
    class hierarchy) and the intermediate ``value_info`` shape hints (ONNX Runtime infers shapes). Nodes, names,
    opsets, inputs, outputs and model metadata stay. On the 96%-pruned digits CNN converted from ``.pt2`` these were
    ~1 KB of its ~1.5 KB compressed graph: a quarter of the whole file. Returns what was dropped, by kind."""
    from worker.compress.onnx_format import _all_subgraphs

    dropped = {"node_metadata": 0, "doc_strings": 0, "value_info": 0}
    for graph in _all_subgraphs(model.graph):
        dropped["value_info"] += len(graph.value_info)
        del graph.value_info[:]
        for node in graph.node:
            dropped["node_metadata"] += len(node.metadata_props)
            del node.metadata_props[:]
            if node.doc_string:
                dropped["doc_strings"] += 1
                node.doc_string = ""
    return dropped


def _clear_data(tensor: TensorProto) -> None:
    for name in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"):
        tensor.ClearField(name)


def _json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def channel_axes(model: onnx.ModelProto, names: set[str]) -> dict[str, int]:
    """For each named weight, its output-channel axis (Conv: 0; Gemm: by transA/transB; MatMul: last two)."""
    axes: dict[str, int] = {}
    shapes = {t.name: len(t.dims) for t in model.graph.initializer}
    for node in model.graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        for slot, name in enumerate(node.input):
            if name not in names or name in axes:
                continue
            rank = shapes.get(name, 2)
            if node.op_type == "Gemm":
                axes[name] = (0 if attrs.get("transB", 0) else 1) if slot == 1 else (1 if attrs.get("transA", 0) else 0)
            elif node.op_type == "MatMul":
                axes[name] = rank - 1 if slot == 1 else rank - 2
            else:  # Conv: [out, in / groups, *kernel]
                axes[name] = 0
    return {name: axes.get(name, 0) for name in names}


# ----------------------------------------------------------------------------------------------------------
# The step


def encode_squeeze(backend: FormatBackend, src: Path, dst: Path, step: EncodeSqueeze, ctx: StepContext) -> StepReport:
    """Write ``src`` (an ONNX model) as a ``.sqz`` file; report its size next to the entropy bound of its weights."""
    prunable = getattr(backend, "prunable_weights", None)
    if backend.name != "onnx" or prunable is None:
        raise CompressionError(
            "method_not_supported",
            f"encode/squeeze stores ONNX models; convert the {backend.name} model first (a convert/onnx step)",
        )
    input_bytes = backend.stored_size(src)
    if input_bytes >= DEFAULT_MAX_BYTES:
        raise CompressionError("model_too_large", "encode/squeeze handles models up to 2 GiB (one protobuf message)")
    from worker.compress.onnx_format import _load_model  # the backend's loader: checked external data, errors

    weights: dict[str, tuple[np.ndarray, int]] = prunable(src)
    originals = {name: array for name, (array, _) in weights.items()}
    model = _load_model(src)
    dropped = lean_graph(model)
    axes = channel_axes(model, set(weights))
    encoded = encode_model(
        model,
        axes,
        value_bits=step.value_bits,
        level=step.level,
        producer=_producer(),
        value_coding=step.value_coding,
        float_tensors=step.float_tensors,
    )
    try:
        decoded = {t.name: t for t in load_onnx(encoded.data).graph.initializer}
    except SqueezeFormatError as exc:
        raise CompressionError("internal_error", f"the encoded file does not decode: {exc}") from exc
    error_sq = norm_sq = max_abs = 0.0
    for tensor in encoded.tensors:
        name = tensor.entry["name"]
        row = tensor.row
        row.update(
            name=name,
            shape=tensor.entry["shape"],
            dtype=tensor.entry["dtype"],
            encoding=tensor.entry["encoding"],
            positions=tensor.entry.get("positions"),
            parameters=math.prod(tensor.entry["shape"]),
            stored=tensor.entry.get("nonzeros"),
            value_bits=tensor.entry.get("value_bits"),
            encoded_bytes=tensor.stored_bytes,
            bound_bytes=round(tensor.bound_bits / 8, 1),
            bound_parts_bytes={part: round(bits / 8, 1) for part, bits in tensor.bound_parts.items()},
        )
        if tensor.entry["encoding"] in LOSSY:
            original = originals[name].astype(np.float64)
            diff = numpy_helper.to_array(decoded[name]).astype(np.float64) - original
            sq, ref = float((diff * diff).sum()), float((original * original).sum())
            error_sq, norm_sq = error_sq + sq, norm_sq + ref
            row["max_abs_error"] = float(np.abs(diff).max()) if diff.size else 0.0
            row["relative_rmse"] = round(math.sqrt(sq / ref), 6) if ref else 0.0
            max_abs = max(max_abs, row["max_abs_error"])
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp")
    tmp.write_bytes(encoded.data)
    tmp.replace(dst)
    bound = encoded.bound_bytes
    quantized = [t for t in encoded.tensors if t.entry["encoding"] in LOSSY]
    quantized_bytes = sum(t.stored_bytes for t in quantized)
    quantized_bound = sum(t.bound_bits for t in quantized) / 8
    details: dict[str, Any] = {
        "value_bits": step.value_bits,
        "value_coding": step.value_coding,
        "float_tensors": step.float_tensors,
        "half_tensors": sum(t.entry["encoding"] == "half" for t in encoded.tensors),
        # kmeans falls back to uniform for a tensor it cannot code; the rows' ``encoding`` says which each got.
        "codebook_tensors": sum(t.entry["encoding"] == "codebook" for t in encoded.tensors),
        "format_version": encoded.version,
        "level": step.level,
        "codec": "zstd",
        "input_bytes": input_bytes,
        "encoded_bytes": len(encoded.data),
        "compression": round(input_bytes / len(encoded.data), 3),
        "weights_bytes": encoded.weights_bytes,
        "entropy_bound_bytes": round(bound, 1),
        "bound_ratio": round(encoded.weights_bytes / bound, 4) if bound else None,
        "file_bound_ratio": round(len(encoded.data) / bound, 4) if bound else None,
        # The same for the quantized weights alone (lossless float tensors count at their raw size in the bound).
        "quantized_bytes": quantized_bytes,
        "quantized_bound_bytes": round(quantized_bound, 1),
        "quantized_bound_ratio": round(quantized_bytes / quantized_bound, 4) if quantized_bound else None,
        "graph_bytes": encoded.graph_bytes,
        "graph_dropped": dropped,  # annotations no runtime reads (lean_graph)
        "header_bytes": encoded.header_bytes,
        "quantized_tensors": len(quantized),
        "lossless_tensors": len(encoded.tensors) - len(quantized),
        "value_error": {
            "max_abs": max_abs,
            "relative_rmse": round(math.sqrt(error_sq / norm_sq), 6) if norm_sq else 0.0,
        },
        "tensors": [t.row for t in encoded.tensors],
    }
    notes = []
    if not quantized:
        notes.append(
            "encode/squeeze: the model has no float Conv, Gemm or MatMul weights, so every tensor is stored "
            "losslessly (an int8 model keeps its int8 values); value_bits had no effect"
        )
    if bound and encoded.weights_bytes > BOUND_GOAL * bound:
        notes.append(
            f"encode/squeeze: the weights take {encoded.weights_bytes} bytes, {encoded.weights_bytes / bound:.2f}x "
            f"their entropy bound ({bound:.0f} bytes)"
        )
    return StepReport(op="encode", method="squeeze", details=details, notes=notes, output_format="squeeze")


def _producer() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"squeeze {version('squeeze')}"
    except PackageNotFoundError:
        return "squeeze"


# ----------------------------------------------------------------------------------------------------------
# The backend


class SqueezeBackend:
    """``FormatBackend`` for ``.sqz`` files: decoded with ``squeeze.loader`` and run by the ONNX backend.

    An output-only format: it is the last step's product, never a step's input. Each file is decoded once per
    backend instance into a private temporary folder (removed with the instance).
    """

    name = "squeeze"
    suffix = ".sqz"

    def __init__(self) -> None:
        from worker.compress.onnx_format import OnnxBackend

        self._onnx = OnnxBackend()
        self._folder = Path(tempfile.mkdtemp(prefix="sqz-decoded-"))
        weakref.finalize(self, shutil.rmtree, self._folder, True)
        self._decoded: dict[tuple[str, int, int], Path] = {}

    def _onnx_path(self, path: Path) -> Path:
        stat = path.stat()
        key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
        if key not in self._decoded:
            out = self._folder / f"model{len(self._decoded)}.onnx"
            try:
                from squeeze.loader import decode

                decode(path, out)
            except SqueezeFormatError as exc:
                raise CompressionError("invalid_model", f"not a valid .sqz file: {exc}") from exc
            self._decoded[key] = out
        return self._decoded[key]

    def open_runner(self, path: Path, device: str) -> Runner:
        """ONNX Runtime on the decoded model; the runtime string says so."""
        runner = self._onnx.open_runner(self._onnx_path(path), device)
        runner.runtime = f"{runner.runtime} (decoded from squeeze .sqz)"
        return runner

    def stored_size(self, path: Path) -> int:
        """The ``.sqz`` file's size."""
        return path.stat().st_size

    def count_parameters(self, path: Path) -> tuple[int, int]:
        return self._onnx.count_parameters(self._onnx_path(path))

    def example_inputs(self, path: Path, batch_size: int) -> dict[str, np.ndarray]:
        return self._onnx.example_inputs(self._onnx_path(path), batch_size)

    def layers(self, path: Path) -> list[dict[str, Any]]:
        """The decoded model's weight table, with each tensor's stored bits, encoded bytes and encoding."""
        rows = self._onnx.layers(self._onnx_path(path))
        entries = {t.name: t for t in read_header(path).tensors}
        for row in rows:
            entry = entries.get(row["name"])
            if entry is not None:
                row["encoding"] = entry.encoding
                row["bytes"] = entry.stored_bytes
                if entry.encoding in LOSSY:
                    row["bits"] = entry.value_bits
        return rows

    def prune_magnitude(self, src: Path, dst: Path, step: PruneMagnitude) -> StepReport:
        raise _final()

    def quantize(self, src: Path, dst: Path, step: QuantizeStepT, data: EvalData | None, device: str) -> StepReport:
        raise _final()


def _final() -> CompressionError:
    return CompressionError("method_not_supported", "a .sqz file is a final storage encoding; encode must come last")
