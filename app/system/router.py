from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from sqlalchemy import text
from starlette.concurrency import run_in_threadpool

from app.db import get_engine, get_sessionmaker
from app.deps import CurrentUser
from app.errors import Forbidden
from app.jobs.capabilities import CAPABILITIES, FORMATS
from app.queue import broker_reachable
from app.responses import ErrorResponse, errors
from app.storage import get_store
from app.workers.service import live_devices

router = APIRouter(tags=["system"])

READY_EXAMPLE = {"status": "ready", "checks": {"database": "ok", "broker": "ok", "storage": "ok"}}
NOT_READY_EXAMPLE = {
    "error": {
        "code": "not_ready",
        "message": "a dependency is unreachable",
        "details": {"database": "ok", "broker": "error: unreachable", "storage": "ok"},
    }
}
METRICS_EXAMPLE = '# TYPE squeeze_jobs gauge\nsqueeze_jobs{status="running"} 2.0\n'


@router.get("/healthz", responses={200: {"content": {"application/json": {"example": {"status": "ok"}}}}})
async def healthz() -> dict[str, str]:
    """The process is up (no dependency is checked)."""
    return {"status": "ok"}


@router.get(
    "/readyz",
    responses={
        200: {"content": {"application/json": {"example": READY_EXAMPLE}}},
        503: {
            "model": ErrorResponse,
            "description": "A dependency is unreachable",
            "content": {"application/json": {"example": NOT_READY_EXAMPLE}},
        },
    },
)
def readyz() -> JSONResponse:
    """Database, broker and storage are all reachable; 503 names those that are not."""
    checks: dict[str, str] = {}
    try:
        with get_engine().connect() as conn:
            conn.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as exc:
        checks["database"] = f"error: {type(exc).__name__}"
    checks["broker"] = "ok" if broker_reachable() else "error: unreachable"
    try:
        get_store().check()
        checks["storage"] = "ok"
    except Exception as exc:
        checks["storage"] = f"error: {type(exc).__name__}"
    ok = all(v == "ok" for v in checks.values())
    if ok:
        return JSONResponse({"status": "ready", "checks": checks})
    return JSONResponse(
        {"error": {"code": "not_ready", "message": "a dependency is unreachable", "details": checks}},
        status_code=503,
    )


@router.get(
    "/metrics",
    response_class=Response,  # so that only the text is documented for 200 (errors are JSON all the same)
    responses={
        200: {
            "content": {"text/plain": {"schema": {"type": "string"}, "example": METRICS_EXAMPLE}},
            "description": "Prometheus text format",
        },
        **errors(403),
    },
)
def metrics(user: CurrentUser) -> PlainTextResponse:
    """Prometheus metrics (admin key): requests and latency by route, jobs by status, queue depth, storage."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    from app.observability import REGISTRY

    if not user.is_admin:
        raise Forbidden("metrics cover every user's jobs: use an admin key", code="admin_required")
    return PlainTextResponse(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)


@router.get(
    "/v1/capabilities",
    response_model=dict[str, Any],
    responses={
        200: {
            "content": {
                "application/json": {
                    "example": {"formats": FORMATS, "methods": CAPABILITIES, "live_devices": {"cpu": 2, "cuda": 1}}
                }
            }
        },
        **errors(),
    },
)
async def capabilities(user: CurrentUser) -> Response:
    """Formats x methods: what each method needs (dataset, labels) and the devices it runs on; `live_devices`:
    how many live workers offer each device now (a `device: cuda` job needs one)."""
    # The 12 KB of formats and methods never change in a process: serialized once. Only the live devices are read.
    live = await run_in_threadpool(_live_devices)
    return Response(_STATIC_CAPABILITIES + json.dumps(live).encode() + b"}", media_type="application/json")


_STATIC_CAPABILITIES = json.dumps({"formats": FORMATS, "methods": CAPABILITIES})[:-1].encode() + b', "live_devices": '


def _live_devices() -> dict[str, int]:
    with get_sessionmaker()() as session:  # checked out and given back in this one thread step
        return live_devices(session)
