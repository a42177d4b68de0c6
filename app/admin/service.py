"""Housekeeping: blobs nothing refers to (``squeeze admin gc``) and artifacts past their retention
(``squeeze admin retention``, or the API itself with ``SQUEEZE_ARTIFACT_RETENTION_DAYS``).

Bytes are stored before the row that refers to them is committed (an upload, a job's artifacts), so a blob with
no row may be one about to get one. Nothing younger than a grace period is deleted, and each deletion goes
through ``ArtifactStore.delete_unused``, which checks again after moving the bytes aside. Uploads still being
received live in the store's ``tmp`` folder and are never looked at.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TypeVar

from sqlalchemy import delete, exists, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.blobs import referenced
from app.config import Settings
from app.jobs.events import TERMINAL
from app.storage import ArtifactStore
from app.tables import Artifact, Blob, CompressionJob, as_utc, utcnow

log = logging.getLogger("squeeze.admin")
T = TypeVar("T")

GRACE = timedelta(hours=1)  # far above the seconds between storing bytes and committing their row
BATCH = 500


@dataclass
class GcReport:
    dry_run: bool
    deleted: list[str] = field(default_factory=list)  # sha256 of each blob deleted (or that would be)
    deleted_bytes: int = 0
    kept_recent: int = 0  # unreferenced, but younger than the grace period


@dataclass
class RetentionReport:
    dry_run: bool
    cutoff: datetime
    jobs: int = 0
    artifacts: int = 0
    artifact_bytes: int = 0  # as recorded on the artifact rows; blobs shared with other rows stay
    blobs: GcReport = field(default_factory=lambda: GcReport(dry_run=False))


def _batched(items: Iterable[T], n: int) -> Iterator[list[T]]:
    it = iter(items)
    while batch := list(itertools.islice(it, n)):
        yield batch


def _has_row(session: Session, sha256: str) -> bool:
    session.commit()  # a fresh snapshot: rows committed since this session last read count
    return session.scalar(select(Blob.sha256).where(Blob.sha256 == sha256)) is not None


def _release(session: Session, store: ArtifactStore, sha256: str, *, modified_before: datetime) -> bool:
    """Delete the blob's row unless a row refers to it, then its bytes if still unused; True if both are gone.

    The conditional DELETE and the foreign keys on the referring tables make a row committed meanwhile win: the
    DELETE then matches nothing or fails, and the blob stays.
    """
    try:
        session.execute(delete(Blob).where(Blob.sha256 == sha256, ~referenced(sha256)))
        session.commit()
    except IntegrityError:
        session.rollback()
        return False
    if _has_row(session, sha256):
        return False

    def unused() -> bool:
        return not _has_row(session, sha256)

    return store.delete_unused(sha256, modified_before=modified_before, unused=unused) or not store.exists(sha256)


def collect_garbage(
    session: Session, store: ArtifactStore, *, grace: timedelta = GRACE, dry_run: bool = False
) -> GcReport:
    """Delete blobs no model, dataset or artifact refers to, once older than ``grace``: rows left without
    references, and stored bytes that never got a row (a crash between storing and committing)."""
    cutoff = utcnow() - grace
    report = GcReport(dry_run=dry_run)
    candidates: list[tuple[str, int]] = []
    for sha, size, created_at in session.execute(
        select(Blob.sha256, Blob.size_bytes, Blob.created_at).where(~referenced(Blob.sha256))
    ):
        if as_utc(created_at) < cutoff:
            candidates.append((sha, size))
        else:
            report.kept_recent += 1
    for batch in _batched(store.iter_blobs(), BATCH):
        with_rows = set(session.scalars(select(Blob.sha256).where(Blob.sha256.in_([b.sha256 for b in batch]))))
        for blob in batch:
            if blob.sha256 in with_rows:
                continue  # referenced, or an unreferenced row found above
            if blob.modified_at < cutoff:
                candidates.append((blob.sha256, blob.size_bytes))
            else:
                report.kept_recent += 1
    session.commit()
    for sha, size in candidates:
        if dry_run or _release(session, store, sha, modified_before=cutoff):
            report.deleted.append(sha)
            report.deleted_bytes += size
    if report.deleted and not dry_run:
        log.info("gc deleted %d blobs (%d bytes)", len(report.deleted), report.deleted_bytes)
    return report


def expire_artifacts(
    session: Session,
    store: ArtifactStore,
    *,
    older_than: timedelta,
    grace: timedelta = GRACE,
    dry_run: bool = False,
) -> RetentionReport:
    """Delete the artifacts of jobs finished before ``older_than`` ago, then the blobs nothing else refers to.

    The jobs stay, with their metrics and report, and say when their artifacts went (``artifacts_expired_at``);
    such a job is no longer a cache hit for an identical new one. Models and datasets are never touched.
    """
    now = utcnow()
    report = RetentionReport(dry_run=dry_run, cutoff=now - older_than, blobs=GcReport(dry_run=dry_run))
    job_ids = list(
        session.scalars(
            select(CompressionJob.id).where(
                CompressionJob.status.in_(TERMINAL),
                CompressionJob.finished_at < report.cutoff,
                CompressionJob.artifacts_expired_at.is_(None),
                exists().where(Artifact.job_id == CompressionJob.id),
            )
        )
    )
    for batch in _batched(job_ids, BATCH):
        artifacts = session.execute(
            select(Artifact.sha256, Artifact.size_bytes).where(Artifact.job_id.in_(batch))
        ).all()
        report.jobs += len(batch)
        report.artifacts += len(artifacts)
        report.artifact_bytes += sum(size for _, size in artifacts)
        if dry_run:
            continue
        session.execute(delete(Artifact).where(Artifact.job_id.in_(batch)))
        session.execute(update(CompressionJob).where(CompressionJob.id.in_(batch)).values(artifacts_expired_at=now))
        session.commit()
        for sha, size in dict(artifacts).items():
            if _release(session, store, sha, modified_before=now - grace):
                report.blobs.deleted.append(sha)
                report.blobs.deleted_bytes += size
    if report.jobs and not dry_run:
        log.info(
            "retention deleted %d artifacts of %d jobs finished before %s; %d blobs (%d bytes) freed",
            report.artifacts,
            report.jobs,
            report.cutoff.isoformat(),
            len(report.blobs.deleted),
            report.blobs.deleted_bytes,
        )
    session.commit()
    return report


def apply_retention(settings: Settings) -> RetentionReport | None:
    """The API's periodic pass: ``SQUEEZE_ARTIFACT_RETENTION_DAYS`` (0 keeps everything)."""
    if not settings.artifact_retention_days:
        return None
    from app.db import get_sessionmaker
    from app.storage import get_store

    with get_sessionmaker()() as session:
        return expire_artifacts(session, get_store(), older_than=timedelta(days=settings.artifact_retention_days))
