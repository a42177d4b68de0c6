from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse

from app.deps import CurrentUser, SessionDep, StoreDep
from app.downloads import file_download
from app.errors import ServiceUnavailable
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


@router.get("/{artifact_id}/download", response_class=FileResponse, responses=errors(400, 404, 416, 503))
def download_artifact(
    artifact_id: str, request: Request, session: SessionDep, store: StoreDep, user: CurrentUser
) -> FileResponse:
    """Stream the artifact. `ETag` is its sha256 (verify after download); `Range` resumes a partial download."""
    art = _get(session, artifact_id, user)
    path = store.local_path(art.sha256)
    if not path.is_file() or path.stat().st_size != art.size_bytes:
        # Never serve bytes that are not the ones recorded (the ETag lets clients verify the full checksum).
        raise ServiceUnavailable("the artifact's bytes are missing or damaged in storage", code="artifact_missing")
    return file_download(
        request,
        path,
        sha256=art.sha256,
        filename=art.filename,
        media_type=MEDIA_TYPES.get(art.format, "application/octet-stream"),
    )
