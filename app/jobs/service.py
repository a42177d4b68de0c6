"""Compression jobs: validation at the door, the result cache, listing and cancellation."""

from __future__ import annotations

import hashlib
import json
from typing import Any, NamedTuple

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from app import idempotency
from app.config import Settings
from app.errors import InvalidSpec, InvalidUpload, NotFound
from app.jobs.capabilities import plan_formats
from app.jobs.events import add_event
from app.jobs.spec import TRAINING_STEPS, JobSpec, Step, trains
from app.ownership import get_owned, list_owned
from app.quotas import check_job_slots
from app.tables import Artifact, CompressionJob, DatasetUpload, ModelUpload, User, utcnow
from app.webhooks import check_notify_url, queue_delivery
from app.workers.service import require_device

TERMINAL = ("succeeded", "failed", "cancelled")


class JobInputs(NamedTuple):
    model: ModelUpload
    dataset: DatasetUpload | None
    train_dataset: DatasetUpload | None


def validate_spec(session: Session, settings: Settings, *, spec: JobSpec, user: User) -> JobInputs:
    """Everything that can be known before a worker sees the job; raises 404/422 with what to change."""
    model = get_owned(session, ModelUpload, spec.model_id, user, "model")
    dataset = get_owned(session, DatasetUpload, spec.dataset_id, user, "dataset") if spec.dataset_id else None
    steps = spec.effective_steps()
    train_dataset = _train_dataset(session, spec=spec, steps=steps, dataset=dataset, user=user)
    if spec.notify_url is not None:
        check_notify_url(spec.notify_url, settings)
    if spec.device == "cuda":
        # The registry decides: a live worker must offer cuda now. cpu/auto jobs are accepted with no live worker
        # (one may be starting, as `squeeze serve` starts its own) and wait in the queue.
        require_device(session, "cuda")
    if not steps and dataset is None:
        raise InvalidSpec(
            "a job without steps only evaluates the model, so it needs a dataset_id", code="dataset_required"
        )
    if dataset is None and any(t.get("shape") is None for t in model.inspection.get("inputs", [])):
        raise InvalidSpec(
            "this model's file does not record its input shapes (a scripted TorchScript module), so the model can "
            "only be run and measured on data: add a dataset_id",
            code="dataset_required",
            details={"reason": "input_shapes_unknown"},
        )
    for i, (step, (fmt, info)) in enumerate(zip(steps, plan_formats(model.format, steps), strict=True)):
        if info is None:
            raise InvalidSpec(
                f"steps[{i}]: {step.op}/{step.method} is not available for {fmt} models; see GET /v1/capabilities",
                code="method_not_supported",
                details={"step": i, "format": fmt, "op": step.op, "method": step.method},
            )
        refused = [o for o in info.get("unsupported_options", ()) if getattr(step, o, None)]
        if refused:
            raise InvalidSpec(
                f"steps[{i}]: {step.op}/{step.method} on {fmt} models does not take {', '.join(refused)}; "
                "see GET /v1/capabilities",
                code="method_not_supported",
                details={"step": i, "format": fmt, "options": refused},
            )
        if info["needs_dataset"] and dataset is None:
            raise InvalidSpec(
                f"steps[{i}]: {step.op}/{step.method} calibrates on data: add a dataset_id",
                code="dataset_required",
                details={"step": i},
            )
        on_train = train_dataset is not None and trains(step)
        trained_on = train_dataset if on_train else dataset
        if info.get("needs_labels") and not (trained_on is not None and trained_on.has_labels):
            raise InvalidSpec(
                f"steps[{i}]: {step.op}/{step.method} trains on labels: use a {'train ' if on_train else ''}dataset "
                "with a `labels` array",
                code="labels_required",
                details={"step": i, "field": "train_dataset_id" if on_train else "dataset_id"},
            )
        if spec.device == "cuda" and "cuda" not in info["devices"]:
            raise InvalidSpec(
                f"steps[{i}]: {step.op}/{step.method} does not run on cuda for {fmt} models",
                code="method_not_supported",
                details={"step": i, "device": "cuda"},
            )
    for field, data in (("dataset_id", dataset), ("train_dataset_id", train_dataset)):
        if data is not None:
            _check_fits(model, data, field)
    return JobInputs(model, dataset, train_dataset)


