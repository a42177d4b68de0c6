"""Live progress as Server-Sent Events over a real HTTP connection, resumable with Last-Event-ID."""

from __future__ import annotations

import json
import tempfile
import uuid
from pathlib import Path

import httpx

from tests.e2e.conftest import Deployment
from tests.support.models import digits_npz_bytes, digits_onnx_bytes


def _read_events(client: httpx.Client, job_id: str, last_event_id: str | None = None) -> list[dict]:
    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
    events, current = [], {}
    with client.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers, timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith(("id:", "event:", "data:")):
                field, _, value = line.partition(": ")
                current[field] = value
            elif line == "" and "data" in current:
                events.append({"id": current["id"], "event": current["event"], "data": json.loads(current["data"])})
                current = {}
    return events


def test_events_follow_a_job_to_the_end_and_resume(deployment: Deployment) -> None:
    client = deployment.client(deployment.new_key(f"sse-{uuid.uuid4().hex[:6]}"))
    m = client.post("/v1/models", files={"file": ("m.onnx", digits_onnx_bytes())}).json()
    d = client.post("/v1/datasets", files={"file": ("d.npz", digits_npz_bytes())}).json()
    job = client.post(
        "/v1/jobs",
        json={
            "model_id": m["id"],
            "dataset_id": d["id"],
            "steps": [
                {"op": "prune", "method": "magnitude", "sparsity": 0.5},
                {"op": "quantize", "method": "int8_dynamic"},
            ],
            "cache": False,
        },
    ).json()
    events = _read_events(client, job["id"])  # connected right away: it ends by itself with the final state
    states = [e["data"]["status"] for e in events if e["event"] == "state"]
    assert states == ["queued", "running", "succeeded"]
    progress = [e["data"] for e in events if e["event"] == "progress"]
    stages = [p["stage"] for p in progress]
    assert {"baseline", "prune:magnitude", "quantize:int8_dynamic", "evaluate"} <= set(stages)
    assert [p["progress"] for p in progress] == sorted(p["progress"] for p in progress)
    assert any(e["event"] == "log" and "int8_static" in e["data"]["message"] for e in events)  # the Conv note
    ids = [int(e["id"]) for e in events]
    assert ids == sorted(ids)

    # Resume after the "running" event: exactly the rest arrives.
    running = next(e for e in events if e["event"] == "state" and e["data"]["status"] == "running")
    rest = _read_events(client, job["id"], last_event_id=running["id"])
    assert [e["id"] for e in rest] == [e["id"] for e in events if int(e["id"]) > int(running["id"])]
    # After the end, a reconnect gets nothing and closes at once.
    assert _read_events(client, job["id"], last_event_id=events[-1]["id"]) == []

    other = deployment.client(deployment.new_key(f"sse-other-{uuid.uuid4().hex[:6]}"))
    assert other.get(f"/v1/jobs/{job['id']}/events").status_code == 404


def test_python_client_wait_follows_events(deployment: Deployment) -> None:
    from squeeze.client import Squeeze

    key = deployment.new_key(f"sse-client-{uuid.uuid4().hex[:6]}")
    with tempfile.TemporaryDirectory() as tmp, Squeeze(deployment.base_url, key) as sq:
        (Path(tmp) / "m.onnx").write_bytes(digits_onnx_bytes())
        (Path(tmp) / "d.npz").write_bytes(digits_npz_bytes())
        m = sq.upload_model(Path(tmp) / "m.onnx")
        d = sq.upload_dataset(Path(tmp) / "d.npz")
        spec = {"model_id": m.id, "dataset_id": d.id, "steps": [{"op": "quantize", "method": "int8_static"}]}
        seen: list[str] = []
        job = sq.submit_job({**spec, "cache": False}).wait(120, poll=30, on_update=lambda j: seen.append(j.stage))
        # poll=30 would see at most the first and last state within this job's few seconds: the stages in
        # between can only have come from the event stream.
        assert job.status == "succeeded" and job.metrics is not None
        assert {"baseline", "quantize:int8_static", "evaluate"} <= set(seen)
        polled = sq.submit_job({**spec, "cache": False}).wait(120, poll=0.2, events=False)
        assert polled.status == "succeeded"
