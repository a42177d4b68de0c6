"""Job state in SQL: atomic claims with leases, and the reconciler that re-sends lost jobs."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import update

from app.config import get_settings
from app.db import session_scope
from app.tables import CompressionJob, utcnow
from tests.api.test_jobs import _queued_ids
from tests.support.models import digits_npz_bytes, digits_onnx_bytes


@pytest.fixture
def job_id(client, alice) -> str:
    m = client.post("/v1/models", headers=alice, files={"file": ("m.onnx", digits_onnx_bytes())}).json()
    d = client.post("/v1/datasets", headers=alice, files={"file": ("d.npz", digits_npz_bytes(n=8))}).json()
    return client.post("/v1/jobs", headers=alice, json={"model_id": m["id"], "dataset_id": d["id"]}).json()["id"]


def _age(job_id: str, **columns_seconds_ago: int) -> None:
    values = {k: utcnow() - timedelta(seconds=v) for k, v in columns_seconds_ago.items()}
    with session_scope() as s:
        s.execute(update(CompressionJob).where(CompressionJob.id == job_id).values(**values))


def test_claim_is_exclusive_until_the_lease_expires(job_id) -> None:
    from worker.runner import claim

    assert claim(job_id, "w1") == ("claimed", 1)
    assert claim(job_id, "w2").state == "busy"  # w1's lease is fresh
    _age(job_id, heartbeat_at=get_settings().job_lease_s + 1)
    assert claim(job_id, "w2") == ("claimed", 2)  # w1 died: w2 takes over, the attempt is counted
    with session_scope() as s:
        s.execute(update(CompressionJob).where(CompressionJob.id == job_id).values(status="cancelled"))
    assert claim(job_id, "w3").state == "gone"


def test_reconciler_resends_lost_jobs_only(job_id, client, alice) -> None:
    from app.jobs.reconcile import reconcile_once

    settings = get_settings()
    fresh = client.post(
        "/v1/jobs",
        headers=alice,
        json={**client.get(f"/v1/jobs/{job_id}", headers=alice).json()["spec"], "evaluation": {"batch_size": 7}},
    ).json()["id"]
    assert reconcile_once(settings) == []  # both just enqueued
    # The message of job_id was lost (broker emptied, or the API died after the commit).
    import redis

    from tests.conftest import REDIS_URL, queue_key

    redis.Redis.from_url(REDIS_URL).delete(queue_key("cpu"))
    _age(job_id, enqueued_at=settings.requeue_after_s + 1)
    assert reconcile_once(settings) == [job_id]
    assert _queued_ids("cpu") == [job_id]
    assert reconcile_once(settings) == []  # not again until it is overdue again
    # A running job whose worker stopped renewing its lease is sent again; a live one is left alone.
    _age(fresh, heartbeat_at=0)
    with session_scope() as s:
        s.execute(update(CompressionJob).where(CompressionJob.id == fresh).values(status="running"))
    assert reconcile_once(settings) == []
    _age(fresh, heartbeat_at=3 * settings.job_lease_s + 1, enqueued_at=3 * settings.job_lease_s + 1)
    assert reconcile_once(settings) == [fresh]
