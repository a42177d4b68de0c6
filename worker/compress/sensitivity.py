"""Per-layer sensitivity: how much the job's metric changes when only one layer is compressed.

For each prunable layer, the job's pruning and quantization steps are emulated on that layer's weights alone
(numpy: the masks the steps would apply, and a quantize-dequantize round trip at the step's bit width), the model
is run with just that layer changed on (a head of) the job's dataset, and the metric compared. The metric is top-1
accuracy when the data has labels, else the cosine similarity of the outputs with the original's. The variants are
made in memory where the backend can (``weight_swapper``: ONNX Runtime sessions with one initializer replaced on
CPU; the live torch model's tensor copied in place), else written as model files: same values, ~4x faster. This is the
standard one-layer-at-a-time analysis (as in NNCF's and AIMET's sensitivity reports); it ranks layers for mixed
sparsity and precision, which the search (issue 6) builds on.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np

from app.jobs.spec import (
    EvalOptions,
    PruneMagnitude,
    PruneStructured,
    PruneWanda,
    QuantizeBf16,
    QuantizeFp16,
    QuantizeInt4WeightOnly,
    Step,
    parse_pattern,
)
from worker.compress import evaluate
from worker.compress.backend import FormatBackend
from worker.compress.pruning import channel_keep, layer_overrides, nm_mask, output_axis, score_masks
from worker.compress.types import EvalData, ModelMetrics

MAX_AUTO_LAYERS = 64
MAX_AUTO_PARAMETERS = 20_000_000
SENSITIVITY_SAMPLES = 512


def emulate(name: str, weight: np.ndarray, axis: int, steps: list[Step]) -> np.ndarray:
    """``weight`` after the job's pruning and quantization steps, applied to this layer alone."""
    w = weight.astype(np.float32, copy=True)
    for step in steps:
        if step.op == "prune":
            w = w * _prune_mask(name, w, axis, step)
        elif step.op == "quantize":
            excluded = getattr(step, "exclude", None)
            if excluded and layer_overrides([name], dict.fromkeys(excluded, 0.0)):
                continue
            w = _fake_quantize(w, axis, step)
    return w


def _prune_mask(name: str, w: np.ndarray, axis: int, step: Any) -> np.ndarray:
    overrides = getattr(step, "overrides", None) or {}
    pattern = getattr(step, "pattern", None)
    if pattern:
        n, m = parse_pattern(pattern)
        if layer_overrides([name], overrides).get(name) == 0.0:
            return np.ones(w.shape, dtype=bool)
        return nm_mask(np.abs(w), n, m, axis)
    if isinstance(step, PruneMagnitude | PruneWanda):
        sparsity = step.target_sparsity if isinstance(step, PruneMagnitude) else step.sparsity or 0.0
    else:
        sparsity = step.sparsity
    sparsity = layer_overrides([name], overrides).get(name, sparsity)
    if isinstance(step, PruneStructured):
        out = output_axis(w.ndim, axis)
        moved = np.moveaxis(w, out, 0)
        rows = (np.abs(moved) if step.norm == "l1" else moved * moved).reshape(moved.shape[0], -1).sum(axis=1)
        keep_rows = channel_keep(rows, sparsity, step.round_to)
        shape = [1] * w.ndim
        shape[out] = -1
        return np.broadcast_to(keep_rows.reshape(shape), w.shape)
    # gradient, regularized and wanda rank by more than magnitude; magnitude is the layer-local stand-in.
    return score_masks({name: np.abs(w)}, sparsity, "per_layer")[name]


def _fake_quantize(w: np.ndarray, axis: int, step: Any) -> np.ndarray:
    if isinstance(step, QuantizeFp16):
        return w.astype(np.float16).astype(np.float32)
    if isinstance(step, QuantizeBf16):
        bits = w.view(np.uint32) + np.uint32(0x7FFF) + ((w.view(np.uint32) >> 16) & 1)
        return (bits & np.uint32(0xFFFF0000)).view(np.float32)
    if isinstance(step, QuantizeInt4WeightOnly):
        return _quantize_groups(w, axis, 4, step.group_size)
    group = getattr(step, "group_size", None)
    return _quantize_groups(w, axis, 8, group) if group else _quantize_channels(w, 8)


def _quantize_channels(w: np.ndarray, bits: int) -> np.ndarray:
    """Symmetric per-output-channel (axis 0) round trip."""
    qmax = 2 ** (bits - 1) - 1
    flat = w.reshape(w.shape[0], -1) if w.ndim > 1 else w.reshape(1, -1)
    scale = np.abs(flat).max(axis=1, keepdims=True) / qmax
    scale[scale == 0] = 1.0
    return (np.clip(np.round(flat / scale), -qmax - 1, qmax) * scale).reshape(w.shape)


