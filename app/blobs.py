"""Blob rows and their lifetime: a blob is kept while any model, dataset or artifact row refers to it."""

from __future__ import annotations

from sqlalchemy import ColumnElement, exists, select
from sqlalchemy.orm import Session

from app.storage import ArtifactStore
from app.tables import Artifact, Blob, DatasetUpload, ModelUpload


def register_blob(session: Session, *, sha256: str, size_bytes: int) -> None:
    """Record a committed blob (idempotent: the same bytes uploaded twice are one blob)."""
    if session.get(Blob, sha256) is None:
        session.add(Blob(sha256=sha256, size_bytes=size_bytes))
        session.flush()


def referenced(sha256: str | ColumnElement[str]) -> ColumnElement[bool]:
    """SQL: some model, dataset or artifact row refers to ``sha256`` (a value, or a column such as Blob.sha256)."""
    return (
        exists().where(ModelUpload.sha256 == sha256)
        | exists().where(DatasetUpload.sha256 == sha256)
        | exists().where(Artifact.sha256 == sha256)
    )


def is_referenced(session: Session, sha256: str) -> bool:
    return bool(session.scalar(select(referenced(sha256))))


def release_blob(session: Session, store: ArtifactStore, sha256: str) -> bool:
    """Delete the blob's row and file if nothing refers to it any more. Call after the referring row is gone."""
    session.flush()
    if is_referenced(session, sha256):
        return False
    blob = session.get(Blob, sha256)
    if blob is not None:
        session.delete(blob)
    session.commit()
    store.delete(sha256)
    return True
