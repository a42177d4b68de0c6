from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field

WorkerStatus = Literal["live", "stale", "stopped"]


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
    items: list[WorkerPublic]
    live_devices: dict[str, int] = Field(description="Live workers offering each device.")
