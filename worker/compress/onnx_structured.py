"""Structured pruning of ONNX graphs: whole output channels removed, and every layer that reads them resized.

Why our own graph surgery: ONNX Runtime and onnx ship no channel pruner, and torch-pruning style libraries work on
torch modules, not on an uploaded graph. The method is the usual dependency-aware one (as in Torch-Pruning's
dependency graph, Fang et al. 2023), restricted to what can be proven exact on an ONNX graph:

* A *producer* is a Conv (group 1), Gemm or MatMul with a constant weight; its output channels are ranked by the
  L1 or L2 norm of their weights and the lowest-ranked are removed.
* From each producer the removed channels are traced forward through ops that keep channels apart: elementwise
  ops with constant operands (Relu, Gelu, Add/Mul by a per-channel or scalar constant, Clip, ...),
  BatchNormalization, max/average/global pooling, Flatten or a flattening Reshape (a channel becomes a block of
  spatial positions), and Concat along the channel axis. Constants and BatchNormalization parameters on the way
  are resized.
* The trace ends at *consumers* whose input features can be removed: Conv (group 1), Gemm and MatMul with a
  constant weight. A removed channel's output there is a constant (its bias passed through the activations),
  so its contribution is folded into the consumer's bias instead of being dropped. For a consumer Conv this is
  exact wherever its kernel does not overlap zero padding.
* Anything else on the way (a graph output, a residual Add of two computed tensors, a reshape into attention
  heads, LayerNormalization, an op we do not know) leaves that producer unpruned, and the report says why.

The result is checked: it must load in ONNX Runtime and give outputs of the original's shapes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from app.jobs.spec import PruneStructured
from worker.compress.onnx_format import OnnxBackend, _all_subgraphs, _load_model, _message, _save_model, _scratch
from worker.compress.pruning import channel_keep, layer_overrides
from worker.compress.types import CompressionError, StepContext, StepReport

_UNARY = {
    "Abs", "Celu", "Ceil", "Clip", "Cos", "Dropout", "Elu", "Erf", "Exp", "Floor", "Gelu", "HardSigmoid",
    "HardSwish", "Identity", "LeakyRelu", "Log", "Mish", "Neg", "Reciprocal", "Relu", "Round", "Selu", "Shrink",
    "Sigmoid", "Sign", "Sin", "Softplus", "Softsign", "Sqrt", "Tanh", "ThresholdedRelu",
}  # fmt: skip
_BINARY = {"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "PRelu", "Sum"}
_POOLS = {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool"}


@dataclass
class _Track:
    """Where one producer's channels sit in a tensor it reaches: along ``axis`` of a tensor of ``rank``."""

    axis: int
    rank: int
    length: int  # size of ``axis``
    positions: list[np.ndarray]  # per producer channel: its indices along ``axis``
    const: np.ndarray  # [length]: the value a removed channel takes at each position (NaN: not this producer's)


@dataclass
class _Producer:
    node: onnx.NodeProto
    weight: str
    out_axis: int  # the weight's output-channel axis
    channels: int
    tracks: dict[str, _Track] = field(default_factory=dict)
    consts: list[tuple[onnx.NodeProto, int, str, str]] = field(default_factory=list)  # node, slot, tensor, kind
    reshapes: list[tuple[onnx.NodeProto, str]] = field(default_factory=list)  # node, its output tensor
    sinks: list[tuple[onnx.NodeProto, str]] = field(default_factory=list)  # node, traced input
    blocked: str | None = None
    keep: np.ndarray | None = None


@dataclass(frozen=True)
class _Facts:
    """What the tracer needs to know about the graph, computed once."""

    inits: dict[str, TensorProto]
    constants: dict[str, np.ndarray]  # outputs of Constant nodes
    shapes: dict[str, list[int | None]]
    readers: dict[str, int]  # how many node inputs (and graph outputs) read each tensor
    outputs: set[str]
    nested: set[str]  # tensors read inside subgraphs
    opset: int


