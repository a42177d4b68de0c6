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
    kind, parent_id = runner.job_kind(job_id)
    if kind == "search":
        runner.advance_search(job_id)  # short: plan and record trials, or finish; the trials do the work
        return
    state = runner.run_job(job_id, worker=self.request.hostname or "worker")
    if parent_id is not None and state != "busy":
        try:
            runner.advance_search(parent_id)  # a trial ended (or was found finished): its search plans the next ones
        except Exception:  # the trial's own outcome is recorded; the reconciler re-sends the search later
            log.exception("advancing search %s after trial %s failed", parent_id, job_id)
    if state == "busy":
        # Redelivered while the previous worker's lease is still fresh (it was killed a moment ago, or it is
        # alive and this is a duplicate): look again once the lease could have expired.
        raise self.retry(countdown=get_settings().job_lease_s, max_retries=50)
