from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, Response

from app.deps import CurrentUser, SessionDep, StoreDep
from app.downloads import REDIRECT_RESPONSE, blob_download
from app.jobs.router import ArtifactPublic
from app.ownership import get_owned
from app.responses import errors
from app.tables import Artifact, User

router = APIRouter(prefix="/v1/artifacts", tags=["artifacts"])

MEDIA_TYPES = {"json": "application/json", "md": "text/markdown; charset=utf-8"}


def _get(session: SessionDep, artifact_id: str, user: User) -> Artifact:
    return get_owned(session, Artifact, artifact_id, user, "artifact")


@router.get("/{artifact_id}", responses=errors(404))
def get_artifact(artifact_id: str, session: SessionDep, user: CurrentUser) -> ArtifactPublic:
    """An artifact's kind, format, size and sha256."""
    a = _get(session, artifact_id, user)
    return ArtifactPublic(
        id=a.id,
        kind=a.kind,
        format=a.format,
        filename=a.filename,
        size_bytes=a.size_bytes,
        sha256=a.sha256,
        download_url=f"/v1/artifacts/{a.id}/download",
    )


@router.get(
    "/{artifact_id}/download",
    response_class=FileResponse,
    responses={**REDIRECT_RESPONSE, **errors(400, 404, 416, 503)},
)
def download_artifact(
    artifact_id: str, request: Request, session: SessionDep, store: StoreDep, user: CurrentUser
) -> Response:
    """Stream the artifact. `ETag` is its sha256 (verify after download); `Range` resumes a partial download.

    With S3 storage and presigned downloads on, the answer is a 307 to a short-lived storage URL instead.
    """
    art = _get(session, artifact_id, user)
    return blob_download(
        request,
        store,
        sha256=art.sha256,
        size_bytes=art.size_bytes,
        filename=art.filename,
        media_type=MEDIA_TYPES.get(art.format, "application/octet-stream"),
        what="artifact",
    )
