"""The public view of a job (``JobPublic``): from ORM rows after a write, or read in one statement for a poll.

``GET /v1/jobs/{id}`` is the route clients poll. Loading the job through the ORM (a session, a ping, BEGIN, the job,
its artifacts and its webhook deliveries by ``selectin``, ROLLBACK) cost 1-2 ms of CPU per request and six round
trips; :func:`read_job_view` sends one SELECT on an autocommit connection and builds the same ``JobPublic``.
Both paths fill the job's fields through :func:`job_public`, by name, so the two cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from sqlalchemy import Connection, bindparam, select

from app.errors import NotFound
from app.jobs.schemas import ArtifactPublic, JobPublic
from app.tables import Artifact, CompressionJob, User, WebhookDelivery, could_be_id
from app.webhooks import delivery_view

_JOBS = CompressionJob.__table__
_ARTIFACTS = Artifact.__table__
_DELIVERIES = WebhookDelivery.__table__
# JobPublic's fields that are columns of the job row, read by name.
JOB_FIELDS = tuple(name for name in JobPublic.model_fields if name in _JOBS.c)
ARTIFACT_FIELDS = ("id", "kind", "format", "filename", "size_bytes", "sha256")


def artifact_public(field: Callable[[str], Any]) -> ArtifactPublic:
    artifact_id = field("id")
    return ArtifactPublic(
        **{name: field(name) for name in ARTIFACT_FIELDS}, download_url=f"/v1/artifacts/{artifact_id}/download"
    )


def job_public(
    field: Callable[[str], Any], artifacts: Iterable[ArtifactPublic], webhooks: Iterable[dict[str, Any]]
) -> JobPublic:
    """The view of a job whose column ``name`` is ``field(name)``."""
    return JobPublic(**{name: field(name) for name in JOB_FIELDS}, artifacts=list(artifacts), webhooks=list(webhooks))


def to_public(job: CompressionJob) -> JobPublic:
    return job_public(
        lambda name: getattr(job, name),
        (artifact_public(lambda name, a=a: getattr(a, name)) for a in job.artifacts),  # type: ignore[misc]
        (delivery_view(d) for d in job.webhook_deliveries),
    )


_JOB_WITH_ARTIFACTS = (
    select(
        _JOBS.c.owner_id,
        *(_JOBS.c[name] for name in JOB_FIELDS),
        *(_ARTIFACTS.c[name].label(f"artifact_{name}") for name in ARTIFACT_FIELDS),
    )
    .outerjoin(_ARTIFACTS, _ARTIFACTS.c.job_id == _JOBS.c.id)
    .where(_JOBS.c.id == bindparam("job_id"))
    .order_by(_ARTIFACTS.c.created_at)
)  # built once: SQLAlchemy then finds its compiled form without rebuilding the cache key on every request
_DELIVERIES_OF_JOB = (
    select(_DELIVERIES).where(_DELIVERIES.c.job_id == bindparam("job_id")).order_by(_DELIVERIES.c.created_at)
)


def read_job_view(conn: Connection, *, job_id: str, user: User) -> JobPublic:
    """The job as ``user`` may see it (404 if unknown or another user's, as ``get_owned`` answers), read with one
    SELECT: the job joined to its artifacts. Only a job with a ``notify_url`` has webhook deliveries to read."""
    rows = conn.execute(_JOB_WITH_ARTIFACTS, {"job_id": job_id}).mappings().all() if could_be_id(job_id) else []
    if not rows or (rows[0]["owner_id"] != user.id and not user.is_admin):
        raise NotFound(f"job {job_id!r} not found", code="job_not_found")
    job: Mapping[str, Any] = rows[0]
    artifacts = [artifact_public(lambda name, r=r: r[f"artifact_{name}"]) for r in rows if r["artifact_id"] is not None]
    webhooks: list[dict[str, Any]] = []
    if (job["spec"] or {}).get("notify_url"):
        deliveries = conn.execute(_DELIVERIES_OF_JOB, {"job_id": job_id}).all()
        webhooks = [delivery_view(d) for d in deliveries]  # type: ignore[arg-type]
    return job_public(job.__getitem__, artifacts, webhooks)
