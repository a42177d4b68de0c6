"""Wanda pruning (Sun et al. 2023, "A Simple and Effective Pruning Approach for Large Language Models") for ONNX.

Each weight of a MatMul/Gemm layer is scored by ``|W_ij| * ||X_j||_2``, the norm of its input feature over the
calibration tokens, and the lowest-scoring weights of each output neuron are zeroed (Wanda's comparison group), to
``sparsity`` or N:M along the input axis. The input norms come from one ONNX Runtime pass over the job's data with
every pruned layer's input added as a graph output; padded tokens (``attention_mask`` 0) are left out. No weight is
updated, so no gradient or second-order information is needed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from app.jobs.spec import PruneWanda, parse_pattern
from worker.compress.onnx_format import (
    OnnxBackend,
    _graph_inputs,
    _load_model,
    _message,
    _prunable_initializers,
    _save_model,
    _scratch,
    session_options,
)
from worker.compress.pruning import nm_mask, row_keep
from worker.compress.types import CompressionError, EvalData, StepContext, StepReport

_BATCH = 32


def wanda_step(backend: OnnxBackend, src: Path, dst: Path, step: PruneWanda, ctx: StepContext) -> StepReport:
    """``OnnxBackend.prune_wanda``: collect input norms on the job's data, prune each output row, save."""
    if ctx.data is None:
        raise CompressionError("dataset_required", "wanda scores weights by input activations: the job needs a dataset")
    model = _load_model(src)
    layers = _layers(model)
    if not layers:
        raise CompressionError("nothing_to_prune", "wanda prunes MatMul and Gemm layers with a constant weight")
    data = ctx.data.head(step.calibration_samples)
    with _scratch(dst) as scratch:
        try:
            norms = _input_norms(model, layers, data, scratch, ctx.device)
        except CompressionError:
            raise
        except Exception as exc:  # ORT's own errors on the user's graph or data
            raise CompressionError("calibration_failed", _message("running the model for wanda failed", exc)) from exc
    weights = backend.prunable_weights(src)
    pattern = parse_pattern(step.pattern) if step.pattern else None
    new: dict[str, np.ndarray] = {}
    rows = []
    for name, (tensor_in, k_axis) in layers.items():
        w, _ = weights[name]
        scores = np.abs(w.astype(np.float32)) * np.expand_dims(norms[tensor_in], 1 - k_axis)
        keep = nm_mask(scores, *pattern, k_axis) if pattern else row_keep(scores, step.sparsity or 0.0, k_axis)
        new[name] = np.where(keep, w, np.zeros((), dtype=w.dtype))
        rows.append({"name": name, "shape": list(w.shape), "sparsity": round(1 - float(keep.mean()), 6)})
    backend.with_weights(src, dst, new)
    pruned = sum(w.size for w in new.values())
    zeros = sum(int(w.size - np.count_nonzero(w)) for w in new.values())
    other = [n for n in weights if n not in layers]
    notes = [f"wanda leaves {len(other)} Conv/other layer(s) unpruned: it scores MatMul/Gemm inputs"] if other else []
    details: dict[str, Any] = {
        "pattern": step.pattern,
        "requested_sparsity": step.sparsity if pattern is None else 1 - pattern[0] / pattern[1],
        "achieved_sparsity": round(zeros / pruned, 6) if pruned else 0.0,
        "calibration_samples": data.num_samples,
        "comparison_group": "each output neuron's weights" if pattern is None else "N:M groups along the input axis",
        "layers": rows,
    }
    return StepReport(op="prune", method="wanda", details=details, notes=notes)


def _layers(model: onnx.ModelProto) -> dict[str, tuple[str, int]]:
    """Prunable MatMul/Gemm weights -> (the input tensor whose features they weigh, the weight's K axis)."""
    prunable = _prunable_initializers(model)
    found: dict[str, tuple[str, int]] = {}
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2 or node.input[1] not in prunable:
            continue
        weight = prunable[node.input[1]]
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if len(weight.dims) != 2 or node.input[0] in prunable or attrs.get("transA", 0):
            continue
        k_axis = 1 if node.op_type == "Gemm" and attrs.get("transB", 0) else 0
        found.setdefault(node.input[1], (node.input[0], k_axis))
    # A weight read by two layers would need both inputs' norms; leave it to magnitude pruning.
    readers: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    return {name: v for name, v in found.items() if readers.get(name) == 1}


def _input_norms(
    model: onnx.ModelProto, layers: dict[str, tuple[str, int]], data: EvalData, scratch: Path, device: str
) -> dict[str, np.ndarray]:
    """||X_j||_2 over every calibration token of each layer's input, padded tokens left out."""
    wanted = sorted({tensor for tensor, _ in layers.values()})
    graph_inputs = {i.name for i in model.graph.input}
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    existing = {o.name for o in probe.graph.output}
    for name in wanted:
        if name not in existing and name not in graph_inputs:
            probe.graph.output.append(helper.make_empty_tensor_value_info(name))
    path = scratch / "wanda_probe.onnx"
    _save_model(probe, path)
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
    session = ort.InferenceSession(str(path), sess_options=session_options(), providers=providers)
    specs = _graph_inputs(model)
    missing = [s.name for s in specs if s.name not in data.inputs]
    if missing:
        raise CompressionError("input_mismatch", f"the dataset has no array for model input(s) {missing}")
    outputs = [o.name for o in session.get_outputs()]
    fixed = specs[0].shape[0] if specs and specs[0].shape else None
    batch_size = fixed or _BATCH
    sums: dict[str, np.ndarray] = {}
    for start in range(0, data.num_samples, batch_size):
        feed = {s.name: data.inputs[s.name][start : start + batch_size].astype(s.dtype) for s in specs}
        real = len(next(iter(feed.values())))
        if fixed and real < fixed:  # a fixed batch dimension: pad with copies, counted once below
            feed = {k: np.concatenate([v, np.repeat(v[:1], fixed - real, axis=0)]) for k, v in feed.items()}
        results = dict(zip(outputs, session.run(outputs, feed), strict=True))
        mask = feed.get("attention_mask")
        for name in wanted:
            x = np.asarray(results[name] if name in results else feed[name], dtype=np.float64)[:real]
            if mask is not None and x.ndim == 3 and x.shape[:2] == mask[:real].shape:
                x = x * (mask[:real] != 0)[..., None]
            squares = (x.reshape(-1, x.shape[-1]) ** 2).sum(axis=0)
            sums[name] = sums.get(name, 0.0) + squares
    return {name: np.sqrt(v).astype(np.float32) for name, v in sums.items()}
