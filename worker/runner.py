"""One job, start to finish, on a worker: claim → materialize inputs → run the pipeline → record the outcome.

State lives in SQL. A job is claimed with one conditional UPDATE that also counts the attempt, so a job that
keeps killing its worker is failed after ``job_max_attempts`` deliveries instead of looping forever. Artifacts
are written to the store (temp file, fsync, rename) before the rows that point at them are committed.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import platform
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from importlib import metadata
from pathlib import Path
from typing import Any, Literal, NamedTuple, TypeVar

from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy import and_, or_, select, update
from sqlalchemy.exc import DBAPIError, OperationalError

from app.blobs import is_referenced, register_blob
from app.config import get_settings
from app.db import session_scope
from app.jobs.capabilities import suffix_of
from app.jobs.events import add_event
from app.jobs.spec import JobSpec
from app.storage import get_store
from app.tables import Artifact, CompressionJob, DatasetUpload, ModelUpload, utcnow
from app.webhooks import queue_delivery
from worker.report import render_markdown

log = logging.getLogger("squeeze.worker")
T = TypeVar("T")
PROGRESS_INTERVAL_S = 0.5


class JobCancelled(Exception):
    """The job left the running state (cancelled by its owner) while the worker was on it."""


def with_db_retry(fn: Callable[[], T], attempts: int = 6, first_delay_s: float = 0.5) -> T:
    """Run a database write, retrying through a database restart (connection errors only)."""
    delay = first_delay_s
    for i in range(attempts):
        try:
            return fn()
        except (OperationalError, DBAPIError) as exc:
            # OperationalError: the server is unreachable or restarting. Other DBAPI errors only when they
            # dropped the connection; a constraint violation would fail the same way again.
            retriable = isinstance(exc, OperationalError) or exc.connection_invalidated
            if i == attempts - 1 or not retriable:
                raise
            log.warning("database write failed (%s); retrying in %.1fs", type(exc).__name__, delay)
            time.sleep(delay)
            delay = min(delay * 2, 8.0)
    raise AssertionError("unreachable")


class Claim(NamedTuple):
    state: Literal["claimed", "gone", "busy"]
    attempts: int = 0


def claim(job_id: str, worker: str) -> Claim:
    """Take the job: queued, or running under a lease nobody has renewed for ``job_lease_s`` (its worker died).

    One conditional UPDATE, so two deliveries of the same job can never both run it. Returns "busy" while
    another worker holds a live lease, "gone" when the job is finished or cancelled.
    """
    cutoff = utcnow() - timedelta(seconds=get_settings().job_lease_s)

    def _do() -> Claim:
        with session_scope() as s:
            res = s.execute(
                update(CompressionJob)
                .where(
                    CompressionJob.id == job_id,
                    or_(
                        CompressionJob.status == "queued",
                        and_(
                            CompressionJob.status == "running",
                            or_(CompressionJob.heartbeat_at.is_(None), CompressionJob.heartbeat_at < cutoff),
                        ),
                    ),
                )
                .values(
                    status="running",
                    attempts=CompressionJob.attempts + 1,
                    worker=worker[:256],
                    stage="starting",
                    heartbeat_at=utcnow(),
                )
                .returning(CompressionJob.attempts)
            ).first()
            if res is None:
                status = s.scalar(select(CompressionJob.status).where(CompressionJob.id == job_id))
                return Claim("busy" if status == "running" else "gone")
            job = s.get(CompressionJob, job_id)
            if job is not None and job.started_at is None:
                job.started_at = utcnow()
            add_event(s, job_id, "state", status="running", attempt=int(res[0]), worker=worker[:256])
            return Claim("claimed", int(res[0]))

    return with_db_retry(_do)


class Heartbeat:
    """Renews the job's lease every ``job_heartbeat_s`` from a thread while the pipeline runs."""

    def __init__(self, job_id: str, interval_s: float) -> None:
        self.job_id = job_id
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{job_id}", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                with session_scope() as s:
                    s.execute(
                        update(CompressionJob)
                        .where(CompressionJob.id == self.job_id, CompressionJob.status == "running")
                        .values(heartbeat_at=utcnow())
                    )
            except Exception:  # a missed beat only shortens the lease; the next one retries
                log.warning("heartbeat for job %s failed", self.job_id, exc_info=True)


def fail_job(job_id: str, code: str, message: str, details: dict[str, Any] | None = None) -> None:
    error = {"code": code, "message": message[:4000], "details": details or {}}

    def _do() -> None:
        with session_scope() as s:
            failed = s.execute(
                update(CompressionJob)
                .where(CompressionJob.id == job_id, CompressionJob.status.in_(("queued", "running")))
                .values(status="failed", stage="failed", finished_at=utcnow(), error=error)
            ).rowcount
            if failed:
                add_event(s, job_id, "state", status="failed", error=error)
                job = s.get(CompressionJob, job_id)
                if job is not None:
                    queue_delivery(s, job)

    with_db_retry(_do)