def prune_structured_step(
    backend: OnnxBackend, src: Path, dst: Path, step: PruneStructured, ctx: StepContext
) -> StepReport:
    """``OnnxBackend.prune_structured``: plan, prune, check against the original, save."""
    model = _load_model(src)
    try:
        details, notes = prune_channels(model, step)
    except CompressionError:
        raise
    except Exception as exc:  # onnx errors on a user's graph: report them, don't crash the job
        raise CompressionError("pruning_failed", _message("structured pruning failed", exc)) from exc
    with _scratch(dst) as scratch:
        out = scratch / "result.onnx"
        _save_model(model, out)
        _check_same_outputs(backend, src, out, ctx.device)
        out.replace(dst)
    return StepReport(op="prune", method="structured", details=details, notes=notes)


def prune_channels(model: onnx.ModelProto, step: PruneStructured) -> tuple[dict[str, Any], list[str]]:
    """Remove the lowest-norm output channels of every prunable layer of ``model``, in place."""
    graph = model.graph
    facts = _Facts(
        inits={t.name: t for t in graph.initializer},
        constants=_constant_nodes(graph),
        shapes=_shapes(model),
        readers=_readers(model),
        outputs={o.name for o in graph.output},
        nested=_names_used_in_subgraphs(graph),
        opset=next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13),
    )
    inits = facts.inits
    producers = [p for node in graph.node if (p := _producer(node, facts)) is not None]
    if not producers:
        raise CompressionError(
            "nothing_to_prune", "the model has no Conv, Gemm or MatMul layer with a constant float weight"
        )
    for p in producers:
        _trace(p, graph, facts)

    if all(p.blocked is not None for p in producers):
        reasons = "; ".join(f"{p.weight}: {p.blocked}" for p in producers[:5])
        raise CompressionError(
            "nothing_to_prune",
            f"no layer's channels can be removed without changing the model's outputs' shapes: {reasons}"[:2000],
            {"layers": [{"name": p.weight, "reason": p.blocked} for p in producers[:100]]},
        )
    chosen = layer_overrides([p.weight for p in producers], step.overrides)
    layers, skipped = [], []
    for p in producers:
        row = {"name": p.weight, "op": p.node.op_type, "channels_before": p.channels}
        if p.blocked is not None:
            skipped.append({**row, "reason": p.blocked})
            continue
        sparsity = chosen.get(p.weight, step.sparsity)
        w = numpy_helper.to_array(inits[p.weight]).astype(np.float64)
        moved = np.moveaxis(w, p.out_axis, 0).reshape(p.channels, -1)
        scores = np.abs(moved).sum(axis=1) if step.norm == "l1" else np.sqrt((moved * moved).sum(axis=1))
        p.keep = np.flatnonzero(channel_keep(scores, sparsity, step.round_to))
        layers.append({**row, "channels_after": int(p.keep.size)})
    active = [p for p in producers if p.keep is not None and p.keep.size < p.channels]
    params_before = sum(int(np.prod(t.dims)) for t in graph.initializer)
    _apply(graph, active, facts)
    params_after = sum(int(np.prod(t.dims)) for t in graph.initializer)

    notes = []
    if skipped:
        shown = ", ".join(f"{s['name']} ({s['reason']})" for s in skipped[:5])
        more = f" and {len(skipped) - 5} more" if len(skipped) > 5 else ""
        notes.append(f"{len(skipped)} layer(s) left unpruned: {shown}{more}")
    odd = [
        r["name"] for r in layers if r["op"] == "Conv" and r["channels_after"] % 16 and not r["channels_before"] % 16
    ]
    if odd:
        notes.append(
            f"Conv layer(s) {', '.join(odd[:5])} now have channel counts that are not multiples of 16: ONNX Runtime's "
            "CPU convolutions work in blocks of 8 or 16 channels and can get slower (digits CNN, 16/32 -> 12/24 "
            "channels: 1.5x slower on one AVX-512 thread). round_to=16 keeps whole blocks."
        )
    notes.append(
        "Removed channels' constant outputs (bias through the activations) were folded into the next layer's bias. "
        "No fine-tuning runs for ONNX models: accuracy is as pruned."
    )
    details = {
        "norm": step.norm,
        "requested_sparsity": step.sparsity,
        "round_to": step.round_to,
        "overrides": dict(step.overrides),
        "prunable_layers": len(producers),
        "layers_pruned": len(active),
        "channels_before": sum(r["channels_before"] for r in layers),
        "channels_after": sum(r["channels_after"] for r in layers),
        "parameters_before": params_before,
        "parameters_after": params_after,
        "layers": layers,
        "skipped": skipped,
    }
    return details, notes


