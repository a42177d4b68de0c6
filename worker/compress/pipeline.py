"""Run a job's steps on a model file and measure the result against the original.

Pure: takes paths, a spec and numpy data; returns numbers and an output path. The Celery task wraps it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from app.jobs.spec import EvalOptions, PruneMagnitude, Step
from worker.compress import evaluate
from worker.compress.backend import FormatBackend, get_backend
from worker.compress.types import (
    CompressionError,
    EvalData,
    ModelMetrics,
    PipelineResult,
    ProgressFn,
    StepReport,
)


def _noop(fraction: float, stage: str) -> None:
    return None


def measure(
    backend: FormatBackend,
    path: Path,
    device: str,
    data: EvalData | None,
    options: EvalOptions,
    reference: list[np.ndarray] | None,
) -> tuple[ModelMetrics, list[np.ndarray] | None]:
    """Metrics of the model at ``path``; returns its outputs on ``data`` too (the baseline's become the reference)."""
    runner = backend.open_runner(path, device)
    total, nonzero = backend.count_parameters(path)
    outputs = None
    metrics = ModelMetrics(
        size_bytes=backend.stored_size(path),
        parameters=total,
        nonzero_parameters=nonzero,
        sparsity=round(1.0 - nonzero / total, 6) if total else 0.0,
        device=device,
        runtime=runner.runtime,
    )
    if data is not None:
        try:
            outputs = evaluate.run_batched(runner, data, options.batch_size)
        except CompressionError:
            raise
        except Exception as exc:  # the runtime's own message is what the user needs to fix the data
            raise CompressionError(
                "evaluation_failed", f"running the model on the dataset failed: {exc}"[:2000]
            ) from exc
        metrics.samples = data.num_samples
        metrics.accuracy = evaluate.accuracy(outputs, data.labels)
        if reference is not None:
            fid = evaluate.compare(reference, outputs, data.labels, data.inputs.get("attention_mask"))
            metrics.cosine, metrics.max_abs_error, metrics.agreement = (
                fid["cosine"],
                fid["max_abs_error"],
                fid["agreement"],
            )
        else:
            metrics.cosine, metrics.max_abs_error = 1.0, 0.0
            metrics.agreement = 1.0 if outputs[0].ndim == 2 else None
        bs = getattr(runner, "fixed_batch", None) or min(options.batch_size, data.num_samples)
        batch = {k: v[:bs] for k, v in data.inputs.items()}
    else:
        batch = backend.example_inputs(path, getattr(runner, "fixed_batch", None) or options.batch_size)
    metrics.latency_ms = evaluate.measure_latency(runner, batch, options.warmup_runs, options.latency_runs)
    return metrics, outputs


def run_pipeline(
    *,
    model_path: Path,
    fmt: str,
    steps: list[Step],
    data: EvalData | None,
    options: EvalOptions,
    device: str,
    workdir: Path,
    progress: ProgressFn = _noop,
) -> PipelineResult:
    """Baseline → each step in order → result, all measured on ``device`` with the same data and options."""
    backend = get_backend(fmt)
    if data is not None and data.num_samples > options.max_samples:
        data = data.head(options.max_samples)
    total_stages = len(steps) + 2
    progress(0.0, "baseline")
    baseline, reference = measure(backend, model_path, device, data, options, None)
    if not steps:
        progress(1.0, "done")
        return PipelineResult(None, backend.name, baseline, None, [], [])

    reports: list[StepReport] = []
    current = model_path
    for i, step in enumerate(steps, start=1):
        progress(i / total_stages, f"{step.op}:{step.method}")
        dst = workdir / f"step{i}{backend.suffix}"
        if isinstance(step, PruneMagnitude):
            report = backend.prune_magnitude(current, dst, step)
        else:
            report = backend.quantize(current, dst, step, data, device)
        reports.append(report)
        current = dst

    progress((total_stages - 1) / total_stages, "evaluate")
    result, _ = measure(backend, current, device, data, options, reference)
    notes = [n for r in reports for n in r.notes]
    if result.sparsity > 0.01 and result.size_bytes >= baseline.size_bytes * (1.0 - result.sparsity / 2):
        notes.append(
            f"The artifact stores pruned weights densely: {result.sparsity:.1%} of the parameters are zero but "
            f"the file is {result.size_bytes / max(baseline.size_bytes, 1):.2f}x the original's size. "
            "Zeros compress well with a general-purpose compressor; the on-disk size shown is the real one."
        )
    final = workdir / f"result{backend.suffix}"
    _move_model(current, final, backend)
    progress(1.0, "done")
    return PipelineResult(final, backend.name, baseline, result, reports, notes)


def _move_model(src: Path, dst: Path, backend: FormatBackend) -> None:
    if backend.name == "onnx" and Path(str(src) + ".data").exists():
        # Keep external data beside a renamed model only if the model refers to it by this name.
        raise CompressionError("internal_error", "ONNX models with external data must be saved self-contained")
    shutil.move(src, dst)
