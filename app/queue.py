"""The Celery application's configuration, shared by the API (which only enqueues) and the workers.

The database holds job state; Celery only carries job ids. Settings follow Celery's guidance for long jobs:
late acks with prefetch 1, a redelivery when a worker process dies (paired with an attempt counter in SQL),
soft and hard time limits, a visibility timeout above the hard limit, JSON only, no result backend.
"""

from __future__ import annotations

from functools import lru_cache

from celery import Celery

from app.config import Settings, get_settings

RUN_JOB_TASK = "squeeze.run_job"
QUEUES = ("cpu", "gpu")


def queue_name(logical: str, settings: Settings | None = None) -> str:
    """The broker's name for a logical queue ("cpu", "gpu"): with the deployment's prefix."""
    return (settings or get_settings()).queue_prefix + logical


def make_celery(settings: Settings) -> Celery:
    broker = settings.resolved_broker_url
    app = Celery("squeeze", broker=broker)
    transport_options: dict[str, object] = {
        # Above the hard time limit, so a long job is never handed to a second worker while the first runs it.
        "visibility_timeout": settings.job_time_limit_s + 600,
    }
    if broker.startswith("filesystem://"):
        folder = settings.broker_folder
        for sub in ("in", "processed", "control"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        transport_options.update(
            data_folder_in=str(folder / "in"),
            data_folder_out=str(folder / "in"),
            processed_folder=str(folder / "processed"),
            control_folder=str(folder / "control"),
            store_processed=False,
        )
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        result_backend=None,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_soft_time_limit=settings.job_soft_time_limit_s,
        task_time_limit=settings.job_time_limit_s,
        worker_max_tasks_per_child=settings.worker_max_tasks_per_child,
        worker_cancel_long_running_tasks_on_connection_loss=True,
        # SIGTERM (remapped to a cold shutdown by `squeeze worker`) first waits this long, then requeues the
        # unacknowledged job at once instead of leaving it to the visibility timeout.
        worker_soft_shutdown_timeout=settings.worker_soft_shutdown_s,
        worker_enable_soft_shutdown_on_idle=False,
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        task_default_queue=queue_name("cpu", settings),
        task_create_missing_queues=True,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        broker_heartbeat=0,
    )
    return app


@lru_cache
def get_celery() -> Celery:
    return make_celery(get_settings())


def enqueue_job(job_id: str, queue: str) -> None:
    """Send the job id (nothing else) to ``queue``. Call only after the job row is committed."""
    from app.observability import request_id_var

    get_celery().send_task(
        RUN_JOB_TASK,
        args=[job_id],
        kwargs={"request_id": request_id_var.get()},
        queue=queue_name(queue),
        task_id=job_id,
    )


def broker_reachable(timeout_s: float = 2.0) -> bool:
    try:
        with get_celery().connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=timeout_s)
        return True
    except Exception:
        return False