# ----------------------------------------------------------------------------------------------------------
# Finding producers and tracing their channels


def _producer(node: onnx.NodeProto, facts: _Facts) -> _Producer | None:
    if node.domain not in ("", "ai.onnx") or node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.input) < 2:
        return None
    weight = facts.inits.get(node.input[1])
    if weight is None or weight.data_type != TensorProto.FLOAT or facts.readers.get(weight.name, 0) != 1:
        return None
    dims = [int(d) for d in weight.dims]
    if node.op_type == "Conv":
        if len(dims) < 3 or _attr(node, "group", 1) != 1:
            return None
        return _Producer(node, weight.name, 0, dims[0])
    if len(dims) != 2:
        return None
    if node.op_type == "Gemm":
        axis = 0 if _attr(node, "transB", 0) else 1
        return _Producer(node, weight.name, axis, dims[axis])
    return _Producer(node, weight.name, 1, dims[1])


def _trace(p: _Producer, graph: onnx.GraphProto, facts: _Facts) -> None:
    """Follow ``p``'s channels forward; fill its tracks, edits and sinks, or set ``blocked``."""
    out = p.node.output[0]
    start = _producer_track(p, facts)
    if isinstance(start, str):
        p.blocked = start
        return
    p.tracks[out] = start
    nodes = list(graph.node)
    begin = next(i for i, n in enumerate(nodes) if n is p.node) + 1
    for node in nodes[begin:]:
        traced = [(slot, name) for slot, name in enumerate(node.input) if name in p.tracks]
        if not traced:
            continue
        reason = _follow(p, node, traced, facts)
        if reason is not None:
            p.blocked = reason
            return
    for name in p.tracks:
        if name in facts.outputs:
            p.blocked = "its channels reach a graph output"
            return
        if name in facts.nested:
            p.blocked = "its channels are read inside a subgraph"
            return


def _producer_track(p: _Producer, facts: _Facts) -> _Track | str:
    node, inits = p.node, facts.inits
    bias = np.zeros(p.channels)
    if node.op_type == "Conv":
        rank = len(inits[p.weight].dims)
        axis = 1
        if len(node.input) > 2 and node.input[2]:
            if node.input[2] not in inits:
                return "its bias is computed, not constant"
            bias = numpy_helper.to_array(inits[node.input[2]]).astype(np.float64).reshape(-1)
    elif node.op_type == "Gemm":
        rank, axis = 2, 1
        if len(node.input) > 2 and node.input[2]:
            c = inits.get(node.input[2])
            if c is None:
                return "its bias is computed, not constant"
            values = numpy_helper.to_array(c).astype(np.float64)
            if values.size not in (1, p.channels) or values.ndim > 2 or (values.ndim == 2 and values.shape[0] != 1):
                return f"bias of shape {list(values.shape)} is not per unit"
            bias = np.broadcast_to(values.reshape(-1), (p.channels,)) * float(_attr(node, "beta", 1.0))
        if _attr(node, "transA", 0):
            return "transA Gemm"
    else:
        shape = facts.shapes.get(node.output[0])
        if shape is None:
            return "output rank unknown"
        rank, axis = len(shape), len(shape) - 1
    if bias.shape != (p.channels,):
        return "bias does not match the channels"
    positions = [np.array([c]) for c in range(p.channels)]
    return _Track(axis, rank, p.channels, positions, bias.copy())


