"""Types shared by the pure compression package. No HTTP, SQL or Celery here; numpy only at import time."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

ProgressFn = Callable[[float, str], None]
"""progress(fraction 0..1 of the whole pipeline, stage name)."""

MAX_TRAIN_SAMPLES = 20_000
"""A training step trains on at most this many samples (of the job's train dataset, or of its dataset's 80%)."""


class CompressionError(Exception):
    """A job failed for a reason the user can act on. ``code`` is machine-readable (snake_case)."""

    def __init__(self, code: str, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details or {}


@contextlib.contextmanager
def torch_errors(code: str, what: str) -> Iterator[None]:
    """The library's own message (torch, transformers, torchao) is what the user needs: any exception raised inside
    becomes a CompressionError with our ``code``; a CompressionError passes through unchanged."""
    try:
        yield
    except CompressionError:
        raise
    except Exception as exc:
        raise CompressionError(code, f"{what} failed: {type(exc).__name__}: {exc}"[:2000]) from exc


@dataclass(frozen=True)
class EvalData:
    """The user's dataset: one array per model input (first axis = samples) and optional integer labels."""

    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None = None

    @property
    def num_samples(self) -> int:
        return len(next(iter(self.inputs.values())))

    def head(self, n: int) -> EvalData:
        return EvalData(
            {k: v[:n] for k, v in self.inputs.items()},
            None if self.labels is None else self.labels[:n],
        )


class Runner(Protocol):
    """A loaded model that maps a batch of named numpy inputs to its outputs (numpy, in output order)."""

    runtime: str  # e.g. "onnxruntime 1.31.1 CPUExecutionProvider" or "torch 2.13.0 cpu"
    device: str  # "cpu" or "cuda"

    def __call__(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]: ...


@dataclass
class StepReport:
    """What one step did, in numbers, for the job report."""

    op: str
    method: str
    details: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    output_format: str | None = None  # set by a step that changes the model's format (convert, encode)


@dataclass(frozen=True)
class StepContext:
    """What a step may need besides its input file: the data, the device, the original model (a teacher).

    ``train_data`` is the job's train dataset, if it has one: training steps train on all of it (instead of 80% of
    ``data``) and measure before/after on ``data``; every other step, calibration included, uses ``data``.
    """

    data: EvalData | None
    device: str
    original: Path  # the uploaded model, before any step
    original_format: str
    workdir: Path
    reference: list[np.ndarray] | None = None  # the original's outputs on ``data`` (targets without labels)
    train_data: EvalData | None = None
    train_reference: list[np.ndarray] | None = None  # the original's outputs on ``train_data``


@dataclass
class ModelMetrics:
    """Metrics of one model version (baseline or result). Keys mirror the API's ``metrics`` object."""

    size_bytes: int
    parameters: int
    nonzero_parameters: int
    sparsity: float
    device: str
    runtime: str
    accuracy: float | None = None
    agreement: float | None = None
    cosine: float | None = None
    max_abs_error: float | None = None
    latency_ms: dict[str, float] | None = None  # {"p50", "p95", "batch_size"}
    samples: int | None = None
    layers: list[dict[str, Any]] | None = None  # per weight tensor: name, op, shape, parameters, sparsity, bits, bytes
    kernels: dict[str, Any] | None = None  # a CUDA result's kernel swaps (pt2_kernels.KernelReport.as_dict())

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class PipelineResult:
    output_path: Path | None  # None for an evaluation-only job
    output_format: str
    baseline: ModelMetrics
    result: ModelMetrics | None
    steps: list[StepReport]
    notes: list[str]
