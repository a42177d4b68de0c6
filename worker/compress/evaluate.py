"""Measure a model version against the original: fidelity, accuracy and latency, on the user's data."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from worker.compress.types import EvalData, Runner


def run_batched(runner: Runner, data: EvalData, batch_size: int) -> list[np.ndarray]:
    """Outputs of ``runner`` over all samples, concatenated per output.

    A model exported with a fixed batch dimension (``runner.fixed_batch``) gets batches of exactly that size;
    the last one is padded with copies of its first sample and the padding is dropped from the outputs.
    """
    fixed = getattr(runner, "fixed_batch", None)
    bs = fixed or batch_size
    n = data.num_samples
    chunks: list[list[np.ndarray]] = []
    for start in range(0, n, bs):
        batch = {k: v[start : start + bs] for k, v in data.inputs.items()}
        real = len(next(iter(batch.values())))
        if fixed and real < fixed:
            batch = {k: np.concatenate([v, np.repeat(v[:1], fixed - real, axis=0)]) for k, v in batch.items()}
        outs = runner(batch)
        chunks.append([np.asarray(o)[:real] for o in outs])
    return [np.concatenate([c[i] for c in chunks]) for i in range(len(chunks[0]))]


def compare(
    reference: list[np.ndarray],
    outputs: list[np.ndarray],
    labels: np.ndarray | None,
    padding_mask: np.ndarray | None = None,
) -> dict[str, float | None]:
    """Fidelity of ``outputs`` to ``reference`` on the primary (first) output, and accuracy against labels.

    cosine: mean over samples of the cosine similarity of each sample's flattened output.
    agreement: share of samples whose top-1 class matches the reference (2-D outputs, i.e. logits).
    padding_mask: the data's [N, S] ``attention_mask``, if any. When the primary output starts with the same
    [N, S], padded positions are left out of cosine and max_abs_error: nothing downstream reads them, and
    their errors would understate a transformer's fidelity (MiniLM int8: cosine 0.961 with padding, 0.991
    without).
    """
    ref = reference[0].astype(np.float64)
    out = outputs[0].astype(np.float64)
    if padding_mask is not None and padding_mask.ndim == 2 and ref.shape[:2] == padding_mask.shape:
        keep = (padding_mask != 0).reshape(padding_mask.shape + (1,) * (ref.ndim - 2))
        ref, out = np.where(keep, ref, 0.0), np.where(keep, out, 0.0)
    ref = ref.reshape(len(ref), -1)
    out = out.reshape(len(out), -1)
    dot = (ref * out).sum(axis=1)
    norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(out, axis=1)
    cos = np.where(norms > 0, dot / np.maximum(norms, 1e-300), np.where((ref == out).all(axis=1), 1.0, 0.0))
    metrics: dict[str, float | None] = {
        "cosine": float(cos.mean()),
        "max_abs_error": float(np.abs(ref - out).max()) if ref.size else 0.0,
        "agreement": None,
    }
    if reference[0].ndim == 2:
        metrics["agreement"] = float((reference[0].argmax(axis=1) == outputs[0].argmax(axis=1)).mean())
    return metrics


def accuracy(outputs: list[np.ndarray], labels: np.ndarray | None) -> float | None:
    """Top-1 accuracy of the primary output against integer labels (logits of shape [N, classes])."""
    if labels is None or outputs[0].ndim != 2 or labels.ndim != 1:
        return None
    return float((outputs[0].argmax(axis=1) == labels).mean())


def measure_latency(runner: Runner, batch: dict[str, np.ndarray], warmup: int, runs: int) -> dict[str, float]:
    """p50/p95 time of one call on ``batch`` after ``warmup`` untimed calls, in milliseconds.

    On the CPU: wall time of the whole call (numpy in, numpy out). A torch runner on CUDA (``time_calls``) is timed
    with CUDA events around the model call alone, its inputs already on the GPU: kernels run asynchronously, and
    the host-device copies of numpy inputs would otherwise dominate a fast model's figure.
    """
    timed = getattr(runner, "time_calls", None)
    if timed is not None and runner.device == "cuda":
        times = timed(batch, warmup, runs)
    else:
        times = device_call_times(lambda: runner(batch), "cpu", warmup, runs)
    arr = np.asarray(times)
    latency = {
        "p50": round(float(np.percentile(arr, 50)), 4),
        "p95": round(float(np.percentile(arr, 95)), 4),
        "batch_size": float(len(next(iter(batch.values())))),
        "runs": float(runs),
    }
    threads = cpu_threads(runner) if runner.device == "cpu" else None
    if threads:
        latency["threads"] = float(threads)
    return latency


def cpu_threads(runner: Runner) -> int | None:
    """The intra-op threads a CPU runner computes with (its latency depends on them): the ONNX Runtime session's
    setting, or torch's. ``squeeze worker --threads`` sets them for every job."""
    session = getattr(runner, "session", None)
    if session is not None and hasattr(session, "get_session_options"):
        return int(session.get_session_options().intra_op_num_threads) or None
    if runner.runtime.startswith("torch"):
        import torch

        return torch.get_num_threads()
    return None


def device_call_times(call: Callable[[], object], device: str, warmup: int, runs: int) -> list[float]:
    """Milliseconds per ``call()`` after ``warmup`` calls: CUDA events on ``cuda`` (each call's span on the GPU's
    stream, read after one synchronize at the end), wall time elsewhere."""
    for _ in range(warmup):
        call()
    if device != "cuda":
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            call()
            times.append((time.perf_counter() - t0) * 1000.0)
        return times
    import torch

    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(runs)]
    for start, end in events:
        start.record()
        call()
        end.record()
    torch.cuda.synchronize()
    return [start.elapsed_time(end) for start, end in events]
