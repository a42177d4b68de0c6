"""Uploaded calibration/evaluation data: ``.npz`` files read without pickle, or JSONL text for Hugging Face models."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import Request
from sqlalchemy.orm import Session

from app import idempotency
from app.blobs import register_blob, release_blob
from app.config import Settings
from app.errors import Conflict
from app.ownership import get_owned, list_owned
from app.quotas import upload_allowance
from app.storage import ArtifactStore
from app.tables import DatasetUpload, User
from app.uploads import store_upload


def _inspect(path: Path) -> dict[str, Any]:
    from app.inspection import inspect_dataset

    return inspect_dataset(path).model_dump(mode="json", exclude_none=True)


async def upload_dataset(
    request: Request,
    session: Session,
    store: ArtifactStore,
    settings: Settings,
    *,
    user: User,
    idempotency_key: str | None = None,
) -> DatasetUpload:
    earlier = idempotency.replay_upload(session, user=user, scope="datasets", key=idempotency_key, table=DatasetUpload)
    if earlier is not None:
        return earlier  # a retry: the first request's upload, without storing the body again
    limit, quota_bound = upload_allowance(session, settings, user)
    received, sha, info = await store_upload(request, store, limit, _inspect, quota_bound=quota_bound)
    register_blob(session, sha256=sha, size_bytes=received.writer.size)
    dataset = DatasetUpload(
        owner_id=user.id,
        name=received.display_name(f"dataset-{sha[:12]}"),
        sha256=sha,
        size_bytes=received.writer.size,
        num_samples=info["num_samples"],
        arrays=info["arrays"],
        has_labels=info["has_labels"],
    )
    return idempotency.commit_upload(
        session, store, user=user, scope="datasets", key=idempotency_key, row=dataset, sha256=sha
    )


def get_dataset(session: Session, *, dataset_id: str, user: User) -> DatasetUpload:
    return get_owned(session, DatasetUpload, dataset_id, user, "dataset")


def list_datasets(
    session: Session, *, user: User, limit: int, cursor: str | None
) -> tuple[list[DatasetUpload], str | None]:
    return list_owned(session, DatasetUpload, user=user, limit=limit, cursor=cursor)


def delete_dataset(session: Session, store: ArtifactStore, *, dataset_id: str, user: User) -> None:
    from app.jobs.service import dataset_in_use

    dataset = get_dataset(session, dataset_id=dataset_id, user=user)
    if dataset_in_use(session, dataset.id):
        raise Conflict("a queued or running job uses this dataset; cancel it first", code="dataset_in_use")
    sha = dataset.sha256
    idempotency.forget_resource(session, owner_id=dataset.owner_id, scope="datasets", resource_id=dataset.id)
    session.delete(dataset)
    session.flush()
    release_blob(session, store, sha)
    session.commit()
