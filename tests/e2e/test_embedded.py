"""The embedded default, as the README starts it: ``squeeze serve`` alone, SQLite, local disk, the filesystem
broker and a worker process it starts itself. No server of any kind is involved."""

from __future__ import annotations

import hashlib

import httpx
import onnxruntime as ort
import pytest

from tests.support.models import digits_arrays, digits_npz_bytes, digits_onnx_bytes
from tests.support.service import Processes, create_key, free_port, wait_healthy, wait_job


def test_embedded_default_runs_a_job_end_to_end(tmp_path) -> None:
    env = {
        "SQUEEZE_DATA_DIR": str(tmp_path / "var"),
        "SQUEEZE_DATABASE_URL": "",
        "SQUEEZE_BROKER_URL": "",
    }
    port = free_port()
    procs = Processes(tmp_path, env)
    procs.start("serve", "serve", "--port", str(port))
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base)
        assert httpx.get(f"{base}/readyz").json()["checks"] == {
            "database": "ok",
            "broker": "ok",
            "storage": "ok",
        }
        key = create_key(procs.env, "embedded-user")
        c = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=60)
        model = c.post("/v1/models", files={"file": ("m.onnx", digits_onnx_bytes())}).json()
        data = c.post("/v1/datasets", files={"file": ("d.npz", digits_npz_bytes())}).json()
        r = c.post(
            "/v1/jobs",
            json={
                "model_id": model["id"],
                "dataset_id": data["id"],
                "steps": [{"op": "quantize", "method": "int8_static"}],
            },
        )
        assert r.status_code == 202, r.text
        job = wait_job(c, r.json()["id"], timeout=240)
        assert job["status"] == "succeeded", (job["error"], procs.log("serve")[-3000:])
        art = next(a for a in job["artifacts"] if a["kind"] == "model")
        body = c.get(art["download_url"]).content
        assert hashlib.sha256(body).hexdigest() == art["sha256"]
        _, _, x, y = digits_arrays()
        logits = ort.InferenceSession(body, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
        assert float((logits.argmax(1) == y).mean()) == pytest.approx(job["metrics"]["result"]["accuracy"])
        assert (tmp_path / "var" / "squeeze.db").exists()
    finally:
        procs.stop_all()


def test_embedded_sqlite_with_two_workers_has_no_lock_errors(tmp_path) -> None:
    env = {"SQUEEZE_DATA_DIR": str(tmp_path / "var"), "SQUEEZE_DATABASE_URL": "", "SQUEEZE_BROKER_URL": ""}
    port = free_port()
    procs = Processes(tmp_path, env)
    procs.start("serve", "serve", "--port", str(port))
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base)
        procs.start("worker2", "worker")
        key = create_key(procs.env, "embedded-two")
        c = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=60)
        model = c.post("/v1/models", files={"file": ("m.onnx", digits_onnx_bytes())}).json()
        data = c.post("/v1/datasets", files={"file": ("d.npz", digits_npz_bytes(n=64))}).json()
        ids = [
            c.post(
                "/v1/jobs",
                json={
                    "model_id": model["id"],
                    "dataset_id": data["id"],
                    "steps": [{"op": "prune", "method": "magnitude", "sparsity": 0.1 * (i + 1)}],
                },
            ).json()["id"]
            for i in range(6)
        ]
        jobs = [wait_job(c, i, timeout=240) for i in ids]
        assert [j["status"] for j in jobs] == ["succeeded"] * 6, [j["error"] for j in jobs]
        assert all(j["attempts"] == 1 for j in jobs)
        logs = procs.log("serve") + procs.log("worker2")
        assert "database is locked" not in logs
        assert "Task squeeze.run_job" in procs.log("worker2")  # the second worker took part
    finally:
        procs.stop_all()