def _train_dataset(
    session: Session, *, spec: JobSpec, steps: list[Step], dataset: DatasetUpload | None, user: User
) -> DatasetUpload | None:
    """The job's training data, if it names one: only with a dataset to measure on and a step that trains."""
    if spec.train_dataset_id is None:
        return None
    if dataset is None:
        raise InvalidSpec(
            "train_dataset_id needs a dataset_id: training steps train on train_dataset_id and the job is measured "
            "on dataset_id",
            code="dataset_required",
            details={"field": "train_dataset_id"},
        )
    if not any(trains(step) for step in steps):
        raise InvalidSpec(
            f"train_dataset_id is used only by the steps that train ({', '.join(TRAINING_STEPS)}); this job has "
            "none: add one or leave train_dataset_id out",
            code="train_dataset_unused",
            details={"training_steps": list(TRAINING_STEPS)},
        )
    try:
        train = get_owned(session, DatasetUpload, spec.train_dataset_id, user, "dataset")
    except NotFound as exc:
        raise NotFound(
            f"train dataset {spec.train_dataset_id!r} not found", code=exc.code, details={"field": "train_dataset_id"}
        ) from exc
    if train.sha256 == dataset.sha256:
        # Trained and measured on the same samples, the "after" figures would not be held-out measurements.
        raise InvalidSpec(
            "train_dataset_id has the same bytes as dataset_id: the results would be measured on the samples "
            "trained on. Upload separate training data, or leave train_dataset_id out to train on 80% of dataset_id "
            "and report before/after on the held-out 20%",
            code="train_dataset_is_eval_dataset",
            details={"field": "train_dataset_id"},
        )
    return train


def _check_fits(model: ModelUpload, dataset: DatasetUpload, field: str) -> None:
    """The dataset's arrays feed the model's inputs (names, shapes, dtypes); 422 naming the field otherwise."""
    from app.inspection import check_dataset_for_model

    try:
        check_dataset_for_model(_model_inspection(model), _dataset_inspection(dataset))
    except InvalidUpload as exc:
        raise InvalidSpec(exc.message, code=exc.code, details={**exc.details, "field": field}) from exc


