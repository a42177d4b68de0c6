"""The worker registry: real worker processes register, heartbeat and sign off; jobs asking for a device no
live worker offers are refused at the door."""

from __future__ import annotations

import os
import signal
import socket
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from sqlalchemy import delete

from tests.conftest import make_user
from tests.support.models import digits_onnx_bytes
from tests.support.service import Processes, create_key, free_port, wait_for, wait_healthy

PRUNE = [{"op": "prune", "method": "magnitude", "sparsity": 0.5}]  # runs on cpu and cuda


@pytest.fixture
def registry(clean_db: None) -> Iterator[None]:
    """Worker rows are not tables the other tests empty: each test here leaves none behind."""
    from app.db import session_scope
    from app.tables import WorkerNode

    yield
    with session_scope() as s:
        s.execute(delete(WorkerNode))


def _workers(client: Any, headers: dict[str, str], *, all_: bool = False) -> list[dict[str, Any]]:
    r = client.get("/v1/workers", headers=headers, params={"all": "true"} if all_ else {})
    assert r.status_code == 200, r.text
    return r.json()["items"]


def _find(items: list[dict[str, Any]], pid: int) -> dict[str, Any] | None:
    return next((w for w in items if w["pid"] == pid), None)


def test_workers_register_heartbeat_and_stop_or_go_stale(client, alice, registry, tmp_path) -> None:
    procs = Processes(tmp_path, {"SQUEEZE_WORKER_HEARTBEAT_S": "0.5", "SQUEEZE_WORKER_TTL_S": "3"})
    one = procs.start("one", "worker", "--queues", "cpu", "--concurrency", "1")
    two = procs.start("two", "worker", "--queues", "cpu", "--concurrency", "2")
    try:
        first = wait_for(lambda: _find(_workers(client, alice), one.pid), timeout=60, what="worker one live")
        second = wait_for(lambda: _find(_workers(client, alice), two.pid), timeout=60, what="worker two live")
        assert first["status"] == "live" and first["stopped_at"] is None
        assert first["queues"] == ["cpu"] and first["devices"] == ["cpu"] and first["concurrency"] == 1
        assert first["name"].startswith(f"squeeze-cpu-{one.pid}@") and first["hostname"] == socket.gethostname()
        assert first["version"] and second["concurrency"] == 2
        # Heartbeats keep coming from the worker's parent process.
        wait_for(
            lambda: (w := _find(_workers(client, alice), one.pid)) and w["last_seen_at"] > first["last_seen_at"],
            timeout=15,
            what="a heartbeat",
        )
        assert client.get("/v1/capabilities", headers=alice).json()["live_devices"] == {"cpu": 2}

        procs.stop("one")  # SIGTERM: a clean shutdown signs off at once
        assert _find(_workers(client, alice), one.pid) is None
        gone = _find(_workers(client, alice, all_=True), one.pid)
        assert gone is not None and gone["status"] == "stopped" and gone["stopped_at"] is not None

        procs.stop("two", signal.SIGKILL)  # no goodbye: live until its TTL passes, then stale
        wait_for(
            lambda: (w := _find(_workers(client, alice, all_=True), two.pid)) and w["status"] == "stale",
            timeout=20,
            what="worker two stale",
        )
        assert _workers(client, alice) == []
        assert client.get("/v1/capabilities", headers=alice).json()["live_devices"] == {}
    finally:
        procs.stop_all()


