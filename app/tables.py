"""SQL tables. A "model" in Squeeze is a neural network, so ORM classes are named for what they hold."""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, DateTime, Float, ForeignKey, Index, Integer, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column, relationship

from app.db import Base


def utcnow() -> datetime:
    return datetime.now(UTC)


def as_utc(moment: datetime) -> datetime:
    """A timestamp read back from the database, with its zone: SQLite drops it, and Squeeze writes only UTC."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


_ID_SHAPE = re.compile(r"[A-Za-z0-9_-]{1,64}")


def could_be_id(value: str) -> bool:
    """Whether a client-sent id could name a row. Anything else matches none, and is not sent to the database:
    PostgreSQL refuses NUL and lone surrogates in text with an error, which would answer 500 instead of 404."""
    return _ID_SHAPE.fullmatch(value) is not None


class User(Base):
    __tablename__ = "users"
    id: Mapped[str] = mapped_column(String(64), primary_key=True, default=lambda: new_id("usr"))
    name: Mapped[str] = mapped_column(String(128), unique=True)
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ApiKey(Base):
    __tablename__ = "api_keys"
    id: Mapped[str] = mapped_column(String(64), primary_key=True, default=lambda: new_id("key"))
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    prefix: Mapped[str] = mapped_column(String(16), unique=True)
    secret_sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    user: Mapped[User] = relationship(lazy="joined")


class Blob(Base):
    """One stored byte string, addressed by its sha256. Rows below reference it; it is deleted with the last."""

    __tablename__ = "blobs"
    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ModelUpload(Base):
    __tablename__ = "model_uploads"
    id: Mapped[str] = mapped_column(String(64), primary_key=True, default=lambda: new_id("mdl"))
    owner_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(256))
    format: Mapped[str] = mapped_column(String(32))
    packaging: Mapped[str] = mapped_column(String(16), default="file")
    sha256: Mapped[str] = mapped_column(ForeignKey("blobs.sha256"), index=True)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    inspection: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class DatasetUpload(Base):
    __tablename__ = "dataset_uploads"
    id: Mapped[str] = mapped_column(String(64), primary_key=True, default=lambda: new_id("dst"))
    owner_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(256))
    sha256: Mapped[str] = mapped_column(ForeignKey("blobs.sha256"), index=True)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    num_samples: Mapped[int] = mapped_column(Integer)
    arrays: Mapped[dict[str, Any]] = mapped_column(JSON)
    has_labels: Mapped[bool] = mapped_column(Boolean)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class CompressionJob(Base):
    __tablename__ = "compression_jobs"
    id: Mapped[str] = mapped_column(String(64), primary_key=True, default=lambda: new_id("job"))
    owner_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    # Kept when the model or dataset is deleted later: the job's record and artifacts stay meaningful.
    model_id: Mapped[str | None] = mapped_column(
        ForeignKey("model_uploads.id", ondelete="SET NULL"), index=True, nullable=True
    )
    dataset_id: Mapped[str | None] = mapped_column(
        ForeignKey("dataset_uploads.id", ondelete="SET NULL"), index=True, nullable=True
    )
    # The spec's train_dataset_id as a column, so a dataset a queued or running job trains on cannot be deleted.
    train_dataset_id: Mapped[str | None] = mapped_column(
        ForeignKey("dataset_uploads.id", ondelete="SET NULL"), index=True, nullable=True
    )
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    # "compress": a pipeline a worker runs; "search": a coordinator whose trials are compress jobs (parent_id).
    kind: Mapped[str] = mapped_column(String(16), default="compress", server_default="compress")
    parent_id: Mapped[str | None] = mapped_column(
        ForeignKey("compression_jobs.id", ondelete="SET NULL"), index=True, nullable=True
    )
    queue: Mapped[str] = mapped_column(String(16), default="cpu")
    status: Mapped[str] = mapped_column(String(16), default="queued", index=True)
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    stage: Mapped[str] = mapped_column(String(64), default="queued")
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    worker: Mapped[str | None] = mapped_column(String(256), nullable=True)
    cache_key: Mapped[str] = mapped_column(String(64), index=True)
    cache_hit: Mapped[bool] = mapped_column(Boolean, default=False)
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    report: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    enqueued_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # Set when the retention policy deleted the job's artifacts (``squeeze admin retention``): the record stays.
    artifacts_expired_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    artifacts: Mapped[list[Artifact]] = relationship(
        back_populates="job", order_by="Artifact.created_at", lazy="selectin"
    )
    webhook_deliveries: Mapped[list[WebhookDelivery]] = relationship(
        order_by="WebhookDelivery.created_at", lazy="selectin", viewonly=True
    )

    __table_args__ = (
        Index("ix_compression_jobs_owner_created", "owner_id", "created_at", "id"),
        UniqueConstraint("parent_id", "cache_key", name="uq_compression_jobs_parent_recipe"),
    )


class Artifact(Base):
    __tablename__ = "artifacts"
    id: Mapped[str] = mapped_column(String(64), primary_key=True, default=lambda: new_id("art"))
    job_id: Mapped[str] = mapped_column(ForeignKey("compression_jobs.id", ondelete="CASCADE"), index=True)
    owner_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(32))  # "model" | "report"
    format: Mapped[str] = mapped_column(String(32))  # "onnx" | "pt2" | "json"
    filename: Mapped[str] = mapped_column(String(256))
    sha256: Mapped[str] = mapped_column(ForeignKey("blobs.sha256"), index=True)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    job: Mapped[CompressionJob] = relationship(back_populates="artifacts")


class IdempotencyKey(Base):
    """A client's ``Idempotency-Key`` and what its first request created, so a retry gets the same resource."""

    __tablename__ = "idempotency_keys"
    id: Mapped[str] = mapped_column(String(64), primary_key=True, default=lambda: new_id("idk"))
    owner_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    scope: Mapped[str] = mapped_column(String(32))  # "jobs" | "models" | "datasets"
    key: Mapped[str] = mapped_column(String(200))
    request_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    resource_id: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    __table_args__ = (UniqueConstraint("owner_id", "scope", "key", name="uq_idempotency_keys_owner_scope_key"),)


