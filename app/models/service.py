"""Uploaded models: receive, inspect (torch-free), store once by content, list, delete."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from fastapi import Request
from sqlalchemy.orm import Session

from app import idempotency
from app.blobs import register_blob, release_blob
from app.config import Settings
from app.errors import Conflict, InvalidUpload
from app.ownership import get_owned, list_owned
from app.quotas import upload_allowance
from app.storage import ArtifactStore
from app.tables import ModelUpload, User
from app.uploads import store_upload


def _inspect(settings: Settings, path: Path) -> dict[str, Any]:
    from app.inspection import inspect_model

    workdir = Path(tempfile.mkdtemp(prefix="inspect-", dir=settings.resolved_work_dir))
    try:
        info = inspect_model(path, workdir).model_dump(mode="json")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if info["format"] not in settings.allowed_formats:
        raise InvalidUpload(
            f"{info['format']} models are not accepted by this deployment "
            f"(allowed: {', '.join(settings.allowed_formats)})",
            code="format_disabled",
        )
    return info


async def upload_model(
    request: Request,
    session: Session,
    store: ArtifactStore,
    settings: Settings,
    *,
    user: User,
    idempotency_key: str | None = None,
) -> ModelUpload:
    """Stream the upload into storage, detect its format from the content, record it."""
    settings.resolved_work_dir.mkdir(parents=True, exist_ok=True)
    earlier = idempotency.replay_upload(session, user=user, scope="models", key=idempotency_key, table=ModelUpload)
    if earlier is not None:
        return earlier  # a retry: the first request's upload, without storing the body again
    limit, quota_bound = upload_allowance(session, settings, user)
    received, sha, info = await store_upload(
        request, store, limit, lambda p: _inspect(settings, p), quota_bound=quota_bound
    )
    name = received.display_name(f"model-{sha[:12]}")
    register_blob(session, sha256=sha, size_bytes=received.writer.size)
    model = ModelUpload(
        owner_id=user.id,
        name=name,
        format=info["format"],
        packaging=info.get("packaging", "file"),
        sha256=sha,
        size_bytes=received.writer.size,
        inspection=info,
    )
    return idempotency.commit_upload(
        session, store, user=user, scope="models", key=idempotency_key, row=model, sha256=sha
    )


def get_model(session: Session, *, model_id: str, user: User) -> ModelUpload:
    return get_owned(session, ModelUpload, model_id, user, "model")


def list_models(
    session: Session, *, user: User, limit: int, cursor: str | None
) -> tuple[list[ModelUpload], str | None]:
    return list_owned(session, ModelUpload, user=user, limit=limit, cursor=cursor)


def delete_model(session: Session, store: ArtifactStore, *, model_id: str, user: User) -> None:
    """Delete a model no queued or running job uses (409 otherwise); its bytes go with their last reference."""
    from app.jobs.service import model_in_use

    model = get_model(session, model_id=model_id, user=user)
    if model_in_use(session, model.id):
        raise Conflict("a queued or running job uses this model; cancel it first", code="model_in_use")
    sha = model.sha256
    idempotency.forget_resource(session, owner_id=model.owner_id, scope="models", resource_id=model.id)
    session.delete(model)
    session.flush()
    release_blob(session, store, sha)
    session.commit()