def _quantize_groups(w: np.ndarray, axis: int, bits: int, group: int) -> np.ndarray:
    """Symmetric round trip in groups of ``group`` consecutive weights along the reduction axis."""
    moved = np.moveaxis(w, axis, -1)
    k = moved.shape[-1]
    pad = (-k) % group
    padded = np.concatenate([moved, np.zeros((*moved.shape[:-1], pad), dtype=w.dtype)], axis=-1)
    groups = padded.reshape(-1, group)
    qmax = 2 ** (bits - 1) - 1
    scale = np.abs(groups).max(axis=1, keepdims=True) / qmax
    scale[scale == 0] = 1.0
    rounded = np.clip(np.round(groups / scale), -qmax - 1, qmax) * scale
    out = rounded.reshape(*moved.shape[:-1], k + pad)[..., :k]
    return np.moveaxis(out, -1, axis)


def layer_sensitivity(
    backend: FormatBackend,
    model_path: Path,
    steps: list[Step],
    data: EvalData,
    options: EvalOptions,
    device: str,
    baseline: ModelMetrics,
    workdir: Path,
) -> list[str]:
    """Fill ``sensitivity`` in the baseline's per-layer rows; returns notes for the report."""
    weights_of = getattr(backend, "prunable_weights", None)
    write = getattr(backend, "with_weights", None)
    if weights_of is None or write is None or baseline.layers is None:
        return [f"per-layer sensitivity is not available for {backend.name} models"]
    compress_steps = [s for s in steps if s.op in ("prune", "quantize")]
    weights = weights_of(model_path)
    if options.layer_sensitivity == "auto" and (
        len(weights) > MAX_AUTO_LAYERS or sum(w.size for w, _ in weights.values()) > MAX_AUTO_PARAMETERS
    ):
        return [
            f"per-layer sensitivity skipped ({len(weights)} layers): ask for it with "
            '"evaluation": {"layer_sensitivity": "on"}'
        ]
    head = data.head(min(SENSITIVITY_SAMPLES, data.num_samples))
    # Where the backend can swap a weight in memory (a fresh ONNX Runtime session; the loaded torch model changed in
    # place), no variant is written. The reference then comes from the swapper too (for ONNX, the same unoptimized
    # kind of session), so an unchanged layer measures exactly 0.
    swapper_of = getattr(backend, "weight_swapper", None)
    swapper = swapper_of(model_path, device) if swapper_of is not None else None
    reference_runner = swapper.open({}) if swapper is not None else None
    if reference_runner is None:
        swapper = None
        reference_runner = backend.open_runner(model_path, device)
    reference = evaluate.run_batched(reference_runner, head, options.batch_size)
    del reference_runner
    metric = "accuracy" if evaluate.accuracy(reference, head.labels) is not None else "cosine"
    base_value = _metric(reference, reference, head)
    results: dict[str, float] = {}
    scratch = workdir / "sensitivity"
    scratch.mkdir(exist_ok=True)
    try:
        for i, (name, (w, axis)) in enumerate(weights.items()):
            changed = {name: emulate(name, w, axis, compress_steps).astype(w.dtype)}
            runner = swapper.open(changed) if swapper is not None else None
            path = scratch / f"layer{i}{backend.suffix}"
            if runner is None:
                write(model_path, path, changed)
                runner = backend.open_runner(path, device)
            outputs = evaluate.run_batched(runner, head, options.batch_size)
            del runner
            results[name] = round(_metric(outputs, reference, head) - base_value, 6)
            path.unlink(missing_ok=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    for row in baseline.layers:
        if row["name"] in results:
            row["sensitivity"] = results[row["name"]]
    worst = sorted(results.items(), key=lambda kv: kv[1])[:3]
    return [
        f"per-layer sensitivity ({metric} change when only that layer is compressed, {head.num_samples} "
        f"samples): most sensitive {', '.join(f'{n} {v:+.4f}' for n, v in worst)}"
    ]


def _metric(outputs: list[np.ndarray], reference: list[np.ndarray], data: EvalData) -> float:
    accuracy = evaluate.accuracy(outputs, data.labels)
    if accuracy is not None:
        return accuracy
    return float(evaluate.compare(reference, outputs, None, data.inputs.get("attention_mask"))["cosine"])
