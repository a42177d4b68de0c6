from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text

from app.db import get_engine
from app.deps import CurrentUser
from app.jobs.capabilities import CAPABILITIES, FORMATS
from app.queue import broker_reachable
from app.responses import errors
from app.storage import get_store

router = APIRouter(tags=["system"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process is up (no dependency is checked)."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "A dependency is unreachable"}})
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


@router.get("/v1/capabilities", responses=errors())
def capabilities(user: CurrentUser) -> dict[str, Any]:
    """Formats x methods: what each method needs (dataset, labels) and the devices it runs on."""
    return {"formats": FORMATS, "methods": CAPABILITIES}
