from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]

# Examples for the OpenAPI document, from a real run (the digits CNN, prune 50% + int8).
ARTIFACT_EXAMPLE: dict[str, Any] = {
    "id": "art_3f6b1c0e9d2a4b7c8e5f1a2b3c4d5e6f",
    "kind": "model",
    "format": "onnx",
    "filename": "job_e9abd982b181457687f1cd5b1bca20f4.onnx",
    "size_bytes": 56907,
    "sha256": "d37e524522c7f0b1a2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f6071829",
    "download_url": "/v1/artifacts/art_3f6b1c0e9d2a4b7c8e5f1a2b3c4d5e6f/download",
}
_LATENCY = {"p50": 0.19, "p95": 0.49, "batch_size": 32}
_RUNTIME = {"device": "cpu", "runtime": "onnxruntime 1.32.0 CPUExecutionProvider", "samples": 397}
JOB_EXAMPLE: dict[str, Any] = {
    "id": "job_e9abd982b181457687f1cd5b1bca20f4",
    "status": "succeeded",
    "progress": 1.0,
    "stage": "done",
    "spec": {
        "model_id": "mdl_88801936e32540db99af1ceabc907d0f",
        "dataset_id": "dst_5f0c2a61d3b74e0e9a4c8e2b7d1f3a90",
        "steps": [
            {"op": "prune", "method": "magnitude", "sparsity": 0.5, "scope": "global"},
            {"op": "quantize", "method": "int8_dynamic", "per_channel": True},
        ],
        "device": "auto",
        "cache": True,
    },
    "queue": "cpu",
    "error": None,
    "attempts": 1,
    "created_at": "2026-11-27T23:40:16.210000Z",
    "started_at": "2026-11-27T23:40:18.020000Z",
    "finished_at": "2026-11-27T23:40:35.480000Z",
    "cache_hit": False,
    "metrics": {
        "baseline": {
            "size_bytes": 154399,
            "parameters": 38282,
            "nonzero_parameters": 38282,
            "sparsity": 0.0,
            "accuracy": 0.9849,
            "agreement": 1.0,
            "cosine": 1.0,
            "max_abs_error": 0.0,
            "latency_ms": _LATENCY,
            **_RUNTIME,
        },
        "result": {
            "size_bytes": 56907,
            "parameters": 38282,
            "nonzero_parameters": 19202,
            "sparsity": 0.4984,
            "accuracy": 0.9798,
            "agreement": 0.995,
            "cosine": 0.9975,
            "max_abs_error": 2.38,
            "latency_ms": {**_LATENCY, "p50": 0.18, "p95": 0.29},
            **_RUNTIME,
        },
    },
    "report": {
        "device": "cpu",
        "steps": [
            {"op": "prune", "method": "magnitude", "details": {"achieved_sparsity": 0.5}, "notes": []},
            {"op": "quantize", "method": "int8_dynamic", "details": {"quantized_weights": 2}, "notes": []},
        ],
        "notes": [],
    },
    "artifacts": [ARTIFACT_EXAMPLE],
    "webhooks": [],
}


class JobError(BaseModel):
    code: str
    message: str
    details: dict[str, Any] = Field(default_factory=dict)


class ArtifactPublic(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [ARTIFACT_EXAMPLE]})

    id: str
    kind: str
    format: str
    filename: str
    size_bytes: int
    sha256: str
    download_url: str


class JobPublic(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [JOB_EXAMPLE]})

    id: str
    kind: Literal["compress", "search"] = Field(
        "compress", description="search: an accuracy-aware search (POST /v1/searches) whose trials are jobs."
    )
    parent_id: str | None = Field(None, description="For a search's trial: the search's id.")
    status: JobStatus
    progress: float
    stage: str
    spec: dict[str, Any]
    queue: str
    error: JobError | None
    attempts: int
    worker: str | None = Field(None, description="The worker (Celery node name) that runs or ran the job.")
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    cache_hit: bool
    metrics: dict[str, Any] | None = Field(
        description="{baseline: {...}, result: {...}}: size, parameters, sparsity, accuracy, agreement, cosine, "
        "max_abs_error, latency_ms {p50, p95, batch_size, runs, threads (CPU)}, device, runtime."
    )
    report: dict[str, Any] | None = Field(description="Per-step details, notes and the environment.")
    artifacts: list[ArtifactPublic]
    artifacts_expired_at: datetime | None = Field(
        None, description="When the retention policy deleted this job's artifacts (the record and metrics stay)."
    )
    webhooks: list[dict[str, Any]] = Field(
        default_factory=list, description="Deliveries of the final state to notify_url: status, attempts, error."
    )


class JobsPublic(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"items": [JOB_EXAMPLE], "next_cursor": None}]})

    items: list[JobPublic]
    next_cursor: str | None