def _follow(p: _Producer, node: onnx.NodeProto, traced: list[tuple[int, str]], facts: _Facts) -> str | None:
    """Extend ``p``'s trace through ``node``; returns why not, if it cannot."""
    op, inits = node.op_type, facts.inits
    where = f"{op} {node.name or node.output[0]!r}"
    if node.domain not in ("", "ai.onnx"):
        return f"its channels reach {where}, an op it cannot resize"
    slot, name = traced[0]
    track = p.tracks[name]

    if op in ("Conv", "Gemm", "MatMul"):
        weight = node.input[1] if len(node.input) > 1 else ""
        w = inits.get(weight)
        ok = len(traced) == 1 and slot == 0 and w is not None and w.data_type == TensorProto.FLOAT
        if ok and op == "Conv":
            ok = _attr(node, "group", 1) == 1 and track.axis == 1 and int(w.dims[1]) == track.length
            ok = ok and (len(node.input) < 3 or not node.input[2] or node.input[2] in inits)
        elif ok and op == "Gemm":
            k_axis = 1 if _attr(node, "transB", 0) else 0
            n_out = int(w.dims[1 - k_axis])
            ok = _attr(node, "transA", 0) == 0 and track.axis == 1 and int(w.dims[k_axis]) == track.length
            c = inits.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
            ok = ok and (c is not None or len(node.input) < 3 or not node.input[2])
            ok = ok and (c is None or (int(np.prod(c.dims)) in (1, n_out) and (len(c.dims) < 2 or c.dims[0] == 1)))
        elif ok:
            ok = len(w.dims) == 2 and track.axis == track.rank - 1 and int(w.dims[0]) == track.length
        if not ok:
            return f"its channels reach {where} in a way it cannot resize"
        p.sinks.append((node, name))
        return None

    if op in _UNARY or op in _BINARY or op == "BatchNormalization":
        return _follow_elementwise(p, node, traced, facts, where)

    if op in _POOLS:
        if slot != 0 or track.axis != 1 or (len(node.output) > 1 and node.output[1]):
            return f"its channels reach {where} in a way it cannot resize"
        if op == "AveragePool" and _attr(node, "count_include_pad", 0):
            pads = _attr(node, "pads", [])
            if any(pads) or _attr(node, "auto_pad", b"NOTSET") not in (b"NOTSET", b"VALID", "NOTSET", "VALID"):
                return f"its channels reach {where}, whose zero padding makes removed channels non-constant"
        p.tracks[node.output[0]] = _Track(track.axis, track.rank, track.length, track.positions, track.const)
        return None

    if op in ("Flatten", "Reshape"):
        return _follow_flatten(p, node, traced, facts, where)

    if op == "Concat":
        return _follow_concat(p, node, traced, facts, where)

    return f"its channels reach {where}, an op it cannot resize"


