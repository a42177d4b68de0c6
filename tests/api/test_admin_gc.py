"""`squeeze admin gc` and `squeeze admin retention`, run as an admin would, on the real database and blob store."""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
from datetime import timedelta
from pathlib import Path

from sqlalchemy import select, update

from tests.support.models import digits_onnx_bytes
from tests.support.service import ROOT, SQUEEZE, Processes, wait_job

PRUNE = [{"op": "prune", "method": "magnitude", "sparsity": 0.5}]


def _squeeze(*args: str) -> str:
    out = subprocess.run(
        [*SQUEEZE, *args], cwd=ROOT, env=os.environ.copy(), capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def _age(path: Path, seconds_ago: float) -> None:
    then = time.time() - seconds_ago
    os.utime(path, (then, then))


def _store_bytes(tmp_path: Path, data: bytes) -> str:
    from app.storage import get_store

    src = tmp_path / hashlib.sha256(data).hexdigest()
    src.write_bytes(data)
    return get_store().put_file(src)[0]


def _blob_row(sha: str) -> bool:
    from app.db import session_scope
    from app.tables import Blob

    with session_scope() as s:
        return s.scalar(select(Blob.sha256).where(Blob.sha256 == sha)) is not None


def test_gc_deletes_unreferenced_blobs_only(client, alice, tmp_path) -> None:
    from app.blobs import register_blob
    from app.db import session_scope
    from app.storage import get_store
    from app.tables import Blob, utcnow

    store = get_store()
    model = client.post("/v1/models", headers=alice, files={"file": ("m.onnx", digits_onnx_bytes())}).json()
    _age(store.local_path(model["sha256"]), 7200)  # old, but referenced
    # Bytes stored by a process that died before committing their row.
    crashed_bytes, unreleased_bytes = b"left behind by a crash" * 100, b"row without references" * 300
    crashed = _store_bytes(tmp_path, crashed_bytes)
    _age(store.local_path(crashed), 7200)
    # A row whose last reference went but which was never released.
    unreleased = _store_bytes(tmp_path, unreleased_bytes)
    _age(store.local_path(unreleased), 7200)
    with session_scope() as s:
        register_blob(s, sha256=unreleased, size_bytes=len(unreleased_bytes))
        s.execute(update(Blob).where(Blob.sha256 == unreleased).values(created_at=utcnow() - timedelta(hours=2)))
    # Bytes just stored: their row may be committed any moment now.
    fresh = _store_bytes(tmp_path, b"row on its way" * 100)
    # An upload still being received (and one stalled for hours) lives in tmp: never a blob to collect.
    receiving = store.writer()
    receiving.write(b"half an upload")
    receiving.flush()
    _age(receiving.temp_path, 7200)
    freed = len(crashed_bytes) + len(unreleased_bytes)
    try:
        assert _squeeze("admin", "gc", "--dry-run") == (
            f"gc: would delete 2 unreferenced blobs ({freed} bytes); kept 1 younger than 60 minutes"
        )
        assert all(store.exists(s) for s in (crashed, unreleased, fresh, model["sha256"]))

        assert (
            _squeeze("admin", "gc")
            == f"gc: deleted 2 unreferenced blobs ({freed} bytes); kept 1 younger than 60 minutes"
        )
        assert not store.exists(crashed) and not store.exists(unreleased) and not _blob_row(unreleased)
        assert store.exists(fresh) and receiving.temp_path.exists()
        body = client.get(f"/v1/models/{model['id']}/download", headers=alice).content
        assert hashlib.sha256(body).hexdigest() == model["sha256"]
        assert [p.name for p in store.tmp_dir.iterdir()] == [receiving.temp_path.name]  # nothing parked aside
    finally:
        receiving.abort()


def test_storing_bytes_already_there_protects_them_from_gc(client, alice, tmp_path) -> None:
    """An upload of bytes an orphan already holds refreshes them, so gc leaves them to the row on its way."""
    from app.storage import get_store

    store = get_store()
    data = digits_onnx_bytes()
    sha = _store_bytes(tmp_path, data)
    _age(store.local_path(sha), 7200)
    model = client.post("/v1/models", headers=alice, files={"file": ("m.onnx", data)}).json()
    assert model["sha256"] == sha
    assert _squeeze("admin", "gc", "--grace-minutes", "30").startswith("gc: deleted 0 unreferenced blobs")
    assert store.exists(sha)


def _set_finished(job_id: str, days_ago: int) -> None:
    from app.db import session_scope
    from app.tables import CompressionJob, utcnow

    with session_scope() as s:
        s.execute(
            update(CompressionJob)
            .where(CompressionJob.id == job_id)
            .values(finished_at=utcnow() - timedelta(days=days_ago))
        )


def test_retention_expires_old_artifacts_and_frees_their_blobs(client, alice, tmp_path) -> None:
    from app.storage import get_store

    store = get_store()
    client.headers.update(alice)
    model = client.post("/v1/models", files={"file": ("m.onnx", digits_onnx_bytes())}).json()
    spec = {"model_id": model["id"], "steps": PRUNE}
    procs = Processes(tmp_path, {})
    procs.start("worker", "worker", "--queues", "cpu")
    try:
        old = wait_job(client, client.post("/v1/jobs", json=spec).json()["id"], timeout=240)
    finally:
        procs.stop_all()
    assert old["status"] == "succeeded", old["error"]
    shared = client.post("/v1/jobs", json=spec).json()  # identical: the cached result, sharing the same blobs
    assert shared["cache_hit"] and {a["sha256"] for a in shared["artifacts"]} == {a["sha256"] for a in old["artifacts"]}
    shas = [a["sha256"] for a in old["artifacts"]]
    for sha in shas:
        _age(store.local_path(sha), 40 * 86400)
    _set_finished(old["id"], 40)

    assert _squeeze("admin", "retention", "--older-than-days", "30", "--dry-run").startswith(
        "retention: would delete 3 artifacts"  # the model, the JSON report and the Markdown report
    )
    assert len(client.get(f"/v1/jobs/{old['id']}").json()["artifacts"]) == 3
    out = _squeeze("admin", "retention", "--older-than-days", "30")
    assert out.startswith("retention: deleted 3 artifacts") and " of 1 jobs " in out
    assert out.endswith("; 0 blobs (0 bytes) freed")  # the cached job still uses them
    expired = client.get(f"/v1/jobs/{old['id']}").json()
    assert expired["artifacts"] == [] and expired["artifacts_expired_at"] is not None
    assert expired["metrics"] == old["metrics"]  # the record stays
    assert client.get(old["artifacts"][0]["download_url"]).status_code == 404
    for art in shared["artifacts"]:
        assert hashlib.sha256(client.get(art["download_url"]).content).hexdigest() == art["sha256"]

    _set_finished(shared["id"], 31)
    out = _squeeze("admin", "retention", "--older-than-days", "30")
    assert out.startswith("retention: deleted 3 artifacts") and "; 3 blobs" in out
    assert not any(store.exists(sha) or _blob_row(sha) for sha in shas)
    assert _squeeze("admin", "retention", "--older-than-days", "30").startswith("retention: deleted 0 artifacts")
    # Models (and datasets) are never touched; an identical job now runs again instead of reusing deleted files.
    body = client.get(f"/v1/models/{model['id']}/download").content
    assert hashlib.sha256(body).hexdigest() == model["sha256"]
    again = client.post("/v1/jobs", json=spec).json()
    assert again["cache_hit"] is False and again["status"] == "queued"


def test_retention_needs_a_period(service_env) -> None:
    out = subprocess.run(
        [*SQUEEZE, "admin", "retention"], cwd=ROOT, env=os.environ.copy(), capture_output=True, text=True
    )
    assert out.returncode == 2 and "--older-than-days" in out.stderr
