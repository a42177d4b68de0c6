"""The public view of a job (``JobPublic``): from ORM rows after a write, or read in one statement for a poll.

``GET /v1/jobs/{id}`` is the route clients poll. Loading the job through the ORM (a session, a ping, BEGIN, the job,
its artifacts and its webhook deliveries by ``selectin``, ROLLBACK) cost 1-2 ms of CPU per request and six round
trips; :func:`read_job_view` sends one SELECT on an autocommit connection and builds the same ``JobPublic``.
Both paths fill the job's fields through :func:`job_public`, by name, so the two cannot drift apart.

On PostgreSQL the rendered body is also kept in :data:`JOB_VIEWS`, an in-process cache that the database's change
notifications keep exact (app.changes): a poll of a job that has not changed since the last read costs no thread,
no connection and no serialization. An entry goes when its job, one of its artifacts or webhook deliveries is
written (by anyone), when the change feed connects or drops, and after ``max_age_s`` at the latest.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, bindparam, select

from app.changes import FEED
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


def read_job_view(conn: Connection, *, job_id: str, user: User) -> tuple[str, JobPublic]:
    """The job's owner id and the job as ``user`` may see it (404 if unknown or another user's, as ``get_owned``
    answers), read with one SELECT: the job joined to its artifacts. Only a job with a ``notify_url`` has webhook
    deliveries to read."""
    rows = conn.execute(_JOB_WITH_ARTIFACTS, {"job_id": job_id}).mappings().all() if could_be_id(job_id) else []
    if not rows or (rows[0]["owner_id"] != user.id and not user.is_admin):
        raise NotFound(f"job {job_id!r} not found", code="job_not_found")
    job: Mapping[str, Any] = rows[0]
    artifacts = [artifact_public(lambda name, r=r: r[f"artifact_{name}"]) for r in rows if r["artifact_id"] is not None]
    webhooks: list[dict[str, Any]] = []
    if (job["spec"] or {}).get("notify_url"):
        deliveries = conn.execute(_DELIVERIES_OF_JOB, {"job_id": job_id}).all()
        webhooks = [delivery_view(d) for d in deliveries]  # type: ignore[arg-type]
    return job["owner_id"], job_public(job.__getitem__, artifacts, webhooks)


@dataclass(frozen=True, slots=True)
class CachedView:
    owner_id: str
    body: bytes  # JobPublic as JSON
    expires: float  # time.monotonic()


class JobViewCache:
    """Rendered job views by job id, filled only through :meth:`put` with a fence from ``FEED.fence()`` taken before
    the database read (see app.changes). Bounded: the oldest entry goes first once ``max_entries`` are held."""

    def __init__(self, max_entries: int = 10_000, max_age_s: float = 30.0) -> None:
        self.max_entries = max_entries
        self.max_age_s = max_age_s
        self._entries: dict[str, CachedView] = {}
        self._lock = threading.Lock()
        FEED.subscribe("job", self.drop, self.clear)

    def get(self, job_id: str) -> CachedView | None:
        entry = self._entries.get(job_id)
        return entry if entry is not None and entry.expires > time.monotonic() else None

    def put(self, job_id: str, owner_id: str, body: bytes, fence: int) -> bool:
        entry = CachedView(owner_id, body, time.monotonic() + self.max_age_s)

        def store() -> None:
            with self._lock:
                self._entries.pop(job_id, None)  # re-inserted at the end: the oldest are at the front
                while len(self._entries) >= self.max_entries:
                    del self._entries[next(iter(self._entries))]
                self._entries[job_id] = entry

        return FEED.store_if_unchanged("job", job_id, fence, store)

    def drop(self, job_id: str) -> None:
        with self._lock:
            self._entries.pop(job_id, None)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


JOB_VIEWS = JobViewCache()
