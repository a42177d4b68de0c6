from __future__ import annotations

from fastapi import APIRouter, Query

from app.deps import CurrentUser, SessionDep
from app.responses import errors
from app.tables import WorkerNode
from app.workers import service
from app.workers.schemas import GpuPublic, WorkerPublic, WorkersPublic

router = APIRouter(prefix="/v1/workers", tags=["workers"])


def to_public(node: WorkerNode) -> WorkerPublic:
    return WorkerPublic(
        id=node.id,
        name=node.name,
        hostname=node.hostname,
        pid=node.pid,
        status=service.status_of(node),
        queues=node.queues,
        devices=node.devices,
        gpus=[GpuPublic.model_validate(g) for g in node.gpus],
        concurrency=node.concurrency,
        version=node.version,
        started_at=node.started_at,
        last_seen_at=node.last_seen_at,
        stopped_at=node.stopped_at,
    )


@router.get("", responses=errors())
def list_workers(
    session: SessionDep,
    user: CurrentUser,
    all_: bool = Query(False, alias="all", description="Also list workers stopped or silent in the last day."),
) -> WorkersPublic:
    """Worker processes as they registered themselves: queues, devices, GPUs, and whether they are live.

    A job asking for `device: cuda` is accepted only while a live worker offers cuda.
    """
    rows = service.list_workers(session, include_dead=all_)
    return WorkersPublic(items=[to_public(n) for n in rows], live_devices=service.count_live_devices(rows))