class ProgressReporter:
    """Writes progress and stage (throttled) and notices cancellation between stages."""

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        self._last = 0.0

    def __call__(self, fraction: float, stage: str) -> None:
        now = time.monotonic()
        if now - self._last < PROGRESS_INTERVAL_S and fraction < 1.0 and stage == getattr(self, "_stage", None):
            return
        self._last, self._stage = now, stage

        progress = round(min(max(fraction, 0.0), 1.0), 4)

        def _do() -> int:
            with session_scope() as s:
                n = s.execute(
                    update(CompressionJob)
                    .where(CompressionJob.id == self.job_id, CompressionJob.status == "running")
                    .values(progress=progress, stage=stage[:64], heartbeat_at=utcnow())
                ).rowcount
                if n:
                    add_event(s, self.job_id, "progress", progress=progress, stage=stage[:64])
                return n

        if with_db_retry(_do) == 0:
            raise JobCancelled(self.job_id)


def materialize_model(model: ModelUpload, workdir: Path) -> Path:
    """A local path to the model file: the blob itself, or the .onnx inside a safely extracted zip. A Hugging Face
    folder stays an archive: the hf backend unpacks it in the sandboxed child."""
    store = get_store()
    blob = store.local_path(model.sha256)
    if model.packaging == "zip" and model.format == "onnx":
        from app.inspection.archive import find_onnx_in_dir, safe_extract_zip

        settings = get_settings()
        dest = workdir / "model"
        dest.mkdir()
        safe_extract_zip(
            blob,
            dest,
            max_members=settings.max_archive_members,
            max_total_bytes=settings.max_upload_bytes * int(settings.max_archive_ratio),
            max_ratio=settings.max_archive_ratio,
        )
        return find_onnx_in_dir(dest)
    return blob


def dataset_request(dataset: DatasetUpload, model: ModelUpload) -> dict[str, Any]:
    """Where the sandbox finds the dataset and which array feeds which model input (checked again here)."""
    from app.inspection import DatasetInspection, ModelInspection, check_dataset_for_model

    mapping = check_dataset_for_model(
        ModelInspection.model_validate(model.inspection),
        DatasetInspection(num_samples=dataset.num_samples, arrays=dataset.arrays, has_labels=dataset.has_labels),
    )
    return {
        "path": str(get_store().local_path(dataset.sha256)),
        "mapping": mapping,
        "has_labels": dataset.has_labels,
    }