def _follow_elementwise(
    p: _Producer, node: onnx.NodeProto, traced: list[tuple[int, str]], facts: _Facts, where: str
) -> str | None:
    first = p.tracks[traced[0][1]]
    for _, name in traced[1:]:
        other = p.tracks[name]
        if (other.axis, other.rank, other.length) != (first.axis, first.rank, first.length) or not all(
            np.array_equal(a, b) for a, b in zip(other.positions, first.positions, strict=True)
        ):
            return f"its channels meet differently laid out copies of themselves at {where}"
    traced_slots = {slot for slot, _ in traced}
    feeds: dict[str, np.ndarray] = {}
    for slot, name in enumerate(node.input):
        if not name or slot in traced_slots:
            continue
        value = _constant(name, facts)
        if value is None:
            return f"its channels are combined with a computed tensor at {where}"
        feeds[name] = value
        if node.op_type == "BatchNormalization":
            if value.shape != (first.length,) or first.axis != 1:
                return f"its channels reach {where} in a way it cannot resize"
            p.consts.append((node, slot, traced[0][1], "channel"))
        elif value.ndim > first.rank:
            return f"a constant broadcasts its channels to a larger tensor at {where}"
        else:
            p.consts.append((node, slot, traced[0][1], "broadcast"))
    if node.op_type == "Dropout" and len(node.output) > 1 and node.output[1]:
        return f"its channels reach {where}, whose mask output is used"
    if node.op_type == "BatchNormalization" and (_attr(node, "training_mode", 0) or len(node.output) > 1):
        return f"its channels reach {where} in training mode"
    out_shape = facts.shapes.get(node.output[0])
    if out_shape is not None and len(out_shape) != first.rank:
        return f"its channels are broadcast to another rank at {where}"
    const = _evaluate(node, traced, feeds, p.tracks, facts.opset)
    if const is None:
        return f"cannot evaluate {where} on the removed channels' constant outputs"
    p.tracks[node.output[0]] = _Track(first.axis, first.rank, first.length, first.positions, const)
    return None


