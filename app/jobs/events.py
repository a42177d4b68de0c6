"""Job events: the ordered record that ``GET /v1/jobs/{id}/events`` streams as Server-Sent Events.

Written by the API (queued, cancelled, re-enqueued) and by workers (running, progress, log lines, the outcome)
in the same transactions as the state they describe. Event ids are the table's sequence, so a client that
reconnects with ``Last-Event-ID`` gets exactly what it missed.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from app.tables import CompressionJob, JobEvent

TERMINAL = ("succeeded", "failed", "cancelled")
POLL_S = 0.25
KEEPALIVE_S = 15.0


def add_event(session: Session, job_id: str, kind: str, **data: Any) -> None:
    session.add(JobEvent(job_id=job_id, kind=kind, data=data))


def _fetch(job_id: str, after: int) -> tuple[list[JobEvent], str | None]:
    from app.db import get_sessionmaker

    with get_sessionmaker()() as s:
        # The status first: the final state's event commits with the status, so once the status read says
        # terminal, the events read after it holds that event. (Read the other way round, a job finishing between
        # the two reads ended the stream without its final event.)
        status = s.scalar(select(CompressionJob.status).where(CompressionJob.id == job_id))
        events = list(
            s.scalars(
                select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.id > after).order_by(JobEvent.id).limit(500)
            )
        )
    return events, status


def format_sse(event: JobEvent) -> str:
    payload = json.dumps({**event.data, "at": event.created_at.isoformat()}, separators=(",", ":"))
    return f"id: {event.id}\nevent: {event.kind}\ndata: {payload}\n\n"


async def stream(job_id: str, *, after: int, max_seconds: float) -> AsyncIterator[str]:
    """Events after ``after`` until the job's final state has been sent (or ``max_seconds``: then reconnect)."""
    yield "retry: 1000\n\n"
    deadline = time.monotonic() + max_seconds
    last_sent = time.monotonic()
    while time.monotonic() < deadline:
        events, status = await run_in_threadpool(_fetch, job_id, after)
        for event in events:
            yield format_sse(event)
            after = event.id
            last_sent = time.monotonic()
            if event.kind == "state" and event.data.get("status") in TERMINAL:
                return
        if not events and status in TERMINAL:
            return  # the final state was sent on an earlier connection
        if time.monotonic() - last_sent > KEEPALIVE_S:
            yield ": keep-alive\n\n"
            last_sent = time.monotonic()
        if len(events) < 500:
            await asyncio.sleep(POLL_S)
