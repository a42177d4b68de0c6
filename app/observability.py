"""Request ids, structured JSON logs and Prometheus metrics.

Every log line carries the request id (taken from ``X-Request-ID`` or made up, and echoed back) and, in workers,
the job id; the API hands the request id to the worker with the job. ``GET /metrics`` (admin key) serves request
counts and latencies by route template, plus gauges read from the database and the broker at scrape time.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from pythonjsonlogger.json import JsonFormatter
from starlette.types import ASGIApp, Message, Receive, Scope, Send

request_id_var: ContextVar[str | None] = ContextVar("request_id", default=None)
job_id_var: ContextVar[str | None] = ContextVar("job_id", default=None)
_VALID_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")

REGISTRY = CollectorRegistry(auto_describe=True)
HTTP_REQUESTS = Counter(
    "squeeze_http_requests_total",
    "HTTP requests by route template and status",
    ["method", "route", "status"],
    registry=REGISTRY,
)
HTTP_LATENCY = Histogram(
    "squeeze_http_request_duration_seconds",
    "HTTP request latency by route template",
    ["method", "route"],
    registry=REGISTRY,
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 120),
)


class ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        record.job_id = job_id_var.get()
        return True


def configure_logging(fmt: str = "json", level: str = "INFO") -> None:
    """Root logging: one JSON object per line (or plain text), with request_id and job_id on every line."""
    handler = logging.StreamHandler()
    handler.addFilter(ContextFilter())
    if fmt == "json":
        handler.setFormatter(
            JsonFormatter(
                "%(asctime)s %(levelname)s %(name)s %(message)s %(request_id)s %(job_id)s",
                rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            )
        )
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s [req=%(request_id)s job=%(job_id)s] %(message)s")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "celery"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True


class RequestContextMiddleware:
    """Pure ASGI middleware (no body buffering): request id in and out, metrics by matched route template."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = dict(scope.get("headers") or []).get(b"x-request-id", b"").decode("latin-1")
        rid = incoming if _VALID_ID.match(incoming) else os.urandom(16).hex()  # as uuid4().hex, a third the cost
        token = request_id_var.set(rid)
        status = 500
        started = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", rid.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            HTTP_REQUESTS.labels(scope["method"], template, str(status)).inc()
            HTTP_LATENCY.labels(scope["method"], template).observe(time.perf_counter() - started)
            request_id_var.reset(token)


class StateCollector:
    """Gauges read at scrape time from the source of truth (the database) and the broker."""

    def describe(self) -> list[Any]:
        # Without it the registry (auto_describe) runs collect() at import, querying a database that may not be
        # migrated yet: `squeeze serve` on a fresh database crashed before it could migrate.
        return []

    def collect(self) -> Iterator[Any]:
        from sqlalchemy import func, select

        from app.db import get_sessionmaker
        from app.tables import Blob, CompressionJob
        from app.workers.service import live_devices

        jobs = GaugeMetricFamily("squeeze_jobs", "Jobs by status", labels=["status"])
        durations = GaugeMetricFamily(
            "squeeze_job_duration_seconds_avg", "Mean run time of succeeded jobs by first step", labels=["method"]
        )
        with get_sessionmaker()() as s:
            for status, n in s.execute(select(CompressionJob.status, func.count()).group_by(CompressionJob.status)):
                jobs.add_metric([status], n)
            stored = s.scalar(select(func.coalesce(func.sum(Blob.size_bytes), 0)))
            workers = live_devices(s)
            rows = s.execute(
                select(CompressionJob.spec, CompressionJob.started_at, CompressionJob.finished_at)
                .where(CompressionJob.status == "succeeded", CompressionJob.cache_hit.is_(False))
                .order_by(CompressionJob.finished_at.desc())
                .limit(1000)
            ).all()
        by_method: dict[str, list[float]] = {}
        for spec, started, finished in rows:
            if started and finished:
                steps = spec.get("steps") or []
                method = f"{steps[0]['op']}/{steps[0]['method']}" if steps else "evaluate"
                by_method.setdefault(method, []).append((finished - started).total_seconds())
        for method, values in by_method.items():
            durations.add_metric([method], sum(values) / len(values))
        yield jobs
        yield durations
        yield GaugeMetricFamily("squeeze_storage_bytes", "Bytes in the blob store", value=int(stored or 0))
        live = GaugeMetricFamily("squeeze_workers_live", "Live registered workers by device offered", labels=["device"])
        for device in sorted({"cpu", "cuda", *workers}):
            live.add_metric([device], workers.get(device, 0))
        yield live
        depth = GaugeMetricFamily("squeeze_queue_depth", "Messages waiting per queue", labels=["queue"])
        for queue, n in queue_depths().items():
            depth.add_metric([queue], n)
        yield depth


def queue_depths() -> dict[str, int]:
    from app.queue import QUEUES, get_celery, queue_name

    out: dict[str, int] = {}
    try:
        with get_celery().connection_for_read() as conn:
            channel = conn.default_channel
            for q in QUEUES:
                try:
                    out[q] = channel.queue_declare(queue=queue_name(q), passive=True).message_count
                except Exception:
                    out[q] = 0
    except Exception:
        logging.getLogger("squeeze.metrics").warning("broker unreachable while reading queue depths")
    return out


REGISTRY.register(StateCollector())