def _evaluate(
    node: onnx.NodeProto,
    traced: list[tuple[int, str]],
    feeds: dict[str, np.ndarray],
    tracks: dict[str, _Track],
    opset: int,
) -> np.ndarray | None:
    """The node applied to the removed channels' constants: one probe tensor, 1 everywhere but the channel axis."""
    from onnx.reference import ReferenceEvaluator

    track = tracks[traced[0][1]]
    shape = [1] * track.rank
    shape[track.axis] = track.length
    probe_shape = tuple(shape)
    inputs = {}
    for _, name in traced:
        values = np.nan_to_num(tracks[name].const, nan=0.0)
        inputs[name] = values.astype(np.float32).reshape(probe_shape)
    value_infos = [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(probe_shape)) for n in inputs]
    graph = helper.make_graph(
        [node],
        "probe",
        value_infos,
        [helper.make_tensor_value_info(node.output[0], TensorProto.FLOAT, None)],
        [numpy_helper.from_array(v, n) for n, v in feeds.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    try:
        out = np.asarray(ReferenceEvaluator(model).run([node.output[0]], inputs)[0], dtype=np.float64)
    except Exception:  # an op or attribute the reference evaluator lacks: the producer stays unpruned
        return None
    if out.shape != probe_shape:
        return None
    const = out.reshape(-1)
    const[np.isnan(track.const)] = np.nan
    return const


def _follow_flatten(
    p: _Producer, node: onnx.NodeProto, traced: list[tuple[int, str]], facts: _Facts, where: str
) -> str | None:
    """Flatten(axis = channel axis) or an equivalent Reshape: each channel becomes a block of positions."""
    slot, name = traced[0]
    track = p.tracks[name]
    shape = facts.shapes.get(name)
    cannot = f"its channels reach {where}, which does not flatten them into blocks"
    if slot != 0 or len(traced) != 1 or shape is None or len(shape) != track.rank:
        return cannot
    inner = shape[track.axis + 1 :]
    if any(d is None for d in inner):
        return f"{cannot} (spatial size unknown)"
    block = int(np.prod(inner)) if inner else 1
    if node.op_type == "Flatten":
        if _attr(node, "axis", 1) % track.rank != track.axis:
            return cannot
    else:
        target = _constant(node.input[1], facts)
        if target is None or target.ndim != 1 or len(target) != track.axis + 1 or _attr(node, "allowzero", 0):
            return cannot
        last = int(target[-1])
        outer_ok = all(int(t) == 0 or (d is not None and int(t) == d) for t, d in zip(target[:-1], shape, strict=False))
        if last == -1 and not outer_ok:
            return cannot
        if last != -1:
            if last != track.length * block:
                return cannot
            if not outer_ok and sum(int(t) == -1 for t in target[:-1]) != 1:
                return cannot
            p.reshapes.append((node, node.output[0]))
    positions = [(pos[:, None] * block + np.arange(block)).reshape(-1) for pos in track.positions]
    const = np.repeat(track.const, block)
    p.tracks[node.output[0]] = _Track(track.axis, track.axis + 1, track.length * block, positions, const)
    return None


def _follow_concat(
    p: _Producer, node: onnx.NodeProto, traced: list[tuple[int, str]], facts: _Facts, where: str
) -> str | None:
    track = p.tracks[traced[0][1]]
    if _attr(node, "axis", 0) % track.rank != track.axis:
        return f"its channels reach {where} along another axis"
    offsets, total = {}, 0
    for slot, name in enumerate(node.input):
        offsets[slot] = total
        if name in p.tracks:
            total += p.tracks[name].length
            continue
        shape = facts.shapes.get(name)
        if shape is None or len(shape) != track.rank or shape[track.axis] is None:
            return f"its channels reach {where}, whose other inputs have unknown sizes"
        total += int(shape[track.axis])
    const = np.full(total, np.nan)
    positions = [np.zeros(0, dtype=np.int64) for _ in track.positions]
    for slot, name in traced:
        t = p.tracks[name]
        const[offsets[slot] : offsets[slot] + t.length] = t.const
        positions = [np.concatenate([a, b + offsets[slot]]) for a, b in zip(positions, t.positions, strict=True)]
    p.tracks[node.output[0]] = _Track(track.axis, track.rank, total, positions, const)
    return None


# ----------------------------------------------------------------------------------------------------------
# Rewriting the graph


def _apply(graph: onnx.GraphProto, active: list[_Producer], facts: _Facts) -> None:
    """Resize producers, the constants on their channels' way, and the consumers (folding removed constants)."""
    inits, constants, readers = facts.inits, facts.constants, facts.readers
    removed: dict[str, set[int]] = {}
    value: dict[str, np.ndarray] = {}
    for p in active:
        assert p.keep is not None
        dropped = sorted(set(range(p.channels)) - set(p.keep.tolist()))
        for name, track in p.tracks.items():
            where = removed.setdefault(name, set())
            where.update(int(i) for c in dropped for i in track.positions[c])
            base = value.setdefault(name, np.full(track.length, np.nan))
            known = ~np.isnan(track.const)
            base[known] = track.const[known]
    loaded: dict[str, np.ndarray] = {}

    def original(name: str) -> np.ndarray:
        if name not in loaded:
            loaded[name] = numpy_helper.to_array(inits[name]).astype(np.float32)
        return loaded[name]

    new_values: dict[str, np.ndarray] = {}
    out_keep = {id(p.node): p.keep for p in active}

    # Consumers first, from the original weights: fold then drop their input features.
    deltas: dict[int, np.ndarray] = {}
    done: set[int] = set()
    for p in active:
        for node, name in p.sinks:
            if id(node) in done:
                continue
            done.add(id(node))
            gone = np.array(sorted(removed[name]), dtype=np.int64)
            constant = value[name][gone]
            weight = node.input[1]
            w = new_values[weight] if weight in new_values else original(weight)
            if node.op_type == "Conv":
                deltas[id(node)] = (w[:, gone].reshape(w.shape[0], gone.size, -1).sum(axis=2) * constant).sum(axis=1)
                new_values[weight] = np.delete(w, gone, axis=1)
            elif node.op_type == "Gemm":
                alpha = float(_attr(node, "alpha", 1.0))
                if _attr(node, "transB", 0):
                    deltas[id(node)] = alpha * (w[:, gone] @ constant)
                    new_values[weight] = np.delete(w, gone, axis=1)
                else:
                    deltas[id(node)] = alpha * (constant @ w[gone, :])
                    new_values[weight] = np.delete(w, gone, axis=0)
            else:
                deltas[id(node)] = constant @ w[gone, :]
                new_values[weight] = np.delete(w, gone, axis=0)

    # Producers: keep their chosen output channels (of the weight after any consumer-side resizing).
    for p in active:
        w = new_values[p.weight] if p.weight in new_values else original(p.weight)
        new_values[p.weight] = np.take(w, p.keep, axis=p.out_axis)

    # Biases: producers' sliced, consumers' shifted by the folded constants.
    extra_nodes: dict[int, onnx.NodeProto] = {}
    nodes = {id(n): n for p in active for n in [p.node, *(s for s, _ in p.sinks)]}
    for key, node in nodes.items():
        keep = out_keep.get(key)
        delta = deltas.get(key)
        if node.op_type == "MatMul":
            if delta is not None and np.any(delta):
                extra_nodes[key] = _matmul_bias(graph, node, delta if keep is None else delta[keep])
            continue
        weight = original(node.input[1])
        channels = weight.shape[0 if node.op_type == "Conv" else _gemm_out_axis(node)]
        has_bias = len(node.input) > 2 and bool(node.input[2])
        if not has_bias and delta is None:
            continue
        bias = np.zeros(channels)
        if has_bias:
            scale = float(_attr(node, "beta", 1.0)) if node.op_type == "Gemm" else 1.0
            bias = np.broadcast_to(original(node.input[2]).astype(np.float64).reshape(-1) * scale, (channels,))
        if node.op_type == "Gemm":
            _set_attr(node, "beta", 1.0)  # beta is folded into the stored bias
        if delta is not None:
            bias = bias + delta
        if keep is not None:
            bias = bias[keep]
        name = node.input[2] if has_bias and readers.get(node.input[2], 0) == 1 else f"{node.output[0]}_bias"
        while len(node.input) < 3:
            node.input.append("")
        node.input[2] = name
        new_values[name] = bias.astype(np.float32)

    # Constants along the way: per-channel operands and BatchNormalization parameters.
    seen: set[tuple[int, int]] = set()
    for p in active:
        for node, slot, tensor, kind in p.consts:
            if (id(node), slot) in seen:
                continue
            seen.add((id(node), slot))
            gone = sorted(removed.get(tensor, ()))
            if not gone:
                continue
            name = node.input[slot]
            c = new_values[name] if name in new_values else original(name) if name in inits else constants.get(name)
            assert c is not None
            track = p.tracks[tensor]
            axis = 0 if kind == "channel" else track.axis - (track.rank - c.ndim)
            if axis < 0 or c.shape[axis] != track.length or track.length == 1:
                continue
            # Resized in place when only this node reads it (names stay those of the per-layer table), else a copy.
            fresh = name if name in inits and readers.get(name, 0) == 1 else f"{name}_pruned_{len(new_values)}"
            new_values[fresh] = np.delete(c, gone, axis=axis)
            node.input[slot] = fresh
        for node, tensor in p.reshapes:
            key = (id(node), 1)
            if key in seen:
                continue
            seen.add(key)
            target = _constant(node.input[1], facts)
            assert target is not None
            target = target.astype(np.int64).copy()
            target[-1] = p.tracks[tensor].length - len(removed.get(tensor, ()))
            fresh = f"{node.input[1]}_pruned_{len(new_values)}"
            new_values[fresh] = target
            node.input[1] = fresh

    _write(graph, new_values, inits)
    if extra_nodes:
        rebuilt = []
        for node in graph.node:
            rebuilt.append(node)
            if id(node) in extra_nodes:
                rebuilt.append(extra_nodes[id(node)])
        graph.ClearField("node")
        graph.node.extend(rebuilt)
    used = {name for g in _all_subgraphs(graph) for n in g.node for name in n.input}
    kept = [t for t in graph.initializer if t.name in used or t.name in {o.name for o in graph.output}]
    graph.ClearField("initializer")
    graph.initializer.extend(kept)
    # Recorded intermediate shapes are stale now; ONNX Runtime infers them again.
    graph.ClearField("value_info")


def _matmul_bias(graph: onnx.GraphProto, node: onnx.NodeProto, delta: np.ndarray) -> onnx.NodeProto:
    """Add the folded constants after a MatMul consumer: its output is renamed and an Add restores the name."""
    out = node.output[0]
    node.output[0] = f"{out}_unbiased"
    name = f"{out}_folded_bias"
    graph.initializer.append(numpy_helper.from_array(delta.astype(np.float32), name))
    return helper.make_node("Add", [node.output[0], name], [out], name=f"{node.name or out}_folded_bias")


def _write(graph: onnx.GraphProto, values: dict[str, np.ndarray], inits: dict[str, TensorProto]) -> None:
    for name, array in values.items():
        if name in inits:
            dtype = helper.tensor_dtype_to_np_dtype(inits[name].data_type)
            inits[name].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(array.astype(dtype)), name))
        else:
            graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(array), name))


