"""The reconciler: no job stays stuck because a message was lost.

The database is the source of truth; the broker only carries ids. A job can lose its message when the broker
is restarted or emptied, or when the API dies between committing a job and enqueuing it. A running job can lose
its worker. Every ``reconcile_interval_s`` the API sends again the id of each job that is queued with no taker
for ``requeue_after_s``, or running with a lease nobody renewed for three lease periods. Sending an id twice is
harmless: a worker claims a job with one conditional UPDATE, so only one delivery ever runs it.

The same loop applies ``SQUEEZE_ARTIFACT_RETENTION_DAYS`` once an hour (``app.admin.service.apply_retention``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import timedelta

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.orm import Session

from app.config import Settings
from app.jobs.events import add_event
from app.tables import CompressionJob, utcnow

log = logging.getLogger("squeeze.reconcile")
RETENTION_EVERY_S = 3600.0  # SQUEEZE_ARTIFACT_RETENTION_DAYS is applied at most this often


def find_lost_jobs(session: Session, settings: Settings) -> list[tuple[str, str]]:
    """(job id, queue) of every lost job, marked as enqueued now so the next pass leaves them alone."""
    now = utcnow()
    queued_cutoff = now - timedelta(seconds=settings.requeue_after_s)
    lease_cutoff = now - timedelta(seconds=3 * settings.job_lease_s)
    lost = or_(
        and_(
            CompressionJob.status == "queued",
            func.coalesce(CompressionJob.enqueued_at, CompressionJob.created_at) < queued_cutoff,
        ),
        and_(
            CompressionJob.status == "running",
            func.coalesce(CompressionJob.heartbeat_at, CompressionJob.created_at) < lease_cutoff,
            func.coalesce(CompressionJob.enqueued_at, CompressionJob.created_at) < lease_cutoff,
        ),
    )
    found = session.execute(select(CompressionJob.id, CompressionJob.queue, CompressionJob.kind).where(lost)).all()
    rows = [(r.id, r.queue) for r in found]
    # A running search has no worker between its trials: re-sending it is its periodic nudge, not news.
    searches = {r.id for r in found if r.kind == "search"}
    if rows:
        session.execute(
            update(CompressionJob).where(CompressionJob.id.in_([r[0] for r in rows])).values(enqueued_at=now)
        )
        for job_id, _queue in rows:
            if job_id in searches:
                continue
            add_event(session, job_id, "log", level="warning", message="no worker had the job: sent to the queue again")
    session.commit()
    return rows


def reconcile_once(settings: Settings) -> list[str]:
    from app.db import get_sessionmaker
    from app.queue import enqueue_job

    with get_sessionmaker()() as session:
        lost = find_lost_jobs(session, settings)
    for job_id, queue in lost:
        log.warning("re-enqueuing lost job %s on queue %s", job_id, queue)
        enqueue_job(job_id, queue)
    return [j for j, _ in lost]


async def reconcile_forever(settings: Settings) -> None:
    from app.admin.service import apply_retention

    next_retention = 0.0
    while True:
        await asyncio.sleep(settings.reconcile_interval_s)
        try:
            await asyncio.to_thread(reconcile_once, settings)
        except Exception:
            log.exception("reconciler pass failed; trying again in %ss", settings.reconcile_interval_s)
        if settings.artifact_retention_days and time.monotonic() >= next_retention:
            next_retention = time.monotonic() + RETENTION_EVERY_S
            try:
                await asyncio.to_thread(apply_retention, settings)
            except Exception:
                log.exception("retention pass failed; trying again in %ss", RETENTION_EVERY_S)
