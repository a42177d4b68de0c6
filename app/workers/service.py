"""The worker registry: each worker process writes its own row at start, refreshes it with heartbeats, and marks
it stopped on a clean shutdown. The API reads it to list workers and to refuse jobs no live worker can run."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any, Literal

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from app.errors import Conflict
from app.tables import WorkerNode, as_utc, utcnow

# Dead workers stay listed (``?all=true``) this long after their last heartbeat; older rows are dropped.
HISTORY = timedelta(days=1)


def register_worker(
    session: Session,
    *,
    name: str,
    hostname: str,
    pid: int,
    queues: list[str],
    devices: list[str],
    gpus: list[dict[str, Any]],
    concurrency: int,
    version: str,
    ttl_s: float,
) -> WorkerNode:
    """Record a worker that has just started; drop rows of workers dead for longer than ``HISTORY``."""
    now = utcnow()
    session.execute(delete(WorkerNode).where(WorkerNode.expires_at < now - HISTORY))
    node = WorkerNode(
        name=name[:256],
        hostname=hostname[:256],
        pid=pid,
        queues=queues,
        devices=devices,
        gpus=gpus,
        concurrency=concurrency,
        version=version[:64],
        started_at=now,
        last_seen_at=now,
        expires_at=now + timedelta(seconds=ttl_s),
    )
    session.add(node)
    session.commit()
    return node


def heartbeat(session: Session, *, worker_id: str, ttl_s: float) -> bool:
    """Extend a running worker's liveness by ``ttl_s``; False when its row is gone or marked stopped."""
    now = utcnow()
    renewed = session.execute(
        update(WorkerNode)
        .where(WorkerNode.id == worker_id, WorkerNode.stopped_at.is_(None))
        .values(last_seen_at=now, expires_at=now + timedelta(seconds=ttl_s))
    ).rowcount
    session.commit()
    return bool(renewed)


def mark_stopped(session: Session, *, worker_id: str) -> None:
    """A clean shutdown: the worker stops being live at once instead of after its TTL."""
    now = utcnow()
    session.execute(
        update(WorkerNode).where(WorkerNode.id == worker_id).values(stopped_at=now, last_seen_at=now, expires_at=now)
    )
    session.commit()


def status_of(node: WorkerNode, now: datetime | None = None) -> Literal["live", "stale", "stopped"]:
    if node.stopped_at is not None:
        return "stopped"
    return "live" if as_utc(node.expires_at) > (now or utcnow()) else "stale"


def list_workers(session: Session, *, include_dead: bool = False) -> list[WorkerNode]:
    """Live workers, newest first; with ``include_dead``, also those stopped or silent within ``HISTORY``."""
    now = utcnow()
    stmt = select(WorkerNode)
    if include_dead:
        stmt = stmt.where(WorkerNode.expires_at >= now - HISTORY)
    else:
        stmt = stmt.where(WorkerNode.stopped_at.is_(None), WorkerNode.expires_at > now)
    return list(session.scalars(stmt.order_by(WorkerNode.started_at.desc(), WorkerNode.id.desc())))


def count_live_devices(nodes: list[WorkerNode]) -> dict[str, int]:
    """How many of these workers are live and offer each device ("cpu", "cuda"); devices nobody offers are absent."""
    now = utcnow()
    counts: dict[str, int] = {}
    for node in nodes:
        if status_of(node, now) == "live":
            for device in node.devices:
                counts[device] = counts.get(device, 0) + 1
    return counts


def live_devices(session: Session) -> dict[str, int]:
    return count_live_devices(list_workers(session))


def require_device(session: Session, device: str) -> None:
    """Refuse a job asking for a device no live worker offers (409 ``device_unavailable``).

    409, not 422: the spec is valid; the deployment cannot serve it right now (it can once a GPU worker starts).
    """
    live = live_devices(session)
    if device not in live:
        raise Conflict(
            f"no live worker offers {device}: use device 'cpu' or 'auto', or start a worker with "
            "`squeeze worker --queues gpu` on a GPU machine (GET /v1/workers lists the live ones)",
            code="device_unavailable",
            details={"device": device, "live_devices": sorted(live)},
        )