def _check_same_outputs(backend: OnnxBackend, original: Path, pruned: Path, device: str) -> None:
    """The pruned model must load and give outputs of the original's shapes; anything else is our bug."""
    inputs = backend.example_inputs(original, 2)
    try:
        expected = [o.shape for o in backend.open_runner(original, device)(inputs)]
        got = [o.shape for o in backend.open_runner(pruned, device)(inputs)]
    except CompressionError as exc:
        if exc.code == "device_unavailable":
            raise
        raise CompressionError("pruning_failed", f"the pruned model does not run: {exc.message}") from exc
    except Exception as exc:  # ORT's own errors
        raise CompressionError("pruning_failed", _message("the pruned model does not run", exc)) from exc
    if expected != got:
        raise CompressionError("pruning_failed", f"the pruned model's outputs have shapes {got}, not {expected}")


# ----------------------------------------------------------------------------------------------------------
# Graph facts


def _readers(model: onnx.ModelProto) -> dict[str, int]:
    counts: dict[str, int] = {}
    for g in _all_subgraphs(model.graph):
        for node in g.node:
            for name in node.input:
                counts[name] = counts.get(name, 0) + 1
    for o in model.graph.output:
        counts[o.name] = counts.get(o.name, 0) + 1
    return counts


def _names_used_in_subgraphs(graph: onnx.GraphProto) -> set[str]:
    names: set[str] = set()
    for g in list(_all_subgraphs(graph))[1:]:
        for node in g.node:
            names.update(node.input)
    return names