def test_cuda_jobs_need_a_live_worker_offering_cuda(client, alice, registry) -> None:
    from app.db import session_scope
    from app.workers.service import mark_stopped, register_worker

    model = client.post("/v1/models", headers=alice, files={"file": ("m.onnx", digits_onnx_bytes())}).json()
    spec = {"model_id": model["id"], "steps": PRUNE, "device": "cuda"}
    r = client.post("/v1/jobs", headers=alice, json=spec)
    assert r.status_code == 409 and r.json()["error"]["code"] == "device_unavailable", r.text
    assert r.json()["error"]["details"] == {"device": "cuda", "live_devices": []}
    # cpu and auto jobs wait for a worker: none is needed at submission.
    for device in ("cpu", "auto"):
        assert client.post("/v1/jobs", headers=alice, json={**spec, "device": device}).status_code == 202

    with session_scope() as s:  # a GPU worker, registered as `squeeze worker --queues gpu` does on a GPU machine
        gpu = register_worker(
            s,
            name="squeeze-gpu-1@gpu-box",
            hostname="gpu-box",
            pid=1,
            queues=["gpu"],
            devices=["cuda"],
            gpus=[{"name": "NVIDIA H100 80GB HBM3", "memory_mb": 81559}],
            concurrency=1,
            version="test",
            ttl_s=60,
        )
    r = client.post("/v1/jobs", headers=alice, json=spec)
    assert r.status_code == 202, r.text
    assert r.json()["queue"] == "gpu"
    listed = _workers(client, alice)
    assert [(w["name"], w["status"], w["devices"]) for w in listed] == [("squeeze-gpu-1@gpu-box", "live", ["cuda"])]
    assert listed[0]["gpus"] == [{"name": "NVIDIA H100 80GB HBM3", "memory_mb": 81559}]
    assert client.get("/v1/capabilities", headers=alice).json()["live_devices"] == {"cuda": 1}
    admin = {"Authorization": f"Bearer {make_user('workers-admin-' + uuid.uuid4().hex[:6], admin=True)}"}
    metrics = client.get("/metrics", headers=admin).text
    assert 'squeeze_workers_live{device="cuda"} 1.0' in metrics
    assert 'squeeze_workers_live{device="cpu"} 0.0' in metrics

    with session_scope() as s:
        mark_stopped(s, worker_id=gpu.id)
    r = client.post("/v1/jobs", headers=alice, json=spec)
    assert r.status_code == 409 and r.json()["error"]["code"] == "device_unavailable"


def test_a_gpu_worker_registers_its_gpus_from_nvidia_smi(client, alice, registry, tmp_path) -> None:
    """This machine has no GPU: a stand-in nvidia-smi prints what the real one prints on an H100 machine."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'NVIDIA H100 80GB HBM3, 81559'\necho 'NVIDIA H100 80GB HBM3, 81559'\n")
    smi.chmod(0o755)
    procs = Processes(tmp_path, {"PATH": f"{bin_dir}:{os.environ['PATH']}"})
    gpu = procs.start("gpu", "worker", "--queues", "cpu,gpu")
    try:
        node = wait_for(lambda: _find(_workers(client, alice), gpu.pid), timeout=60, what="the GPU worker")
        assert node["queues"] == ["cpu", "gpu"] and node["devices"] == ["cpu", "cuda"]
        assert node["gpus"] == [{"name": "NVIDIA H100 80GB HBM3", "memory_mb": 81559}] * 2
        # What makes device=cuda jobs accepted (submitting one would have this GPU-less worker take it).
        assert client.get("/v1/capabilities", headers=alice).json()["live_devices"] == {"cpu": 1, "cuda": 1}
    finally:
        procs.stop_all()


def test_workers_need_a_key(client) -> None:
    assert client.get("/v1/workers").status_code == 401


def test_embedded_serve_registers_its_own_worker(tmp_path) -> None:
    env = {"SQUEEZE_DATA_DIR": str(tmp_path / "var"), "SQUEEZE_DATABASE_URL": "", "SQUEEZE_BROKER_URL": ""}
    port = free_port()
    procs = Processes(tmp_path, env)
    procs.start("serve", "serve", "--port", str(port))
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base)
        c = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {create_key(procs.env, 'emb')}"})
        items = wait_for(lambda: c.get("/v1/workers").json()["items"], timeout=60, what="the embedded worker")
        assert [(w["status"], w["queues"], w["devices"]) for w in items] == [("live", ["cpu"], ["cpu"])]
    finally:
        procs.stop_all()
