from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request, Response, status
from fastapi.responses import FileResponse

from app.datasets import service
from app.datasets.schemas import DatasetPublic, DatasetsPublic
from app.deps import CurrentUser, SessionDep, SettingsDep, StoreDep
from app.downloads import REDIRECT_RESPONSE, blob_download
from app.idempotency import idempotency_key
from app.models.router import UPLOAD_BODY
from app.responses import errors
from app.tables import DatasetUpload

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])


def to_public(d: DatasetUpload) -> DatasetPublic:
    text = d.arrays.get("text", {}).get("dtype") == "text"
    return DatasetPublic(
        id=d.id,
        name=d.name,
        format="jsonl" if text else "npz",
        num_samples=d.num_samples,
        arrays=d.arrays,
        has_labels=d.has_labels,
        label_values=d.arrays.get("labels", {}).get("values") if text else None,
        sha256=d.sha256,
        size_bytes=d.size_bytes,
        created_at=d.created_at,
    )


@router.post(
    "", status_code=status.HTTP_201_CREATED, responses=errors(400, 403, 413, 422, 507), openapi_extra=UPLOAD_BODY
)
async def upload_dataset(
    request: Request,
    session: SessionDep,
    store: StoreDep,
    settings: SettingsDep,
    user: CurrentUser,
    key: Annotated[str | None, Depends(idempotency_key)],
) -> DatasetPublic:
    """Upload calibration/evaluation data: an `.npz` with one array per model input and optional `labels`.

    Arrays are named as the model's inputs (or `inputs` for a one-input model), share their first dimension
    (samples), and hold numbers only: object arrays are refused and nothing is unpickled.
    """
    return to_public(await service.upload_dataset(request, session, store, settings, user=user, idempotency_key=key))


@router.get("", responses=errors(400))
def list_datasets(
    session: SessionDep,
    user: CurrentUser,
    limit: int = Query(50, ge=1, le=500),
    cursor: str | None = Query(None, max_length=200),
) -> DatasetsPublic:
    """Your datasets, newest first."""
    rows, nxt = service.list_datasets(session, user=user, limit=limit, cursor=cursor)
    return DatasetsPublic(items=[to_public(d) for d in rows], next_cursor=nxt)


@router.get("/{dataset_id}", responses=errors(404))
def get_dataset(dataset_id: str, session: SessionDep, user: CurrentUser) -> DatasetPublic:
    """One dataset."""
    return to_public(service.get_dataset(session, dataset_id=dataset_id, user=user))


@router.get(
    "/{dataset_id}/download",
    response_class=FileResponse,
    responses={**REDIRECT_RESPONSE, **errors(400, 404, 416, 503)},
)
def download_dataset(
    dataset_id: str, request: Request, session: SessionDep, store: StoreDep, user: CurrentUser
) -> Response:
    """The dataset's bytes as uploaded. `ETag` is the sha256; `Range` is supported (or a 307 to a presigned URL)."""
    d = service.get_dataset(session, dataset_id=dataset_id, user=user)
    return blob_download(
        request,
        store,
        sha256=d.sha256,
        size_bytes=d.size_bytes,
        filename=f"{d.id}.npz",
        media_type="application/octet-stream",
        what="dataset",
    )


@router.delete("/{dataset_id}", status_code=status.HTTP_204_NO_CONTENT, responses=errors(404, 409))
def delete_dataset(dataset_id: str, session: SessionDep, store: StoreDep, user: CurrentUser) -> Response:
    """Delete a dataset; refused with 409 while a queued or running job uses it."""
    service.delete_dataset(session, store, dataset_id=dataset_id, user=user)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
