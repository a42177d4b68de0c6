"""Weight-only int8/int4 for ONNX models, stored packed so the file really shrinks.

MatMul weights become ONNX Runtime's ``com.microsoft.MatMulNBits`` (weights packed along K in blocks, one scale per
block and output column; ONNX Runtime's own block quantizer does the packing). Gemm layers are first rewritten as
MatMul + Add, which that quantizer needs. Embedding tables (``include: ["embedding"]``) become
``com.microsoft.GatherBlockQuantized`` with uint8 storage and a ``bits`` attribute, packed here: ONNX Runtime's
quantizer only writes them as int4 tensors, which need opset 21 and would force an opset upgrade on the user's
graph. Activations stay float, so no dataset is needed. Conv layers are left in float (no packed Conv op exists).

``packed_weights`` reads such tensors back logically (K x N parameters, bits, nonzero), so the per-layer table and
the parameter counts of a quantized model match the original's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from app.jobs.spec import QuantizeInt4WeightOnly, QuantizeInt8WeightOnly
from worker.compress.onnx_format import (
    OnnxBackend,
    _all_nodes,
    _load_model,
    _message,
    _must_load,
    _save_model,
    _scratch,
)
from worker.compress.pruning import layer_overrides
from worker.compress.types import CompressionError, StepContext, StepReport

_MS_DOMAIN = "com.microsoft"
# ONNX Runtime's block quantizer (MLAS) packs MatMulNBits blocks of 16 to 256 weights only.
MAX_MATMUL_BLOCK = 256


@dataclass(frozen=True)
class _Scheme:
    bits: int
    group_size: int | None
    symmetric: bool


@dataclass(frozen=True)
class PackedWeight:
    """A packed N-bit weight seen as the logical matrix it stores."""

    shape: list[int]  # MatMulNBits: [K, N] as the MatMul's B; GatherBlockQuantized: the table's [rows, columns]
    parameters: int
    nonzero: int  # entries whose quantized value differs from their zero point
    bits: int
    bytes: int  # bytes of the packed tensor as stored


def weight_only_step(
    backend: OnnxBackend, src: Path, dst: Path, step: QuantizeInt8WeightOnly | QuantizeInt4WeightOnly, ctx: StepContext
) -> StepReport:
    """``backend.quantize_int8_weight_only`` / ``quantize_int4_weight_only``: quantize, check it loads, save."""
    bits = 4 if isinstance(step, QuantizeInt4WeightOnly) else 8
    size = step.group_size
    if size is not None and (size > MAX_MATMUL_BLOCK or size & (size - 1)):
        raise CompressionError(
            "unsupported_option",
            f"{step.method} on ONNX: group_size must be a power of two from 16 to {MAX_MATMUL_BLOCK} (ONNX "
            f"Runtime's MatMulNBits blocks), not {size}",
        )
    symmetric = step.symmetric if isinstance(step, QuantizeInt4WeightOnly) else True
    model = _load_model(src)
    try:
        details = quantize_weight_only(
            model,
            bits=bits,
            group_size=step.group_size,
            symmetric=symmetric,
            embeddings="embedding" in step.include,
            exclude=step.exclude,
        )
    except CompressionError:
        raise
    except Exception as exc:  # onnx/ORT errors on a user's graph: report them, don't crash the job
        raise CompressionError("quantization_failed", _message(f"{step.method} quantization failed", exc)) from exc
    notes = details.pop("notes")
    if not details["layers"] and not details["embeddings"]:
        raise CompressionError(
            "nothing_to_quantize",
            f"{step.method}: the model has no MatMul or Gemm layer with a constant float weight"
            + ("" if step.include else " (embedding tables are quantized only with include: ['embedding'])"),
        )
    with _scratch(dst) as scratch:
        out = scratch / "result.onnx"
        _save_model(model, out)
        _must_load(backend, out, ctx.device, "quantization_failed", f"the {step.method} model")
        out.replace(dst)
    return StepReport(op="quantize", method=step.method, details=details, notes=notes)


def quantize_weight_only(
    model: onnx.ModelProto,
    *,
    bits: int,
    group_size: int | None,
    symmetric: bool,
    embeddings: bool,
    exclude: list[str] | None = None,
) -> dict[str, Any]:
    """Quantize ``model``'s MatMul/Gemm weights (and embedding tables if asked) in place; returns the details.

    ``group_size`` None means one scale per output channel where K is a power of two up to 256; otherwise the
    largest power-of-two block in [16, 256] dividing K: MatMulNBits blocks are powers of two of at most 256, and a
    block longer than K would be stored padded. Embedding tables get one scale per row then.
    """
    graph = model.graph
    scheme = _Scheme(bits, group_size, symmetric)
    notes: list[str] = []
    converted = _gemms_to_matmuls(graph)
    initializers = {t.name: t for t in graph.initializer}
    readers = _readers(graph)
    layers: list[dict[str, Any]] = []
    tables: list[dict[str, Any]] = []
    left: list[dict[str, Any]] = []
    new_nodes: list[onnx.NodeProto] = []
    for node in list(graph.node):
        weight = _constant_weight(node, initializers)
        if weight is None:
            new_nodes.append(node)
            if node.op_type == "Conv" and node.input[1] in initializers:
                left.append({"name": node.input[1], "op": "Conv", "reason": "no packed weight-only Conv op"})
            continue
        tensor = initializers[weight]
        if exclude and layer_overrides([weight], dict.fromkeys(exclude, 0.0)):
            left.append({"name": weight, "op": node.op_type, "reason": "excluded by the step (kept in float)"})
            new_nodes.append(node)
        elif len(readers[weight]) > 1:
            left.append({"name": weight, "op": node.op_type, "reason": "weight shared with another node"})
            new_nodes.append(node)
        elif node.op_type == "MatMul":
            new_nodes += _quantize_matmul(graph, node, tensor, scheme, layers)
        elif embeddings:
            new_nodes += _quantize_gather(graph, node, tensor, scheme, tables, left)
        else:
            new_nodes.append(node)
            left.append({"name": weight, "op": "Gather", "reason": "embedding tables need include: ['embedding']"})
    graph.ClearField("node")
    graph.node.extend(new_nodes)
    used = {name for n in graph.node for name in n.input}
    kept = [t for t in graph.initializer if t.name in used]
    graph.ClearField("initializer")
    graph.initializer.extend(kept)
    if (layers or tables) and not any(o.domain == _MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(_MS_DOMAIN, 1))
    # Exporters record intermediate shapes; rewritten subgraphs keep theirs but stale entries only get in the way.
    graph.ClearField("value_info")

    float_tables = [e for e in left if e["op"] == "Gather"]
    if float_tables:
        mb = sum(_tensor_bytes(initializers[e["name"]]) for e in float_tables) / 1e6
        notes.append(
            f'{len(float_tables)} embedding table(s) ({mb:.1f} MB) left in float: add "include": ["embedding"] '
            "to quantize them too"
        )
    convs = [e for e in left if e["op"] == "Conv"]
    if convs:
        notes.append(
            f"{len(convs)} Conv layer(s) left in float: ONNX Runtime has no packed weight-only convolution; "
            "int8_static quantizes convolutions"
        )
    return {
        "bits": bits,
        "group_size": group_size,
        "symmetric": symmetric,
        "format": "com.microsoft MatMulNBits" + (" + GatherBlockQuantized" if tables else ""),
        "gemm_rewritten_as_matmul": converted,
        "layers": layers,
        "embeddings": tables,
        "left_in_float": left,
        "notes": notes,
    }


def _constant_weight(node: onnx.NodeProto, initializers: dict[str, TensorProto]) -> str | None:
    """The float initializer this node would quantize: MatMul's 2-D B, or a Gather's 2-D table (axis 0)."""
    if node.domain not in ("", "ai.onnx"):
        return None
    if node.op_type == "MatMul":
        slot = 1
    elif node.op_type == "Gather" and _attr(node, "axis", 0) == 0:
        slot = 0
    else:
        return None
    name = node.input[slot] if len(node.input) > slot else ""
    tensor = initializers.get(name)
    if tensor is None or tensor.data_type != TensorProto.FLOAT or len(tensor.dims) != 2 or 0 in tensor.dims:
        return None
    return name


def _quantize_matmul(
    graph: onnx.GraphProto,
    node: onnx.NodeProto,
    tensor: TensorProto,
    scheme: _Scheme,
    layers: list[dict[str, Any]],
) -> list[onnx.NodeProto]:
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        DefaultWeightOnlyQuantizer,
    )

    k, n = (int(d) for d in tensor.dims)
    bits, block = scheme.bits, scheme.group_size or _channel_block(k)
    quantizer = DefaultWeightOnlyQuantizer(
        DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=scheme.symmetric, bits=bits)
    )
    name = tensor.name
    nodes = quantizer.quantize_matmul(node, [graph])
    packed_name = next(x.input[1] for x in nodes if x.op_type == "MatMulNBits")
    # Keep the layer's name: the per-layer tables before and after then line up.
    graph.initializer.remove(tensor)
    for t in graph.initializer:
        if t.name == packed_name:
            t.name = name
    for x in nodes:
        if x.op_type == "MatMulNBits":
            x.input[1] = name
    layers.append({"name": name, "op": "MatMul", "shape": [k, n], "bits": bits, "block_size": block})
    return list(nodes)


def _quantize_gather(
    graph: onnx.GraphProto,
    node: onnx.NodeProto,
    tensor: TensorProto,
    scheme: _Scheme,
    tables: list[dict[str, Any]],
    left: list[dict[str, Any]],
) -> list[onnx.NodeProto]:
    bits = scheme.bits
    table = numpy_helper.to_array(tensor).astype(np.float32)
    rows, cols = table.shape
    if (cols * bits) % 8:
        left.append({"name": tensor.name, "op": "Gather", "reason": f"{cols} columns do not pack into bytes"})
        return [node]
    block = scheme.group_size or _next_power_of_two(cols)
    data, scales, zero_points = _block_quantize_rows(table, bits, block, scheme.symmetric)
    name = tensor.name
    graph.initializer.remove(tensor)
    graph.initializer.extend(
        [numpy_helper.from_array(_pack_rows(data, bits), name), numpy_helper.from_array(scales, f"{name}_scales")]
    )
    inputs = [name, node.input[1], f"{name}_scales"]
    if zero_points is not None:
        graph.initializer.append(numpy_helper.from_array(_pack_rows(zero_points, bits), f"{name}_zero_points"))
        inputs.append(f"{name}_zero_points")
    tables.append({"name": name, "op": "Gather", "shape": [rows, cols], "bits": bits, "block_size": block})
    return [
        helper.make_node(
            "GatherBlockQuantized",
            inputs,
            list(node.output),
            name=node.name,
            domain=_MS_DOMAIN,
            bits=bits,
            block_size=block,
            gather_axis=0,
            quantize_axis=1,
        )
    ]


def _block_quantize_rows(
    table: np.ndarray, bits: int, block: int, symmetric: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Round-to-nearest in blocks of ``block`` columns per row: (uint8 codes, float scales, uint8 zero points).

    Symmetric codes are offset by 2^(bits-1), GatherBlockQuantized's default zero point for uint8 data.
    """
    rows, cols = table.shape
    blocks = -(-cols // block)
    padded = np.pad(table, ((0, 0), (0, blocks * block - cols))).reshape(rows, blocks, block)
    levels = 2**bits - 1
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        scales = np.abs(padded).max(axis=2) / qmax
        scales[scales == 0] = 1.0
        codes = np.clip(np.round(padded / scales[..., None]), -qmax - 1, qmax) + 2 ** (bits - 1)
        zero_points = None
    else:
        low = np.minimum(padded.min(axis=2), 0.0)
        high = np.maximum(padded.max(axis=2), 0.0)
        scales = (high - low) / levels
        scales[scales == 0] = 1.0
        zero_points = np.clip(np.round(-low / scales), 0, levels).astype(np.uint8)
        codes = np.clip(np.round(padded / scales[..., None]) + zero_points[..., None], 0, levels)
    data = codes.reshape(rows, blocks * block)[:, :cols].astype(np.uint8)
    return data, scales.astype(np.float32), zero_points


def _pack_rows(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack ``bits``-bit codes along the last axis, low-order bits first (GatherBlockQuantized's uint8 layout)."""
    if bits == 8:
        return np.ascontiguousarray(values, dtype=np.uint8)
    per_byte = 8 // bits
    values = np.pad(values, ((0, 0), (0, (-values.shape[1]) % per_byte)))
    packed = np.zeros((values.shape[0], values.shape[1] // per_byte), dtype=np.uint8)
    for j in range(per_byte):
        packed |= (values[:, j::per_byte].astype(np.uint8) << (bits * j)).astype(np.uint8)
    return packed


def _unpack(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """The first ``count`` codes of each row of ``packed`` (inverse of ``_pack_rows``)."""
    packed = packed.reshape(packed.shape[0], -1).astype(np.uint8)
    if bits == 8:
        return packed[:, :count]
    per_byte = 8 // bits
    mask = (1 << bits) - 1
    out = np.empty((packed.shape[0], packed.shape[1] * per_byte), dtype=np.uint8)
    for j in range(per_byte):
        out[:, j::per_byte] = (packed >> (bits * j)) & mask
    return out[:, :count]


def _gemms_to_matmuls(graph: onnx.GraphProto) -> int:
    """Rewrite ``Gemm(A, B, C)`` with a constant B as ``MatMul(A, alpha * B') [+ Add(beta * C)]``; returns how many.

    Only Gemms with transA = 0, a float B read by no other node, and a constant C (or none) are rewritten; B is
    stored transposed as needed under its own name, so per-layer tables keep the layer's name.
    """
    initializers = {t.name: t for t in graph.initializer}
    readers = _readers(graph)
    out: list[onnx.NodeProto] = []
    count = 0
    for node in graph.node:
        b = node.input[1] if node.op_type == "Gemm" and len(node.input) > 1 else ""
        c = node.input[2] if len(node.input) > 2 else ""
        ok = (
            node.op_type == "Gemm"
            and node.domain in ("", "ai.onnx")
            and _attr(node, "transA", 0) == 0
            and b in initializers
            and initializers[b].data_type == TensorProto.FLOAT
            and len(readers[b]) == 1
            and (not c or (c in initializers and initializers[c].data_type == TensorProto.FLOAT))
        )
        if not ok:
            out.append(node)
            continue
        weight = numpy_helper.to_array(initializers[b]).astype(np.float32)
        weight = (weight.T if _attr(node, "transB", 0) else weight) * np.float32(_attr(node, "alpha", 1.0))
        initializers[b].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(weight), b))
        beta = float(_attr(node, "beta", 1.0))
        if not c or beta == 0.0:
            out.append(helper.make_node("MatMul", [node.input[0], b], list(node.output), name=node.name))
        else:
            bias_name = c
            if beta != 1.0 or len(readers[c]) > 1:
                bias_name = f"{node.output[0]}_bias"
                bias = numpy_helper.to_array(initializers[c]).astype(np.float32) * np.float32(beta)
                graph.initializer.append(numpy_helper.from_array(bias, bias_name))
            product = f"{node.output[0]}_matmul"
            out.append(helper.make_node("MatMul", [node.input[0], b], [product], name=node.name))
            out.append(
                helper.make_node(
                    "Add", [product, bias_name], list(node.output), name=f"{node.name or node.output[0]}_bias"
                )
            )
        count += 1
    graph.ClearField("node")
    graph.node.extend(out)
    return count


def packed_weights(model: onnx.ModelProto) -> dict[str, PackedWeight]:
    """The model's MatMulNBits and GatherBlockQuantized weights (uint8 storage), by initializer name."""
    initializers = {t.name: t for t in model.graph.initializer}
    found: dict[str, PackedWeight] = {}
    for node in model.graph.node:
        if node.domain != _MS_DOMAIN:
            continue
        if node.op_type == "MatMulNBits":
            weight = _matmul_nbits(node, initializers)
        elif node.op_type == "GatherBlockQuantized":
            weight = _gather_block_quantized(node, initializers)
        else:
            continue
        if weight is not None:
            found[node.input[1 if node.op_type == "MatMulNBits" else 0]] = weight
    return found


def _matmul_nbits(node: onnx.NodeProto, initializers: dict[str, TensorProto]) -> PackedWeight | None:
    tensor = initializers.get(node.input[1])
    if tensor is None or tensor.data_type != TensorProto.UINT8:
        return None
    k, n, bits, block = (int(_attr(node, a, 0)) for a in ("K", "N", "bits", "block_size"))
    bits = bits or 4
    if bits not in (2, 4, 8) or not block or len(tensor.dims) != 3:
        return None
    packed = numpy_helper.to_array(tensor)  # [N, k_blocks, blob]
    blocks = packed.shape[1]
    codes = _unpack(packed.reshape(n * blocks, -1), bits, block).reshape(n, blocks * block)[:, :k]
    zp = _nbits_zero_points(node, initializers, n, blocks, bits)
    zero = zp if np.ndim(zp) == 0 else np.repeat(zp, block, axis=1)[:, :k]
    return PackedWeight([k, n], k * n, int(np.count_nonzero(codes != zero)), bits, int(packed.nbytes))


def _nbits_zero_points(
    node: onnx.NodeProto, initializers: dict[str, TensorProto], n: int, blocks: int, bits: int
) -> np.ndarray:
    name = node.input[3] if len(node.input) > 3 else ""
    tensor = initializers.get(name)
    if tensor is None or tensor.data_type != TensorProto.UINT8:
        return np.array(2 ** (bits - 1), dtype=np.uint8)  # the op's default; float zero points are not codes
    return _unpack(numpy_helper.to_array(tensor).reshape(n, -1), bits, blocks)


def _gather_block_quantized(node: onnx.NodeProto, initializers: dict[str, TensorProto]) -> PackedWeight | None:
    tensor = initializers.get(node.input[0])
    if tensor is None or tensor.data_type != TensorProto.UINT8 or len(tensor.dims) != 2:
        return None
    bits = int(_attr(node, "bits", 4))
    block = int(_attr(node, "block_size", 128))
    if bits not in (2, 4, 8) or _attr(node, "quantize_axis", 1) != 1:
        return None
    packed = numpy_helper.to_array(tensor)
    rows, cols = packed.shape[0], packed.shape[1] * 8 // bits
    codes = _unpack(packed, bits, cols)
    zp_name = node.input[3] if len(node.input) > 3 else ""
    if zp_name in initializers:
        blocks = -(-cols // block)
        zp = _unpack(numpy_helper.to_array(initializers[zp_name]), bits, blocks)
        zero: np.ndarray = np.repeat(zp, block, axis=1)[:, :cols]
    else:
        zero = np.array(2 ** (bits - 1), dtype=np.uint8)
    return PackedWeight([rows, cols], rows * cols, int(np.count_nonzero(codes != zero)), bits, int(packed.nbytes))


def _channel_block(k: int) -> int:
    """The block for "one scale per output channel": K itself where K is a power of two up to 256, else the
    largest power-of-two divisor of K in [16, 256] (so no padding is stored), else the next power of two."""
    if k <= MAX_MATMUL_BLOCK and k & (k - 1) == 0:
        return max(k, 16)
    divisor = min(k & -k, MAX_MATMUL_BLOCK)
    return divisor if divisor >= 16 else min(_next_power_of_two(k), MAX_MATMUL_BLOCK)


def _next_power_of_two(n: int) -> int:
    return max(16, 1 << (n - 1).bit_length())


def _readers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    """Who reads each tensor, subgraphs included; a graph output counts as a reader too."""
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in _all_nodes(graph):
        for name in node.input:
            readers.setdefault(name, []).append(node)
    for output in graph.output:
        readers.setdefault(output.name, []).append(helper.make_node("Identity", [output.name], ["graph_output"]))
    return readers


def _attr(node: onnx.NodeProto, name: str, default: Any) -> Any:
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _tensor_bytes(tensor: TensorProto) -> int:
    return int(np.prod(tensor.dims)) * np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
