from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Body, Depends, Header, Query, status
from fastapi.responses import Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from app.changes import FEED
from app.db import read_connection
from app.deps import CurrentUser, SessionDep, SettingsDep
from app.errors import NotFound
from app.idempotency import idempotency_key
from app.jobs import service
from app.jobs.events import stream as stream_events
from app.jobs.schemas import ArtifactPublic as ArtifactPublic  # imported from here by app.artifacts.router
from app.jobs.schemas import JobPublic, JobsPublic
from app.jobs.spec import JobSpec
from app.jobs.views import JOB_VIEWS, read_job_view, to_public
from app.queue import enqueue_job
from app.responses import errors
from app.tables import User

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

EXAMPLE = {
    "model_id": "mdl_...",
    "dataset_id": "dst_...",
    "steps": [
        {"op": "prune", "method": "magnitude", "sparsity": 0.5, "scope": "global"},
        {"op": "quantize", "method": "int8_dynamic"},
    ],
    "device": "auto",
}


@router.post("", status_code=status.HTTP_202_ACCEPTED, responses=errors(400, 404, 409, 422, 429))
def submit_job(
    spec: Annotated[JobSpec, Body(examples=[EXAMPLE])],
    session: SessionDep,
    settings: SettingsDep,
    user: CurrentUser,
    key: Annotated[str | None, Depends(idempotency_key)],
) -> JobPublic:
    """Submit a compression job: steps run in order on a worker; both versions are measured on the dataset.

    Everything that can be checked is checked here (method vs format, dataset vs model inputs, device), so an
    accepted job does not fail for a reason the spec could have shown. An identical earlier job (same model
    bytes, dataset bytes and spec) is returned at once with `cache_hit: true` unless `cache` is false.
    With an `Idempotency-Key` header, a retried request returns the job the first one created.
    """
    job, needs_enqueue = service.create_job(session, settings, spec=spec, user=user, idempotency_key=key)
    if needs_enqueue:
        # After the commit, with the id only: the worker reads everything else from the database.
        enqueue_job(job.id, job.queue)
    return to_public(job)


@router.get("", responses=errors(400))
def list_jobs(
    session: SessionDep,
    user: CurrentUser,
    status_: Literal["queued", "running", "succeeded", "failed", "cancelled"] | None = Query(None, alias="status"),
    limit: int = Query(50, ge=1, le=500),
    cursor: str | None = Query(None, max_length=200),
) -> JobsPublic:
    """Your jobs, newest first, optionally filtered by status."""
    rows, nxt = service.list_jobs(session, user=user, status=status_, limit=limit, cursor=cursor)
    return JobsPublic(items=[to_public(j) for j in rows], next_cursor=nxt)


@router.get("/{job_id}", response_model=JobPublic, responses=errors(404))
async def get_job(job_id: str, user: CurrentUser) -> Response:
    """A job's status, progress, stage, metrics (baseline vs result) and artifacts."""
    # Clients poll this route, so it is kept cheap. A job unchanged since the last read is answered from JOB_VIEWS
    # (kept exact by the database's change notifications, app.changes) on the event loop. Otherwise: no session,
    # one thread step that takes a connection, runs one SELECT in autocommit mode and gives it back (see
    # app.deps), and the body serialized once (FastAPI would validate a returned model a second time first).
    cached = JOB_VIEWS.get(job_id)
    if cached is None:
        fence = FEED.fence()
        owner_id, body = await run_in_threadpool(_read_job, job_id, user)
        JOB_VIEWS.put(job_id, owner_id, body, fence)
    elif cached.owner_id == user.id or user.is_admin:
        body = cached.body
    else:
        raise NotFound(f"job {job_id!r} not found", code="job_not_found")  # as read_job_view answers
    return Response(body, media_type="application/json")


def _read_job(job_id: str, user: User) -> tuple[str, bytes]:
    with read_connection() as conn:
        owner_id, view = read_job_view(conn, job_id=job_id, user=user)
    return owner_id, view.model_dump_json().encode()


@router.get(
    "/{job_id}/events",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}, "description": "Server-Sent Events"}, **errors(404)},
)
def job_events(
    job_id: str,
    session: SessionDep,
    user: CurrentUser,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID", max_length=20)] = None,
) -> StreamingResponse:
    """Follow a job live as Server-Sent Events: `state` (queued, running, succeeded, failed, cancelled),
    `progress` (progress 0..1 and stage) and `log` lines, ending after the final state.

    Reconnect with `Last-Event-ID` to resume exactly after the last event received.
    """
    service.get_job(session, job_id=job_id, user=user)  # 404 for unknown or another user's job
    # isascii: str.isdigit() is also true of '²' and other digits that int() refuses (a 500).
    after = int(last_event_id) if last_event_id and last_event_id.isascii() and last_event_id.isdigit() else 0
    return StreamingResponse(
        stream_events(job_id, after=after, max_seconds=600),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@router.post("/{job_id}/cancel", responses=errors(404))
def cancel_job(job_id: str, session: SessionDep, user: CurrentUser) -> JobPublic:
    """Cancel a queued or running job (a running job stops at its next stage). Finished jobs are unchanged."""
    return to_public(service.cancel_job(session, job_id=job_id, user=user))
