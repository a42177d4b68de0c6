"""Run a job's steps on a model file and measure the result against the original.

Pure: takes paths, a spec and numpy data; returns numbers and an output path. The Celery task wraps it.

Each step is dispatched to its format's backend by name: ``backend.<op>_<method>(src, dst, step, ctx)`` (e.g.
``prune_structured``, ``quantize_int4_weight_only``, ``convert_onnx``), with the older generic entry points
``prune_magnitude`` and ``quantize`` as fallbacks. A step may change the format (its report's ``output_format``);
later steps and the final measurement then use that format's backend.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np

from app.jobs.spec import EvalOptions, Step, trains
from worker.compress import evaluate
from worker.compress.backend import FormatBackend, get_backend
from worker.compress.types import (
    MAX_TRAIN_SAMPLES,
    CompressionError,
    EvalData,
    ModelMetrics,
    PipelineResult,
    ProgressFn,
    Runner,
    StepContext,
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
    kernels: bool = False,
) -> tuple[ModelMetrics, list[np.ndarray] | None]:
    """Metrics of the model at ``path``; returns its outputs on ``data`` too (the baseline's become the reference).

    ``kernels``: on CUDA, let the backend run the model with its faster kernel layouts where it has them
    (``open_kernel_runner``: .pt2's 2:4 sparse and torchao weight-only kernels); ``metrics.kernels`` says which.
    """
    open_kernel_runner = getattr(backend, "open_kernel_runner", None) if kernels and device == "cuda" else None
    runner = open_kernel_runner(path, device) if open_kernel_runner else backend.open_runner(path, device)
    total, nonzero = backend.count_parameters(path)
    outputs = None
    metrics = ModelMetrics(
        size_bytes=backend.stored_size(path),
        parameters=total,
        nonzero_parameters=nonzero,
        sparsity=round(1.0 - nonzero / total, 6) if total else 0.0,
        device=device,
        runtime=runner.runtime,
        kernels=getattr(runner, "kernels", None),
    )
    layer_table = getattr(backend, "layers", None)
    if layer_table is not None:
        metrics.layers = layer_table(path)
    if data is not None:
        outputs = run_on_data(runner, data, options)
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


def run_on_data(runner: Runner, data: EvalData, options: EvalOptions) -> list[np.ndarray]:
    """The model's outputs on the whole dataset; a runtime failure becomes ``evaluation_failed``."""
    try:
        return evaluate.run_batched(runner, data, options.batch_size)
    except CompressionError:
        raise
    except Exception as exc:  # the runtime's own message is what the user needs to fix the data
        raise CompressionError("evaluation_failed", f"running the model on the dataset failed: {exc}"[:2000]) from exc


def apply_step(backend: FormatBackend, step: Step, src: Path, dst: Path, ctx: StepContext) -> StepReport:
    """Run one step with the backend of the format it receives."""
    handler = getattr(backend, f"{step.op}_{step.method}", None)
    if handler is not None:
        return handler(src, dst, step, ctx)  # type: ignore[no-any-return]
    if step.op == "encode" and step.method == "squeeze":
        from worker.compress.squeeze_format import encode_squeeze

        return encode_squeeze(backend, src, dst, step, ctx)
    if step.op == "quantize":
        return backend.quantize(src, dst, step, ctx.data, ctx.device)  # type: ignore[arg-type]
    raise CompressionError(
        "method_not_supported", f"{step.op}/{step.method} is not implemented for {backend.name} models"
    )


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
    train_data: EvalData | None = None,
) -> PipelineResult:
    """Baseline → each step in order → result, all measured on ``device`` with the same data and options.

    ``train_data``: what the training steps train on (the job's train dataset); everything else uses ``data``.
    """
    backend = get_backend(fmt)
    if data is not None and data.num_samples > options.max_samples:
        data = data.head(options.max_samples)
    sensitivity_wanted = _sensitivity_wanted(options, data, steps)
    total_stages = len(steps) + 2 + int(sensitivity_wanted)
    progress(0.0, "baseline")
    baseline, reference = measure(backend, model_path, device, data, options, None)
    if not steps:
        progress(1.0, "done")
        return PipelineResult(None, backend.name, baseline, None, [], [])

    stage = 1
    notes: list[str] = []
    if sensitivity_wanted:
        from worker.compress.sensitivity import layer_sensitivity

        progress(stage / total_stages, "sensitivity")
        assert data is not None
        notes += layer_sensitivity(backend, model_path, steps, data, options, device, baseline, workdir)
        stage += 1

    train_reference = None
    if train_data is not None:
        if train_data.num_samples > MAX_TRAIN_SAMPLES:
            notes.append(
                f"The train dataset has {train_data.num_samples} samples; training steps use the first "
                f"{MAX_TRAIN_SAMPLES}."
            )
            train_data = train_data.head(MAX_TRAIN_SAMPLES)
        train_reference = _train_reference(backend, model_path, device, train_data, options)
    ctx = StepContext(
        data=data,
        device=device,
        original=model_path,
        original_format=fmt,
        workdir=workdir,
        reference=reference,
        train_data=train_data,
        train_reference=train_reference,
    )
    reports: list[StepReport] = []
    current = model_path
    for i, step in enumerate(steps, start=1):
        progress(stage / total_stages, f"{step.op}:{step.method}")
        stage += 1
        out_backend = get_backend(_produces(backend.name, step))
        dst = workdir / f"step{i}{out_backend.suffix}"
        calibrates = train_data is not None and not trains(step) and _needs_dataset(backend.name, step)
        report = apply_step(backend, step, current, dst, ctx)
        if calibrates:
            report.notes.append(
                f"{step.op}/{step.method} used the job's dataset_id, not its train_dataset_id: only the training "
                "steps train on train_dataset_id."
            )
        if report.output_format is not None and report.output_format != backend.name:
            out_backend = get_backend(report.output_format)
        backend = out_backend
        reports.append(report)
        current = dst

    progress(stage / total_stages, "evaluate")
    result, _ = measure(backend, current, device, data, options, reference, kernels=True)
    notes += [n for r in reports for n in r.notes]
    if result.kernels is not None and (note := _kernels_note(result.kernels)):
        notes.append(note)
    if result.sparsity > 0.01 and result.size_bytes >= baseline.size_bytes * (1.0 - result.sparsity / 2):
        notes.append(
            f"The artifact stores pruned weights densely: {result.sparsity:.1%} of the parameters are zero but "
            f"the file is {result.size_bytes / max(baseline.size_bytes, 1):.2f}x the original's size. "
            'Add a final {"op": "encode", "method": "squeeze"} step to store them sparsely; the on-disk size '
            "shown is the real one."
        )
    final = workdir / f"result{backend.suffix}"
    _move_model(current, final, backend)
    progress(1.0, "done")
    return PipelineResult(final, backend.name, baseline, result, reports, notes)


def _kernels_note(kernels: dict[str, Any]) -> str | None:
    """What the result's CUDA measurement ran on and how to get the same speed; None if nothing applied."""
    if kernels["used"]:
        return (
            f"Measured on CUDA with faster Linear kernels ({kernels['semi_structured_2_4']} 2:4 sparse, "
            f"{kernels['torchao_int4']} torchao int4, {kernels['torchao_int8']} torchao int8; output check cosine "
            f"{kernels['check_cosine']}). The artifact stores portable dense weights or codes: to run at this speed, "
            "load it with torch.export.load and give its Linear weights the same layouts (torch.sparse."
            "to_sparse_semi_structured for 2:4 weights in float16/bfloat16; torchao tensors for int4/int8)."
        )
    reasons = kernels["fallback"] or "; ".join(f"{k}: {v}" for k, v in list(kernels["skipped"].items())[:3])
    return f"Measured on CUDA with the plain kernels: {reasons}." if reasons else None


def _produces(fmt: str, step: Step) -> str:
    from app.jobs.capabilities import method_info

    info = method_info(fmt, step.op, step.method) or {}
    return str(info.get("produces", fmt))


def _needs_dataset(fmt: str, step: Step) -> bool:
    from app.jobs.capabilities import method_info

    return bool((method_info(fmt, step.op, step.method) or {}).get("needs_dataset"))


def _train_reference(
    backend: FormatBackend, path: Path, device: str, data: EvalData, options: EvalOptions
) -> list[np.ndarray]:
    """The original's outputs on the train dataset, once: the distillation targets of every training step."""
    try:
        return run_on_data(backend.open_runner(path, device), data, options)
    except CompressionError as exc:
        raise CompressionError(exc.code, exc.message.replace("the dataset", "the train dataset"), exc.details) from exc


def _sensitivity_wanted(options: EvalOptions, data: EvalData | None, steps: list[Step]) -> bool:
    if data is None or options.layer_sensitivity == "off" or not steps:
        return False
    return any(s.op in ("prune", "quantize") for s in steps)


def _move_model(src: Path, dst: Path, backend: FormatBackend) -> None:
    if backend.name == "onnx" and Path(str(src) + ".data").exists():
        # Keep external data beside a renamed model only if the model refers to it by this name.
        raise CompressionError("internal_error", "ONNX models with external data must be saved self-contained")
    shutil.move(src, dst)
