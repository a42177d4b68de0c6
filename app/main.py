"""The HTTP service: ``create_app()`` wires routers, the one error envelope and start-up."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import Scope

from app.artifacts.router import router as artifacts_router
from app.changes import FEED, feeds_changes, invalidate_on_commit
from app.dashboard.router import router as dashboard_router
from app.datasets.router import router as datasets_router
from app.errors import SqueezeError, error_body
from app.jobs.router import router as jobs_router
from app.log_redaction import redact_access_log
from app.models.router import router as models_router
from app.observability import RequestContextMiddleware
from app.openapi import install_openapi, operation_id
from app.search.router import router as search_router
from app.system.router import router as system_router
from app.workers.router import router as workers_router

log = logging.getLogger("squeeze.api")

HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    416: "range_not_satisfiable",
    429: "too_many_requests",
}


TAGS = ("system", "models", "datasets", "jobs", "searches", "artifacts", "workers")  # the documentation's order
HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def allowed_methods(app: FastAPI, scope: Scope) -> str:
    """Every method the path accepts, for a 405's ``Allow``.

    Starlette fills ``Allow`` from the first route whose path matched, and FastAPI has one route per method, so
    ``/v1/models`` would answer ``Allow: POST`` although GET works too (RFC 9110 wants them all). Each method is
    tried against the routes instead.
    """
    return ", ".join(
        m
        for m in HTTP_METHODS
        if any(route.matches({**scope, "method": m})[0] == Match.FULL for route in app.router.routes)
    )


def make_lifespan(migrate_on_start: bool) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        from app.config import get_settings
        from app.jobs.reconcile import reconcile_forever

        settings = get_settings()
        for d in (settings.data_dir, settings.resolved_work_dir, settings.resolved_storage_dir):
            d.mkdir(parents=True, exist_ok=True)
        if migrate_on_start:
            from app.migrate import upgrade_database

            upgrade_database()
        background = [asyncio.create_task(reconcile_forever(settings))]
        if feeds_changes(settings.resolved_database_url):
            invalidate_on_commit()
            background.append(asyncio.create_task(FEED.listen_forever(settings.resolved_database_url)))
        if settings.webhook_secret.get_secret_value():
            from app.webhooks import deliver_forever

            background.append(asyncio.create_task(deliver_forever(settings)))
        try:
            yield
        finally:
            for task in background:
                task.cancel()
            # Awaited, so that the change feed has counted its listener out before another app starts here.
            await asyncio.gather(*background, return_exceptions=True)

    return lifespan


def create_app(*, migrate_on_start: bool = True) -> FastAPI:
    app = FastAPI(
        title="Squeeze",
        version="0.1.0",
        summary="Model compression as a service: prune, quantize, measure, download.",
        lifespan=make_lifespan(migrate_on_start),
        generate_unique_id_function=operation_id,
        openapi_tags=[{"name": t} for t in TAGS],
    )
    install_openapi(app)

    @app.exception_handler(SqueezeError)
    async def _squeeze_error(request: Request, exc: SqueezeError) -> JSONResponse:
        return JSONResponse(error_body(exc.code, exc.message, exc.details), status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errs = exc.errors()
        summary = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in errs[:5])
        details = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in errs]
        return JSONResponse(
            error_body("validation_error", f"invalid request: {summary}", {"errors": details}),
            status_code=422,
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = HTTP_CODES.get(exc.status_code, "http_error")
        headers = exc.headers
        if exc.status_code == 405 and (allow := allowed_methods(app, request.scope)):
            headers = {**(headers or {}), "Allow": allow}
        return JSONResponse(error_body(code, str(exc.detail)), status_code=exc.status_code, headers=headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse(error_body("internal_error", "internal server error"), status_code=500)

    redact_access_log()
    app.add_middleware(RequestContextMiddleware)
    # Routes are matched in order, one by one: the jobs router (GET /v1/jobs/{id}, the route clients poll) and
    # /healthz (probes) come first. The documentation keeps its own order (TAGS).
    for router in (
        jobs_router,
        system_router,
        models_router,
        datasets_router,
        search_router,
        artifacts_router,
        workers_router,
    ):
        app.include_router(router)
    app.include_router(dashboard_router)  # the web page; plain routes outside the OpenAPI document
    return app
