from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response, status
from fastapi.responses import FileResponse

from app.deps import CurrentUser, SessionDep, SettingsDep, StoreDep
from app.downloads import REDIRECT_RESPONSE, blob_download
from app.idempotency import idempotency_key
from app.models import service
from app.models.schemas import ModelPublic, ModelsPublic
from app.responses import errors
from app.tables import ModelUpload

router = APIRouter(prefix="/v1/models", tags=["models"])

UPLOAD_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {"type": "string", "format": "binary"},
                        # Not maxLength: a longer name is cut (app.uploads.display_name), not refused.
                        "name": {
                            "type": "string",
                            "description": "Display name (default: the file name); control characters are dropped "
                            "and it is cut to 256 characters.",
                        },
                    },
                }
            },
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


def to_public(model: ModelUpload) -> ModelPublic:
    info = model.inspection
    return ModelPublic(
        id=model.id,
        name=model.name,
        format=model.format,
        packaging=model.packaging,
        size_bytes=model.size_bytes,
        sha256=model.sha256,
        created_at=model.created_at,
        inputs=info.get("inputs", []),
        outputs=info.get("outputs", []),
        parameters=info.get("parameters", 0),
        details={k: v for k, v in info.items() if k not in {"inputs", "outputs", "parameters", "format"}},
    )


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    responses=errors(400, 403, 413, 422, 507),
    openapi_extra=UPLOAD_BODY,
)
async def upload_model(
    request: Request,
    session: SessionDep,
    store: StoreDep,
    settings: SettingsDep,
    user: CurrentUser,
    key: Annotated[str | None, Depends(idempotency_key)],
) -> ModelPublic:
    """Upload a model (multipart field `file`, optional `name`; or a raw octet-stream body with `?name=`).

    The format is detected from the content: ONNX, a .zip of ONNX with external data, or a torch.export `.pt2`.
    Pickled checkpoints are refused. The response says what inspection found: inputs, outputs, parameters.
    """
    return to_public(await service.upload_model(request, session, store, settings, user=user, idempotency_key=key))


@router.get("", responses=errors(400))
def list_models(
    session: SessionDep,
    user: CurrentUser,
    limit: int = Query(50, ge=1, le=500),
    cursor: str | None = Query(None, max_length=200),
) -> ModelsPublic:
    """Your models, newest first."""
    rows, nxt = service.list_models(session, user=user, limit=limit, cursor=cursor)
    return ModelsPublic(items=[to_public(m) for m in rows], next_cursor=nxt)


@router.get("/{model_id}", responses=errors(404))
def get_model(model_id: str, session: SessionDep, user: CurrentUser) -> ModelPublic:
    """One model and what inspection found."""
    return to_public(service.get_model(session, model_id=model_id, user=user))


@router.get(
    "/{model_id}/download",
    response_class=FileResponse,
    responses={**REDIRECT_RESPONSE, **errors(400, 404, 416, 503)},
)
def download_model(
    model_id: str, request: Request, session: SessionDep, store: StoreDep, user: CurrentUser
) -> Response:
    """The model's bytes as uploaded. `ETag` is the sha256; `Range` is supported (or a 307 to a presigned URL)."""
    model = service.get_model(session, model_id=model_id, user=user)
    suffixes = {
        "onnx": ".zip" if model.packaging == "zip" else ".onnx",
        "pt2": ".pt2",
        "torchscript": ".pt",
        "hf": ".tar" if model.packaging == "tar" else ".zip",
    }
    suffix = suffixes.get(model.format, "")
    return blob_download(
        request,
        store,
        sha256=model.sha256,
        size_bytes=model.size_bytes,
        filename=f"{model.id}{suffix}",
        media_type="application/octet-stream",
        what="model",
    )


@router.delete("/{model_id}", status_code=status.HTTP_204_NO_CONTENT, responses=errors(404, 409))
def delete_model(model_id: str, session: SessionDep, store: StoreDep, user: CurrentUser) -> Response:
    """Delete a model; refused with 409 while a queued or running job uses it."""
    service.delete_model(session, store, model_id=model_id, user=user)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