class JobEvent(Base):
    """What happened to a job, in order: state changes, progress and log lines. Streamed by /events (SSE)."""

    __tablename__ = "job_events"
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("compression_jobs.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(16))  # "state" | "progress" | "log"
    data: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    __table_args__ = (Index("ix_job_events_job_id_id", "job_id", "id"),)


class WebhookDelivery(Base):
    """One notification of a job's final state to its ``notify_url``, with its delivery attempts."""

    __tablename__ = "webhook_deliveries"
    id: Mapped[str] = mapped_column(String(64), primary_key=True, default=lambda: new_id("whd"))
    job_id: Mapped[str] = mapped_column(ForeignKey("compression_jobs.id", ondelete="CASCADE"), index=True)
    url: Mapped[str] = mapped_column(String(2048))
    event: Mapped[str] = mapped_column(String(32))  # "job.succeeded" | "job.failed" | "job.cancelled"
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16), default="pending", index=True)  # pending|delivered|failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(String(500), nullable=True)
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    delivered_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class WorkerNode(Base):
    """One worker process as it registered itself: what it consumes and offers, refreshed by its heartbeats.

    Live while ``expires_at`` (last heartbeat plus the worker's TTL) is ahead and it has not stopped.
    """

    __tablename__ = "worker_nodes"
    id: Mapped[str] = mapped_column(String(64), primary_key=True, default=lambda: new_id("wkr"))
    name: Mapped[str] = mapped_column(String(256))  # Celery's node name, e.g. squeeze-cpu-1234@host
    hostname: Mapped[str] = mapped_column(String(256))
    pid: Mapped[int] = mapped_column(Integer)
    queues: Mapped[list[str]] = mapped_column(JSON)  # logical queues: "cpu", "gpu"
    devices: Mapped[list[str]] = mapped_column(JSON)  # what jobs may ask for here: "cpu", "cuda"
    gpus: Mapped[list[dict[str, Any]]] = mapped_column(JSON)  # [{"name": ..., "memory_mb": ...}]
    concurrency: Mapped[int] = mapped_column(Integer)
    version: Mapped[str] = mapped_column(String(64))
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    last_seen_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    stopped_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