def create_job(
    session: Session,
    settings: Settings,
    *,
    spec: JobSpec,
    user: User,
    idempotency_key: str | None = None,
    parent_id: str | None = None,
) -> tuple[CompressionJob, bool]:
    """Validate and record a job. Returns (job, needs_enqueue); a cache hit is recorded already finished.

    With an idempotency key, a retry of the same request returns the job the first one created.
    """
    request_sha = hashlib.sha256(json.dumps(spec.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()
    if idempotency_key:
        earlier_id = idempotency.find(session, user=user, scope="jobs", key=idempotency_key, request_sha256=request_sha)
        if earlier_id is not None and (earlier_job := session.get(CompressionJob, earlier_id)) is not None:
            return earlier_job, False
    model, dataset, train_dataset = validate_spec(session, settings, spec=spec, user=user)
    check_job_slots(session, settings, user)
    key = spec.cache_key(
        model.sha256, dataset.sha256 if dataset else None, train_dataset.sha256 if train_dataset else None
    )
    job = CompressionJob(
        owner_id=user.id,
        model_id=model.id,
        dataset_id=dataset.id if dataset else None,
        train_dataset_id=train_dataset.id if train_dataset else None,
        spec=spec.model_dump(mode="json"),
        queue="gpu" if spec.device == "cuda" else "cpu",
        cache_key=key,
        enqueued_at=utcnow(),
        parent_id=parent_id,
    )
    earlier = None
    if spec.cache:
        earlier = session.scalar(
            select(CompressionJob)
            .where(
                CompressionJob.cache_key == key,
                CompressionJob.owner_id == user.id,
                CompressionJob.status == "succeeded",
                CompressionJob.artifacts_expired_at.is_(None),  # its artifacts were deleted: run it again
            )
            .order_by(CompressionJob.finished_at.desc())
            .limit(1)
        )
    if earlier is not None:
        now = utcnow()
        job.status, job.progress, job.stage = "succeeded", 1.0, "done"
        job.cache_hit = True
        job.metrics, job.report = earlier.metrics, earlier.report
        job.created_at = job.started_at = job.finished_at = now
        session.add(job)
        session.flush()
        if idempotency_key and (winner := _remember(session, user, idempotency_key, request_sha, job.id)):
            return winner, False
        add_event(session, job.id, "log", level="info", message=f"identical to job {earlier.id}: result reused")
        add_event(session, job.id, "state", status="succeeded", cache_hit=True)
        queue_delivery(session, job)
        for art in earlier.artifacts:
            session.add(
                Artifact(
                    job_id=job.id,
                    owner_id=user.id,
                    kind=art.kind,
                    format=art.format,
                    filename=art.filename,
                    sha256=art.sha256,
                    size_bytes=art.size_bytes,
                )
            )
        session.commit()
        session.refresh(job)
        return job, False
    session.add(job)
    session.flush()
    if idempotency_key and (winner := _remember(session, user, idempotency_key, request_sha, job.id)):
        return winner, False
    add_event(session, job.id, "state", status="queued", queue=job.queue)
    session.commit()
    return job, True


def _remember(session: Session, user: User, key: str, request_sha: str, job_id: str) -> CompressionJob | None:
    """Record the key for ``job_id``; if a concurrent request with the same key won, drop ours and return its job."""
    winner_id = idempotency.remember(
        session, user=user, scope="jobs", key=key, request_sha256=request_sha, resource_id=job_id
    )
    if winner_id == job_id:
        return None
    session.rollback()
    return session.get(CompressionJob, winner_id)


def get_job(session: Session, *, job_id: str, user: User) -> CompressionJob:
    return get_owned(session, CompressionJob, job_id, user, "job")


def list_jobs(
    session: Session, *, user: User, status: str | None, limit: int, cursor: str | None
) -> tuple[list[CompressionJob], str | None]:
    where = (CompressionJob.status == status,) if status else ()
    return list_owned(session, CompressionJob, user=user, limit=limit, cursor=cursor, where=where)


def cancel_job(session: Session, *, job_id: str, user: User) -> CompressionJob:
    """Cancel a queued or running job. A running one stops at its next progress report; finished ones stay."""
    job = get_job(session, job_id=job_id, user=user)
    if job.status not in TERMINAL:
        if job.kind == "search":
            from app.search.service import cancel_trials

            cancel_trials(session, job)
        job.status = "cancelled"
        job.stage = "cancelled"
        job.finished_at = utcnow()
        job.error = {"code": "cancelled", "message": "cancelled by the user", "details": {}}
        add_event(session, job.id, "state", status="cancelled", error=job.error)
        queue_delivery(session, job)
        session.commit()
    return job


def model_in_use(session: Session, model_id: str) -> bool:
    return (
        session.scalar(
            select(CompressionJob.id)
            .where(CompressionJob.model_id == model_id, CompressionJob.status.in_(("queued", "running")))
            .limit(1)
        )
        is not None
    )


def dataset_in_use(session: Session, dataset_id: str) -> bool:
    """Whether a queued or running job (or search) measures or trains on the dataset."""
    return (
        session.scalar(
            select(CompressionJob.id)
            .where(
                or_(CompressionJob.dataset_id == dataset_id, CompressionJob.train_dataset_id == dataset_id),
                CompressionJob.status.in_(("queued", "running")),
            )
            .limit(1)
        )
        is not None
    )


def _model_inspection(model: ModelUpload) -> Any:
    from app.inspection import ModelInspection

    return ModelInspection.model_validate(model.inspection)


def _dataset_inspection(dataset: DatasetUpload) -> Any:
    from app.inspection import DatasetInspection

    return DatasetInspection(num_samples=dataset.num_samples, arrays=dataset.arrays, has_labels=dataset.has_labels)
