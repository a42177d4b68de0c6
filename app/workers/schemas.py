from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

WorkerStatus = Literal["live", "stale", "stopped"]

WORKER_EXAMPLE: dict[str, Any] = {
    "id": "wrk_6a1f0c9e2b7d4e3f8a5c1b2d3e4f5a6b",
    "name": "squeeze-cpu-4182@build-01",
    "hostname": "build-01",
    "pid": 4182,
    "status": "live",
    "queues": ["cpu"],
    "devices": ["cpu"],
    "gpus": [],
    "concurrency": 2,
    "version": "0.1.0",
    "started_at": "2026-11-27T23:30:02.114000Z",
    "last_seen_at": "2026-11-27T23:41:12.380000Z",
    "stopped_at": None,
}


class GpuPublic(BaseModel):
    name: str
    memory_mb: int | None = Field(description="Total memory as nvidia-smi reports it, in MiB.")


class WorkerPublic(BaseModel):
    id: str
    name: str = Field(description="Celery's node name, e.g. squeeze-cpu-1234@host.")
    hostname: str
    pid: int
    status: WorkerStatus = Field(
        description="live: heartbeats arrive; stale: silent past its TTL (killed, or cut off); stopped: shut down."
    )
    queues: list[str] = Field(description="Logical queues it consumes: cpu, gpu.")
    devices: list[str] = Field(description="Devices jobs may ask for because of it: cpu, cuda.")
    gpus: list[GpuPublic]
    concurrency: int
    version: str
    started_at: datetime
    last_seen_at: datetime
    stopped_at: datetime | None


class WorkersPublic(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"items": [WORKER_EXAMPLE], "live_devices": {"cpu": 1}}]})

    items: list[WorkerPublic]
    live_devices: dict[str, int] = Field(description="Live workers offering each device.")
