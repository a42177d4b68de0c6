"""Celery tasks: thin. Claim the job in SQL, run it, record the outcome; the logic lives in ``worker.runner``."""

from __future__ import annotations

import logging

from celery.exceptions import SoftTimeLimitExceeded

from app.queue import RUN_JOB_TASK
from worker.celery_app import celery_app

log = logging.getLogger("squeeze.worker")


@celery_app.task(name=RUN_JOB_TASK, bind=True)
def run_job(self, job_id: str) -> None:  # type: ignore[no-untyped-def]
    from worker import runner

    try:
        runner.run_job(job_id, worker=self.request.hostname or "worker")
    except SoftTimeLimitExceeded:
        runner.fail_job(job_id, "timeout", "the job ran past the time limit and was stopped")
