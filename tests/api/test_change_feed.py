"""The change feed that keeps the API's job and key caches exact (app.changes): the fence logic on its own, then the
real thing on PostgreSQL, where another connection's writes (a worker's, another API's, psql's) reach the API's
answers through the triggers' notifications, and a lost listener turns the caches off instead of leaving them stale."""

from __future__ import annotations

import time

import psycopg

from app.changes import APPLICATION_NAME, ChangeFeed
from tests.support.service import wait_for


class _Cache:
    def __init__(self, feed: ChangeFeed) -> None:
        self.entries: dict[str, str] = {}
        feed.subscribe("job", lambda ident: self.entries.pop(ident, None), self.entries.clear)


def _feed_with_cache(live: bool = True) -> tuple[ChangeFeed, _Cache]:
    feed = ChangeFeed(remembered=2)
    cache = _Cache(feed)
    if live:
        feed._reset(+1)  # what a listener does once its LISTEN succeeded
    return feed, cache


def _put(feed: ChangeFeed, cache: _Cache, ident: str, value: str, fence: int) -> bool:
    return feed.store_if_unchanged("job", ident, fence, lambda: cache.entries.__setitem__(ident, value))


def test_a_read_that_raced_a_change_is_not_cached() -> None:
    feed, cache = _feed_with_cache()
    fence = feed.fence()
    feed.dispatch("job:a")  # the job changed while its old version was being read
    assert not _put(feed, cache, "a", "old", fence) and cache.entries == {}
    assert _put(feed, cache, "b", "b1", fence)  # another job's read is not held back by it
    fence = feed.fence()
    assert _put(feed, cache, "a", "new", fence) and cache.entries == {"b": "b1", "a": "new"}
    feed.dispatch("job:a")
    assert cache.entries == {"b": "b1"}
    feed.dispatch("key:a")  # other kinds go to their own subscribers
    feed.dispatch("job:")  # malformed payloads are ignored
    assert cache.entries == {"b": "b1"}


def test_forgotten_changes_still_fence_out_old_reads() -> None:
    feed, cache = _feed_with_cache()  # remembers the last 2 changed ids
    fence = feed.fence()
    for ident in ("a", "b", "c"):
        feed.dispatch(f"job:{ident}")
    assert not _put(feed, cache, "a", "old", fence)  # "a" was forgotten: its change is assumed after the fence
    assert not _put(feed, cache, "z", "old", fence)  # as is any id not remembered
    assert _put(feed, cache, "z", "new", feed.fence())


def test_nothing_is_cached_unless_the_feed_is_live_and_a_truncate_clears_all() -> None:
    feed, cache = _feed_with_cache(live=False)
    assert not feed.live and not _put(feed, cache, "a", "v", feed.fence())
    feed._reset(+1)
    fence = feed.fence()
    assert _put(feed, cache, "a", "v", fence)
    feed.dispatch("all:compression_jobs")
    assert cache.entries == {} and not _put(feed, cache, "a", "v", fence)
    assert _put(feed, cache, "a", "v", feed.fence())
    feed._reset(-1)  # the listener dropped: emptied, and off
    assert cache.entries == {} and not feed.live and not _put(feed, cache, "a", "v", feed.fence())


def _pg_url(service_env: dict[str, str]) -> str:
    return service_env["SQUEEZE_DATABASE_URL"].replace("postgresql+psycopg://", "postgresql://")


def _wait_live() -> None:
    from app.changes import FEED

    wait_for(lambda: FEED.live, timeout=10, interval=0.02, what="the change feed to listen")


def _queued_job(client, headers: dict[str, str]) -> str:
    from tests.support.models import digits_npz_bytes, digits_onnx_bytes

    m = client.post("/v1/models", headers=headers, files={"file": ("m.onnx", digits_onnx_bytes())}).json()
    d = client.post("/v1/datasets", headers=headers, files={"file": ("d.npz", digits_npz_bytes())}).json()
    return client.post("/v1/jobs", headers=headers, json={"model_id": m["id"], "dataset_id": d["id"]}).json()["id"]


