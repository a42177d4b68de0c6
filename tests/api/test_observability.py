"""Request ids on responses and log lines, Prometheus metrics for admins."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import make_user
from tests.support.models import digits_npz_bytes, digits_onnx_bytes
from tests.support.service import ROOT


def test_request_id_is_echoed_or_made_up(client, alice) -> None:
    r = client.get("/v1/models", headers={**alice, "X-Request-ID": "pipeline-42.run_7"})
    assert r.headers["x-request-id"] == "pipeline-42.run_7"
    made_up = client.get("/v1/models", headers={**alice, "X-Request-ID": "bad id\nwith newline"})
    assert made_up.headers["x-request-id"] != "bad id\nwith newline" and len(made_up.headers["x-request-id"]) == 32


def _gauge(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def test_metrics_for_admins_only(client, alice, clean_db) -> None:
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers=alice).status_code == 403
    admin = {"Authorization": f"Bearer {make_user('metrics-admin', admin=True)}"}
    before = client.get("/metrics", headers=admin).text
    m = client.post("/v1/models", headers=alice, files={"file": ("m.onnx", digits_onnx_bytes())}).json()
    d = client.post("/v1/datasets", headers=alice, files={"file": ("d.npz", digits_npz_bytes())}).json()
    client.post("/v1/jobs", headers=alice, json={"model_id": m["id"], "dataset_id": d["id"]})
    text = client.get("/metrics", headers=admin).text
    for name in ('squeeze_jobs{status="queued"}', 'squeeze_queue_depth{queue="cpu"}'):
        assert _gauge(text, name) == _gauge(before, name) + 1, name
    assert _gauge(text, "squeeze_storage_bytes") > _gauge(before, "squeeze_storage_bytes")
    assert 'squeeze_http_requests_total{method="POST",route="/v1/models",status="201"}' in text
    assert "squeeze_http_request_duration_seconds_bucket" in text


def test_log_lines_are_json_with_request_id(tmp_path) -> None:
    code = (
        "import logging; from app.observability import configure_logging, request_id_var, job_id_var;"
        "configure_logging('json'); request_id_var.set('r-1'); job_id_var.set('job_9');"
        "logging.getLogger('squeeze.test').info('hello')"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=os.environ.copy())
    line = json.loads(out.stderr.strip().splitlines()[-1])
    assert line["message"] == "hello" and line["request_id"] == "r-1" and line["job_id"] == "job_9"
    assert line["level"] == "INFO" and line["logger"] == "squeeze.test"
