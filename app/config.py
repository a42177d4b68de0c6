"""All settings, from environment variables prefixed ``SQUEEZE_`` (nested groups use ``__``).

The defaults are the embedded mode: SQLite, local disk and a filesystem broker under ``./var``, so that
``squeeze serve`` runs on a fresh machine with no server. Production sets ``SQUEEZE_DATABASE_URL`` (PostgreSQL)
and ``SQUEEZE_BROKER_URL`` (Redis).
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SQUEEZE_", env_nested_delimiter="__", extra="ignore")

    log_format: Literal["json", "text"] = Field("json", description="Log lines as JSON objects, or plain text.")
    log_level: str = "INFO"
    data_dir: Path = Field(Path("var"), description="Root of everything the embedded mode keeps on disk.")
    database_url: str = Field("", description="SQLAlchemy URL; empty means SQLite at DATA_DIR/squeeze.db.")
    queue_prefix: str = Field(
        "",
        pattern=r"^[A-Za-z0-9._-]{0,64}$",
        description="Prefix of the queue names, for deployments sharing a broker.",
    )
    broker_url: str = Field("", description="Celery broker; empty means kombu's filesystem transport in DATA_DIR.")
    storage_dir: Path | None = Field(None, description="Content-addressed blob store; default DATA_DIR/blobs.")
    work_dir: Path | None = Field(None, description="Workers' scratch space; default DATA_DIR/work.")

    # Blob storage: local disk (STORAGE_DIR, shared by API and workers), or an S3-compatible bucket, in which case
    # API and workers share no disk: uploads spool under WORK_DIR and workers keep fetched blobs in a local cache.
    storage_backend: Literal["local", "s3"] = Field("local", description="Where blobs live: local disk or S3.")
    s3_endpoint_url: str = Field("", description="S3-compatible endpoint (MinIO, Ceph...); empty: AWS S3.")
    s3_public_endpoint_url: str = Field(
        "", description="Endpoint that clients reach, for presigned download URLs; empty: S3_ENDPOINT_URL."
    )
    s3_bucket: str = Field("", description="Bucket holding the blobs (created beforehand).")
    s3_region: str = Field("us-east-1", description="The bucket's region (also the signing region).")
    s3_prefix: str = Field(
        "", pattern=r"^([A-Za-z0-9._-]+/)*$", description="Key prefix, for deployments sharing a bucket ('x/')."
    )
    s3_access_key_id: SecretStr = Field(SecretStr(""), description="Empty: boto3's default credential chain.")
    s3_secret_access_key: SecretStr = Field(SecretStr(""))
    s3_presigned_downloads: bool = Field(
        False, description="Answer downloads with a 307 to a presigned URL instead of streaming through the API."
    )
    s3_presigned_expiry_s: int = Field(900, ge=1, le=7 * 24 * 3600, description="Lifetime of a presigned URL.")
    s3_multipart_threshold_bytes: int = Field(
        64 * 2**20, ge=5 * 2**20, description="Blobs at least this large are uploaded in parts (S3's minimum: 5 MiB)."
    )
    s3_multipart_part_bytes: int = Field(16 * 2**20, ge=5 * 2**20, le=5 * 2**30, description="Size of each part.")
    s3_cache_max_bytes: int = Field(
        20 * 2**30, ge=0, description="Bytes of fetched blobs a worker keeps cached (LRU); 0: no limit."
    )

    auth_cache_s: float = Field(
        5.0,
        ge=0,
        le=300,
        description="An API key checked against the database is trusted this long by that API process; a key "
        "revoked elsewhere is refused at most this much later. 0: every request reads the database.",
    )
    max_upload_bytes: int = Field(8 * 1024**3, ge=1, description="Largest accepted upload; 413 past it.")
    max_archive_members: int = Field(1000, ge=1)
    max_archive_ratio: float = Field(200.0, gt=1, description="Largest compression ratio of an archive member.")

    job_soft_time_limit_s: int = Field(3300, ge=1)
    job_time_limit_s: int = Field(3600, ge=2)
    job_max_attempts: int = Field(3, ge=1, description="Deliveries of one job before it is failed for good.")
    job_lease_s: int = Field(
        30, ge=1, description="A running job whose worker has not sent a heartbeat for this long may be taken over."
    )
    job_heartbeat_s: float = Field(5.0, gt=0, description="How often a worker refreshes its running job's lease.")
    reconcile_interval_s: float = Field(30.0, gt=0, description="How often the API re-enqueues lost jobs.")
    requeue_after_s: int = Field(
        300, ge=1, description="A job queued this long with no worker taking it is sent to the broker again."
    )
    worker_soft_shutdown_s: float = Field(
        10.0, ge=0, description="On SIGTERM, let a running job finish for this long, then requeue it at once."
    )
    worker_max_tasks_per_child: int = Field(20, ge=1)
    sandbox_memory_mb: int = Field(
        0, ge=0, description="Address-space limit of the process that runs a job's pipeline; 0: 3/4 of the RAM."
    )
    sandbox_isolate_network: bool = Field(True, description="Run pipelines in an empty network namespace.")
    quota_storage_bytes: int = Field(0, ge=0, description="Bytes each user may keep stored; 0: unlimited.")
    quota_concurrent_jobs: int = Field(16, ge=0, description="Jobs each user may have queued or running; 0: no limit.")
    allowed_formats: list[str] = Field(
        ["onnx", "pt2", "torchscript", "hf"],
        description="Model formats accepted for upload. Drop 'pt2' and 'torchscript' where users are not trusted: "
        "PyTorch allows torch.export programs to carry code, and TorchScript archives are code run by the "
        "TorchScript interpreter (Squeeze refuses what it can recognise, and runs jobs confined). 'hf' folders "
        "are loaded with trust_remote_code=False from safetensors only.",
    )
    webhook_secret: SecretStr = Field(
        SecretStr(""), description="HMAC key that signs webhook calls; webhooks are off while it is empty."
    )
    webhook_allowed_urls: list[str] = Field(
        default_factory=list, description="URL prefixes jobs may name as notify_url (scheme, host, port, path)."
    )
    gpu_enabled: bool = Field(
        False,
        description="Worker: treat this machine as a GPU machine even if no GPU is detected (a worker on the gpu "
        "queue then offers cuda; pipelines that may use CUDA get no address-space limit). Set by itself when "
        "nvidia-smi finds a GPU. The API accepts device=cuda while a live worker offers cuda.",
    )
    worker_heartbeat_s: float = Field(10.0, gt=0, description="How often a worker refreshes its registry entry.")
    worker_ttl_s: float = Field(
        30.0, gt=0, description="A worker silent this long is no longer live (keep it a few heartbeats)."
    )
    artifact_retention_days: int = Field(
        0, ge=0, description="The API deletes artifacts of jobs finished longer ago than this; 0: keep forever."
    )

    def sandbox_memory_bytes(self, device: str) -> int | None:
        """RLIMIT_AS for a pipeline; None on GPU jobs (CUDA reserves far more address space than it uses)."""
        if device != "cpu" and self.gpu_enabled:
            return None
        if self.sandbox_memory_mb:
            return self.sandbox_memory_mb * 2**20
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * 3 // 4)

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'squeeze.db').resolve()}"

    @property
    def resolved_broker_url(self) -> str:
        return self.broker_url or "filesystem://"

    @property
    def broker_folder(self) -> Path:
        return (self.data_dir / "broker").resolve()

    @property
    def resolved_storage_dir(self) -> Path:
        return (self.storage_dir or self.data_dir / "blobs").resolve()

    @property
    def resolved_work_dir(self) -> Path:
        return (self.work_dir or self.data_dir / "work").resolve()

    @model_validator(mode="after")
    def _s3_needs_a_bucket(self) -> Settings:
        if self.storage_backend == "s3" and not self.s3_bucket:
            raise ValueError("SQUEEZE_STORAGE_BACKEND=s3 needs SQUEEZE_S3_BUCKET")
        return self


@lru_cache
def get_settings() -> Settings:
    """The process's settings; tests call ``get_settings.cache_clear()`` after changing the environment."""
    return Settings()