def test_a_job_written_by_another_connection_is_read_fresh(client, alice, service_env) -> None:
    from app.jobs.views import JOB_VIEWS

    _wait_live()
    job_id = _queued_job(client, alice)
    first = client.get(f"/v1/jobs/{job_id}", headers=alice).json()
    assert first["status"] == "queued" and JOB_VIEWS.get(job_id) is not None  # the poll is now served from memory
    assert client.get(f"/v1/jobs/{job_id}", headers=alice).json() == first
    with psycopg.connect(_pg_url(service_env), autocommit=True) as conn:  # as a worker on another machine writes
        conn.execute(
            "UPDATE compression_jobs SET status = 'running', progress = 0.5, stage = 'quantize' WHERE id = %s",
            (job_id,),
        )
        written = time.monotonic()
        seen = wait_for(
            lambda: (j := client.get(f"/v1/jobs/{job_id}", headers=alice).json())["stage"] == "quantize" and j,
            timeout=5,
            interval=0.005,
            what="the worker's write to show",
        )
        lag = time.monotonic() - written
        assert seen["status"] == "running" and seen["progress"] == 0.5
        assert lag < 1.0, lag  # a notification's delay, not the entry's max age (30 s)
        # An artifact row is part of the job's view too.
        owner, sha, size = conn.execute(
            "SELECT owner_id, sha256, size_bytes FROM model_uploads WHERE id = %s", (first["spec"]["model_id"],)
        ).fetchone()
        client.get(f"/v1/jobs/{job_id}", headers=alice)  # cached again
        conn.execute(
            "INSERT INTO artifacts (id, job_id, owner_id, kind, format, filename, sha256, size_bytes, created_at)"
            " VALUES ('art_feedtest', %s, %s, 'model', 'onnx', 'm.onnx', %s, %s, now())",
            (job_id, owner, sha, size),
        )
        wait_for(
            lambda: client.get(f"/v1/jobs/{job_id}", headers=alice).json()["artifacts"],
            timeout=5,
            interval=0.005,
            what="the artifact to show",
        )


def test_this_process_drops_its_own_writes_at_commit(client, alice) -> None:
    from app.changes import FEED
    from app.db import session_scope
    from app.jobs.views import JOB_VIEWS
    from app.tables import CompressionJob

    _wait_live()
    job_id = _queued_job(client, alice)
    assert client.get(f"/v1/jobs/{job_id}", headers=alice).json()["status"] == "queued"
    assert JOB_VIEWS.get(job_id) is not None
    # Holding the feed's lock keeps the listener from dispatching the notification: only the commit hook can drop it.
    with FEED._lock:
        with session_scope() as s:
            job = s.get(CompressionJob, job_id)
            assert job is not None
            job.stage = "changed-here"
        assert JOB_VIEWS.get(job_id) is None
    assert client.get(f"/v1/jobs/{job_id}", headers=alice).json()["stage"] == "changed-here"
    # What a user sees: a cancel is read back at once.
    assert client.post(f"/v1/jobs/{job_id}/cancel", headers=alice).json()["status"] == "cancelled"
    assert client.get(f"/v1/jobs/{job_id}", headers=alice).json()["status"] == "cancelled"


def test_a_lost_listener_turns_the_cache_off_then_comes_back(client, alice, service_env) -> None:
    from app.changes import FEED
    from app.jobs.views import JOB_VIEWS

    _wait_live()
    job_id = _queued_job(client, alice)
    client.get(f"/v1/jobs/{job_id}", headers=alice)
    assert JOB_VIEWS.get(job_id) is not None
    with psycopg.connect(_pg_url(service_env), autocommit=True) as conn:
        killed = conn.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE datname = current_database() AND application_name = %s",
            (APPLICATION_NAME,),
        ).fetchone()
        assert killed is not None and killed[0] >= 1
        wait_for(lambda: JOB_VIEWS.get(job_id) is None, timeout=5, interval=0.01, what="the cache to empty")
        # Written while nobody listens: must not be lost on the API's answers.
        conn.execute("UPDATE compression_jobs SET stage = 'while-deaf' WHERE id = %s", (job_id,))
    assert client.get(f"/v1/jobs/{job_id}", headers=alice).json()["stage"] == "while-deaf"
    _wait_live()  # it reconnects by itself
    assert FEED.live
    client.get(f"/v1/jobs/{job_id}", headers=alice)
    assert JOB_VIEWS.get(job_id) is not None