def environment() -> dict[str, str]:
    env = {"python": platform.python_version(), "machine": platform.machine()}
    for pkg in ("torch", "torchao", "onnx", "onnxruntime", "numpy"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            env[pkg] = metadata.version(pkg)
    return env


def job_kind(job_id: str) -> tuple[str | None, str | None]:
    """(kind, parent search id) of a job; (None, None) if it does not exist."""

    def _do() -> tuple[str | None, str | None]:
        with session_scope() as s:
            row = s.execute(
                select(CompressionJob.kind, CompressionJob.parent_id).where(CompressionJob.id == job_id)
            ).first()
            return (row[0], row[1]) if row else (None, None)

    return with_db_retry(_do)


def advance_search(search_id: str) -> None:
    """Let the search plan its next trials (or finish), then enqueue them once they are committed."""
    from app.queue import enqueue_job
    from app.search.service import advance_search as advance

    def _do() -> list[tuple[str, str]]:
        with session_scope() as s:
            return advance(s, get_settings(), search_id)

    for trial_id, queue in with_db_retry(_do):
        enqueue_job(trial_id, queue)


def run_job(job_id: str, *, worker: str) -> str:
    """Run the job if it can be claimed; returns the claim's state (\"busy\": retry after the lease)."""
    settings = get_settings()
    claimed = claim(job_id, worker)
    if claimed.state != "claimed":
        log.info("job %s is %s; not running it now", job_id, claimed.state)
        return claimed.state
    attempts = claimed.attempts
    if attempts > settings.job_max_attempts:
        fail_job(
            job_id,
            "worker_lost",
            f"the job was started {attempts - 1} times and its worker died each time "
            "(out of memory or a crash in a native library); it will not be retried",
            {"attempts": attempts - 1},
        )
        return "gone"
    settings.resolved_work_dir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix=f"{job_id}-", dir=settings.resolved_work_dir))
    try:
        with Heartbeat(job_id, settings.job_heartbeat_s):
            _run(job_id, workdir)
    except JobCancelled:
        log.info("job %s was cancelled while running", job_id)
    except SoftTimeLimitExceeded:
        fail_job(job_id, "timeout", "the job ran past its time limit and was stopped")
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            log.exception("job %s failed", job_id)
            fail_job(job_id, "internal_error", f"{type(exc).__name__}: {exc}")
        else:
            fail_job(job_id, "storage_full", "the artifact store is full; nothing was kept. Ask an admin to free space")
    except Exception as exc:
        from worker.compress.types import CompressionError

        if isinstance(exc, CompressionError):
            fail_job(job_id, exc.code, exc.message, exc.details)
        else:
            log.exception("job %s failed", job_id)
            fail_job(job_id, "internal_error", f"{type(exc).__name__}: {exc}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return "claimed"


def _run(job_id: str, workdir: Path) -> None:
    from worker.sandbox import SandboxError, run_sandboxed

    settings = get_settings()
    with session_scope() as s:
        job = s.get(CompressionJob, job_id)
        assert job is not None
        spec = JobSpec.model_validate(job.spec)
        model = s.get(ModelUpload, job.model_id) if job.model_id else None
        dataset = s.get(DatasetUpload, job.dataset_id) if job.dataset_id else None
        train_dataset = s.get(DatasetUpload, job.train_dataset_id) if job.train_dataset_id else None
        owner_id = job.owner_id
        s.expunge_all()
    if model is None:
        from worker.compress.types import CompressionError

        raise CompressionError("model_not_found", "the job's model was deleted before the job ran")
    if spec.train_dataset_id is not None and train_dataset is None:
        from worker.compress.types import CompressionError

        raise CompressionError("dataset_not_found", "the job's train dataset was deleted before the job ran")
    progress = ProgressReporter(job_id)
    progress(0.0, "loading")
    model_path = materialize_model(model, workdir)
    request = {
        "spec": spec.model_dump(mode="json"),
        "format": model.format,
        "model_path": str(model_path),
        "dataset": dataset_request(dataset, model) if dataset is not None else None,
        "train_dataset": dataset_request(train_dataset, model) if train_dataset is not None else None,
        "workdir": str(workdir),
    }
    started = time.perf_counter()
    try:
        result = run_sandboxed(
            request,
            workdir=workdir,
            progress=progress,
            memory_bytes=settings.sandbox_memory_bytes(spec.device),
            cpu_seconds=settings.job_time_limit_s * (os.cpu_count() or 1),
            isolate_network=settings.sandbox_isolate_network,
        )
    except SandboxError as exc:
        from worker.compress.types import CompressionError

        raise CompressionError(exc.code, exc.message, exc.details) from exc
    wall_s = time.perf_counter() - started
    device = result["device"]
    metrics = {"baseline": result["baseline"], "result": result["result"]}
    report = {
        "job_id": job_id,
        "spec": spec.model_dump(mode="json"),
        "inputs": {
            "model": {"id": model.id, "sha256": model.sha256, "format": model.format},
            "dataset": {"id": dataset.id, "sha256": dataset.sha256} if dataset else None,
            **(
                {"train_dataset": {"id": train_dataset.id, "sha256": train_dataset.sha256}}
                if train_dataset is not None
                else {}
            ),
        },
        "device": device,
        "steps": result["steps"],
        "notes": result["notes"],
        "metrics": metrics,
        "pipeline_wall_s": round(wall_s, 3),
        "environment": environment(),
    }
    report_path = workdir / "report.json"
    report_path.write_text(json.dumps(report, indent=2, default=str))
    markdown_path = workdir / "report.md"
    markdown_path.write_text(render_markdown(report))
    store = get_store()
    outputs: list[tuple[str, str, str, Path]] = []
    if result["output_path"] is not None:
        fmt = result["output_format"]
        outputs.append(("model", fmt, f"{job_id}{suffix_of(fmt)}", Path(result["output_path"])))
    outputs.append(("report", "json", f"{job_id}-report.json", report_path))
    outputs.append(("report_markdown", "markdown", f"{job_id}-report.md", markdown_path))
    stored = [(kind, fmt, name, *store.put_file(path)) for kind, fmt, name, path in outputs]

    def _record() -> bool:
        with session_scope() as s:
            done = s.execute(
                update(CompressionJob)
                .where(CompressionJob.id == job_id, CompressionJob.status == "running")
                .values(
                    status="succeeded",
                    progress=1.0,
                    stage="done",
                    finished_at=utcnow(),
                    metrics=metrics,
                    report={k: report[k] for k in ("device", "steps", "notes", "pipeline_wall_s", "environment")},
                    error=None,
                )
            ).rowcount
            if not done:
                return False
            for note in result["notes"]:  # the pipeline gathers every step's notes
                add_event(s, job_id, "log", level="info", message=note)
            add_event(s, job_id, "state", status="succeeded")
            job = s.get(CompressionJob, job_id)
            if job is not None:
                queue_delivery(s, job)
            for kind, fmt, name, sha, size in stored:
                register_blob(s, sha256=sha, size_bytes=size)
                s.add(
                    Artifact(
                        job_id=job_id,
                        owner_id=owner_id,
                        kind=kind,
                        format=fmt,
                        filename=name,
                        sha256=sha,
                        size_bytes=size,
                    )
                )
            return True

    if not with_db_retry(_record):
        # Cancelled at the last moment: drop the bytes unless another row already shares them.
        with session_scope() as s:
            for *_, sha, _size in stored:
                if not is_referenced(s, sha):
                    store.delete(sha)
        raise JobCancelled(job_id)
