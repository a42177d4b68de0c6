"""Workers die, get stopped and run out of time: jobs still end exactly once, with a clear outcome.

Real processes on PostgreSQL and Redis; the test kills them with real signals. Leases are shortened (3 s) so a
takeover happens within the test's patience; everything else is the production configuration.
"""

from __future__ import annotations

import os
import signal
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.models import digits_npz_bytes, digits_onnx_bytes
from tests.support.service import Processes, create_key, free_port, wait_for, wait_healthy, wait_job

FAST_LEASE = {
    "SQUEEZE_JOB_LEASE_S": "3",
    "SQUEEZE_JOB_HEARTBEAT_S": "0.5",
    "SQUEEZE_WORKER_SOFT_SHUTDOWN_S": "1",
}
# Long enough to be caught mid-way: 1000 timed runs per measured model.
SLOW_EVALUATION = {"batch_size": 397, "latency_runs": 1000, "warmup_runs": 50}


class Cluster:
    def __init__(self, procs: Processes, base_url: str) -> None:
        self.procs = procs
        self.base_url = base_url
        self.client = httpx.Client(
            base_url=base_url,
            headers={"Authorization": f"Bearer {create_key(procs.env, f'faults-{uuid.uuid4().hex[:6]}')}"},
            timeout=30,
        )

    def start_worker(self, name: str, **env: str) -> subprocess.Popen[bytes]:
        old = dict(self.procs.env)
        self.procs.env.update(env)
        try:
            return self.procs.start(name, "worker", "--queues", "cpu", "--concurrency", "1")
        finally:
            self.procs.env = old

    def submit_slow_job(self) -> str:
        m = self.client.post("/v1/models", files={"file": ("m.onnx", digits_onnx_bytes())}).json()
        d = self.client.post("/v1/datasets", files={"file": ("d.npz", digits_npz_bytes())}).json()
        r = self.client.post(
            "/v1/jobs",
            json={
                "model_id": m["id"],
                "dataset_id": d["id"],
                "steps": [{"op": "prune", "method": "magnitude", "sparsity": 0.5}],
                "evaluation": SLOW_EVALUATION,
                "cache": False,
            },
        )
        assert r.status_code == 202, r.text
        return r.json()["id"]

    def wait_running(self, job_id: str, attempt: int) -> dict:
        def running() -> dict | None:
            job = self.client.get(f"/v1/jobs/{job_id}").json()
            ok = (
                job["status"] == "running"
                and job["attempts"] == attempt
                and job["stage"] not in ("starting", "loading")
            )
            return job if ok else None

        return wait_for(running, timeout=90, interval=0.05, what=f"{job_id} running attempt {attempt}")


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


@pytest.fixture
def cluster(service_env: dict[str, str], tmp_path: Path) -> Iterator[Cluster]:
    port = free_port()
    procs = Processes(tmp_path, {**service_env, **FAST_LEASE})
    procs.start("api", "serve", "--no-worker", "--port", str(port))
    try:
        wait_healthy(f"http://127.0.0.1:{port}")
        yield Cluster(procs, f"http://127.0.0.1:{port}")
    finally:
        procs.stop_all()


def _kill_child(worker: subprocess.Popen[bytes]) -> None:
    kids = wait_for(lambda: children(worker.pid), timeout=30, what="the worker's pool process")
    for pid in kids:
        os.kill(pid, signal.SIGKILL)


def test_sigkill_mid_job_reruns_once_and_succeeds(cluster: Cluster) -> None:
    worker = cluster.start_worker("worker")
    job_id = cluster.submit_slow_job()
    cluster.wait_running(job_id, attempt=1)
    _kill_child(worker)
    job = wait_job(cluster.client, job_id, timeout=180)
    assert job["status"] == "succeeded", (job["error"], cluster.procs.log("worker")[-3000:])
    assert job["attempts"] == 2
    assert sorted(a["kind"] for a in job["artifacts"]) == ["model", "report", "report_markdown"]


def test_job_that_always_kills_its_worker_fails_after_max_attempts(cluster: Cluster) -> None:
    worker = cluster.start_worker("worker", SQUEEZE_JOB_MAX_ATTEMPTS="2")
    job_id = cluster.submit_slow_job()
    for attempt in (1, 2):
        cluster.wait_running(job_id, attempt=attempt)
        _kill_child(worker)
    job = wait_job(cluster.client, job_id, timeout=180)
    assert job["status"] == "failed"
    assert job["error"]["code"] == "worker_lost" and "will not be retried" in job["error"]["message"]
    assert job["artifacts"] == []


def test_sigterm_requeues_promptly_to_another_worker(cluster: Cluster) -> None:
    first = cluster.start_worker("first")
    job_id = cluster.submit_slow_job()
    cluster.wait_running(job_id, attempt=1)
    cluster.start_worker("second")
    first.send_signal(signal.SIGTERM)
    first.wait(timeout=60)
    # Taken over within seconds (soft shutdown + lease), far below the visibility timeout (over an hour).
    job = wait_job(cluster.client, job_id, timeout=90)
    assert job["status"] == "succeeded", (job["error"], cluster.procs.log("second")[-3000:])
    assert job["attempts"] == 2


def test_time_limit_fails_the_job_with_timeout_and_cleans_up(cluster: Cluster, service_env: dict[str, str]) -> None:
    cluster.start_worker("worker", SQUEEZE_JOB_SOFT_TIME_LIMIT_S="1", SQUEEZE_JOB_TIME_LIMIT_S="30")
    job_id = cluster.submit_slow_job()
    job = wait_job(cluster.client, job_id, timeout=120)
    assert job["status"] == "failed" and job["error"]["code"] == "timeout", job["error"]
    work = Path(service_env["SQUEEZE_DATA_DIR"]) / "work"
    assert not [p for p in work.iterdir() if p.name.startswith(job_id)]
    # The confined pipeline process of that job is gone too (it ran with its cwd in the job's scratch folder).
    wait_for(lambda: not _pipelines_in(work / job_id), timeout=15, what="the job's pipeline process to exit")


def _pipelines_in(prefix: Path) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if os.readlink(proc / "cwd").startswith(str(prefix)):
                    found.append(int(proc.name))
            except OSError:
                continue
    return found


def test_out_of_memory_fails_once_with_a_clear_error(cluster: Cluster) -> None:
    cluster.start_worker("worker", SQUEEZE_SANDBOX_MEMORY_MB="300")
    job_id = cluster.submit_slow_job()
    job = wait_job(cluster.client, job_id, timeout=120)
    assert job["status"] == "failed" and job["attempts"] == 1
    assert job["error"]["code"] == "out_of_memory", job["error"]
    assert "SQUEEZE_SANDBOX_MEMORY_MB" in job["error"]["message"]
