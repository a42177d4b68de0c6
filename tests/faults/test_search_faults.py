"""A search survives the death of a worker that was running one of its trials (real processes and signals)."""

from __future__ import annotations

import signal
import uuid
from pathlib import Path
from typing import Any

import httpx

from tests.support.models import digits_npz_bytes, digits_onnx_bytes
from tests.support.service import Processes, create_key, free_port, wait_for, wait_healthy

# Short leases and a fast reconciler, so a dead worker's trial is taken over within the test's patience.
FAST = {
    "SQUEEZE_JOB_LEASE_S": "3",
    "SQUEEZE_JOB_HEARTBEAT_S": "0.5",
    "SQUEEZE_RECONCILE_INTERVAL_S": "1",
    "SQUEEZE_WORKER_SOFT_SHUTDOWN_S": "1",
}


def test_search_keeps_going_when_a_worker_running_its_trial_is_killed(
    service_env: dict[str, str], tmp_path: Path
) -> None:
    procs = Processes(tmp_path, {**service_env, **FAST})
    port = free_port()
    procs.start("api", "serve", "--no-worker", "--port", str(port))
    try:
        base = f"http://127.0.0.1:{port}"
        wait_healthy(base)
        doomed = procs.start("doomed", "worker", "--queues", "cpu", "--concurrency", "1")
        procs.start("survivor", "worker", "--queues", "cpu", "--concurrency", "1")
        key = create_key(procs.env, f"search-faults-{uuid.uuid4().hex[:6]}")
        client = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=30)
        model = client.post("/v1/models", files={"file": ("m.onnx", digits_onnx_bytes())}).json()
        data = client.post("/v1/datasets", files={"file": ("d.npz", digits_npz_bytes())}).json()
        r = client.post(
            "/v1/searches",
            json={
                "model_id": model["id"],
                "dataset_id": data["id"],
                "constraint": {"max_accuracy_drop": 0.01},
                "space": {"quantize": ["int8_dynamic", "int8_static", "fp16"], "sparsity": [0.5, 0.7]},
                "max_trials": 10,
            },
        )
        assert r.status_code == 202, r.text
        search_id = r.json()["job"]["id"]

        def trial_on_doomed_worker() -> dict[str, Any] | None:
            for t in client.get(f"/v1/searches/{search_id}").json()["trials"]:
                if t["job_id"] and t["status"] == "running":
                    job = client.get(f"/v1/jobs/{t['job_id']}").json()
                    if f"-{doomed.pid}@" in (job.get("worker") or ""):
                        return job
            return None

        victim = wait_for(trial_on_doomed_worker, timeout=120, interval=0.1, what="a trial on the doomed worker")
        procs.stop("doomed", signal.SIGKILL)  # the whole worker, parent and pool, at once

        def finished() -> dict[str, Any] | None:
            body = client.get(f"/v1/searches/{search_id}").json()
            return body if body["job"]["status"] in ("succeeded", "failed", "cancelled") else None

        search = wait_for(finished, timeout=400, interval=0.5, what="the search to finish")
        assert search["job"]["status"] == "succeeded", (search["job"]["error"], procs.log("survivor")[-3000:])
        assert search["result"]["best"] is not None
        taken_over = client.get(f"/v1/jobs/{victim['id']}").json()
        assert taken_over["status"] == "succeeded" and taken_over["attempts"] >= 2
        assert all(t["status"] in ("succeeded", "failed", "skipped") for t in search["trials"])
    finally:
        procs.stop_all()