def _constant_nodes(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    values = {}
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            for a in node.attribute:
                if a.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(a.t)
    return values


def _constant(name: str, facts: _Facts) -> np.ndarray | None:
    if name in facts.inits:
        return numpy_helper.to_array(facts.inits[name])
    return facts.constants.get(name)


def _shapes(model: onnx.ModelProto) -> dict[str, list[int | None]]:
    """Static shapes ONNX shape inference finds (symbolic dims: None)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # shape inference is best effort; without it, fewer layers can be traced
        inferred = model
    shapes: dict[str, list[int | None]] = {}
    g = inferred.graph
    for v in [*g.input, *g.value_info, *g.output]:
        if v.type.HasField("tensor_type") and v.type.tensor_type.HasField("shape"):
            shapes[v.name] = [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
    for t in g.initializer:
        shapes[t.name] = [int(d) for d in t.dims]
    return shapes


def _gemm_out_axis(node: onnx.NodeProto) -> int:
    return 0 if _attr(node, "transB", 0) else 1


def _attr(node: onnx.NodeProto, name: str, default: Any) -> Any:
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _set_attr(node: onnx.NodeProto, name: str, value: float) -> None:
    for a in node.attribute:
        if a.name == name:
            node.attribute.remove(a)
            break
    node.attribute.append(helper.make_attribute(name, value))
