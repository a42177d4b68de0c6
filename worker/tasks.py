"""Celery tasks: thin. Claim the job in SQL, run it, record the outcome; the logic lives in ``worker.runner``."""

from __future__ import annotations

import logging

from app.queue import RUN_JOB_TASK
from worker.celery_app import celery_app

log = logging.getLogger("squeeze.worker")


@celery_app.task(name=RUN_JOB_TASK, bind=True)
def run_job(self, job_id: str, request_id: str | None = None) -> None:  # type: ignore[no-untyped-def]
    from app.config import get_settings
    from app.observability import job_id_var, request_id_var
    from worker import runner

    request_id_var.set(request_id)
    job_id_var.set(job_id)
    log.info("job received")
    state = runner.run_job(job_id, worker=self.request.hostname or "worker")
    if state == "busy":
        # Redelivered while the previous worker's lease is still fresh (it was killed a moment ago, or it is
        # alive and this is a duplicate): look again once the lease could have expired.
        raise self.retry(countdown=get_settings().job_lease_s, max_retries=50)
