from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]


class JobError(BaseModel):
    code: str
    message: str
    details: dict[str, Any] = Field(default_factory=dict)


class ArtifactPublic(BaseModel):
    id: str
    kind: str
    format: str
    filename: str
    size_bytes: int
    sha256: str
    download_url: str


class JobPublic(BaseModel):
    id: str
    status: JobStatus
    progress: float
    stage: str
    spec: dict[str, Any]
    queue: str
    error: JobError | None
    attempts: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    cache_hit: bool
    metrics: dict[str, Any] | None = Field(
        description="{baseline: {...}, result: {...}}: size, parameters, sparsity, accuracy, agreement, cosine, "
        "max_abs_error, latency_ms {p50, p95, batch_size}, device, runtime."
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
    items: list[JobPublic]
    next_cursor: str | None
