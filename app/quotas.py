"""Per-user quotas: stored bytes and jobs in flight. A limit of 0 means unlimited."""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.config import Settings
from app.errors import Forbidden, TooManyRequests
from app.tables import Artifact, CompressionJob, DatasetUpload, ModelUpload, User


def storage_used(session: Session, user: User) -> int:
    """Bytes of the user's models, datasets and artifacts, as each was stored (shared blobs count for each)."""
    total = 0
    for table in (ModelUpload, DatasetUpload, Artifact):
        total += session.scalar(select(func.coalesce(func.sum(table.size_bytes), 0)).where(table.owner_id == user.id))
    return int(total)


def upload_allowance(session: Session, settings: Settings, user: User) -> tuple[int, bool]:
    """(largest upload accepted now, whether that limit is the user's storage quota rather than the size cap)."""
    if not settings.quota_storage_bytes:
        return settings.max_upload_bytes, False
    left = settings.quota_storage_bytes - storage_used(session, user)
    if left <= 0:
        raise Forbidden(
            f"your storage quota of {settings.quota_storage_bytes} bytes is used up; delete models, datasets "
            "or jobs to make room",
            code="storage_quota_exceeded",
            details={"quota_bytes": settings.quota_storage_bytes},
        )
    return (left, True) if left < settings.max_upload_bytes else (settings.max_upload_bytes, False)


def check_job_slots(session: Session, settings: Settings, user: User) -> None:
    if not settings.quota_concurrent_jobs:
        return
    in_flight = session.scalar(
        select(func.count())
        .select_from(CompressionJob)
        .where(CompressionJob.owner_id == user.id, CompressionJob.status.in_(("queued", "running")))
    )
    if in_flight >= settings.quota_concurrent_jobs:
        raise TooManyRequests(
            f"you have {in_flight} jobs queued or running, the most allowed at once; wait for one to finish",
            code="too_many_jobs",
            details={"limit": settings.quota_concurrent_jobs},
        )
