"""The spine, as a user drives it: upload → job → real Celery worker (Redis) → metrics → download → verify.

The downloaded artifact is checked with the ordinary runtimes (onnxruntime, torch.export.load), independently
of the service's own code, and must reproduce the accuracy and sparsity the report claims.
"""

from __future__ import annotations

import hashlib
import io
import os
import uuid

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from tests.e2e.conftest import Deployment
from tests.support.models import digits_arrays, digits_npz_bytes, digits_onnx_bytes, digits_pt2_bytes
from tests.support.service import wait_job


def _upload(client, path: str, data: bytes, filename: str) -> dict:
    r = client.post(path, files={"file": (filename, data)})
    assert r.status_code == 201, r.text
    return r.json()


def _download(client, artifact: dict) -> bytes:
    r = client.get(f"/v1/artifacts/{artifact['id']}/download")
    assert r.status_code == 200
    body = r.content
    assert hashlib.sha256(body).hexdigest() == artifact["sha256"] == r.headers["etag"].strip('"')
    return body


def test_onnx_prune_quantize_roundtrip(deployment: Deployment) -> None:
    client = deployment.client(deployment.new_key(f"e2e-{uuid.uuid4().hex[:6]}"))
    model = _upload(client, "/v1/models", digits_onnx_bytes(), "digits.onnx")
    assert model["format"] == "onnx" and model["inputs"][0]["name"] == "input"
    dataset = _upload(client, "/v1/datasets", digits_npz_bytes(), "digits.npz")
    assert dataset["has_labels"] and dataset["num_samples"] == 397

    spec = {
        "model_id": model["id"],
        "dataset_id": dataset["id"],
        "steps": [
            {"op": "prune", "method": "magnitude", "sparsity": 0.5, "scope": "global"},
            {"op": "quantize", "method": "int8_dynamic"},
        ],
    }
    r = client.post("/v1/jobs", json=spec)
    assert r.status_code == 202, r.text
    assert r.json()["status"] == "queued"
    job = wait_job(client, r.json()["id"])
    assert job["status"] == "succeeded", job["error"]
    assert job["progress"] == 1.0 and job["attempts"] == 1 and not job["cache_hit"]
    base, res = job["metrics"]["baseline"], job["metrics"]["result"]
    assert base["accuracy"] > 0.95
    assert res["accuracy"] >= base["accuracy"] - 0.02
    assert res["size_bytes"] < base["size_bytes"] / 2.5
    assert res["parameters"] == base["parameters"] and res["sparsity"] > 0.4
    for key in ("agreement", "cosine", "max_abs_error", "latency_ms"):
        assert res[key] is not None
    assert res["latency_ms"]["p95"] >= res["latency_ms"]["p50"] > 0
    # A worker with one job slot computes with every core it may use, and says how many.
    assert res["latency_ms"]["threads"] == base["latency_ms"]["threads"] == len(os.sched_getaffinity(0))

    art = next(a for a in job["artifacts"] if a["kind"] == "model")
    body = _download(client, art)
    assert len(body) == res["size_bytes"]
    # Independent check with plain onnxruntime and onnx: accuracy and sparsity as claimed.
    _, _, x_test, y_test = digits_arrays()
    sess = ort.InferenceSession(body, providers=["CPUExecutionProvider"])
    # Dynamic quantization scales activations per batch, so reproduce the job's batch size (32 by default).
    logits = np.concatenate([sess.run(None, {"input": x_test[i : i + 32]})[0] for i in range(0, len(x_test), 32)])
    assert float((logits.argmax(1) == y_test).mean()) == pytest.approx(res["accuracy"], abs=1e-9)
    proto = onnx.load_from_string(body)
    weights = [numpy_helper.to_array(t) for t in proto.graph.initializer]
    big = [w for w in weights if w.ndim >= 2]
    zeros = sum(int((w == 0).sum()) for w in big) / sum(w.size for w in big)
    assert zeros >= 0.49  # pruned weights are still zero after int8 quantization

    # Range resumes a download.
    r = client.get(art["download_url"], headers={"Range": "bytes=10-19"})
    assert r.status_code == 206 and r.content == body[10:20]

    # The same bytes and spec again: served from the cache, same artifact bytes.
    again = client.post("/v1/jobs", json=spec).json()
    assert again["status"] == "succeeded" and again["cache_hit"] is True
    assert {a["sha256"] for a in again["artifacts"]} == {a["sha256"] for a in job["artifacts"]}
    nocache = client.post("/v1/jobs", json={**spec, "cache": False}).json()
    assert nocache["status"] == "queued" and nocache["cache_hit"] is False
    assert wait_job(client, nocache["id"])["status"] == "succeeded"


def test_pt2_static_int8_roundtrip(deployment: Deployment) -> None:
    import torch
    import torchao  # noqa: F401  (quantized programs resolve their ops through torchao)

    client = deployment.client(deployment.new_key(f"e2e-{uuid.uuid4().hex[:6]}"))
    model = _upload(client, "/v1/models", digits_pt2_bytes(), "digits.pt2")
    assert model["format"] == "pt2"
    dataset = _upload(client, "/v1/datasets", digits_npz_bytes(), "digits.npz")
    r = client.post(
        "/v1/jobs",
        json={
            "model_id": model["id"],
            "dataset_id": dataset["id"],
            "steps": [
                {"op": "prune", "method": "magnitude", "sparsity": 0.5, "scope": "global"},
                {"op": "quantize", "method": "int8_static"},
            ],
        },
    )
    assert r.status_code == 202, r.text
    job = wait_job(client, r.json()["id"])
    assert job["status"] == "succeeded", job["error"]
    base, res = job["metrics"]["baseline"], job["metrics"]["result"]
    assert res["accuracy"] >= base["accuracy"] - 0.02
    art = next(a for a in job["artifacts"] if a["kind"] == "model")
    body = _download(client, art)
    program = torch.export.load(io.BytesIO(body)).module()
    _, _, x_test, y_test = digits_arrays()
    with torch.inference_mode():
        logits = program(torch.from_numpy(x_test)).numpy()
    assert float((logits.argmax(1) == y_test).mean()) == pytest.approx(res["accuracy"], abs=1e-9)

    report = next(a for a in job["artifacts"] if a["kind"] == "report")
    assert b'"environment"' in _download(client, report)
    # The readable report: the before/after table with the numbers of the job's metrics, and the layer table.
    markdown = _download(client, next(a for a in job["artifacts"] if a["kind"] == "report_markdown")).decode()
    assert "## Before and after" in markdown and "## Per layer" in markdown
    assert f"| Accuracy (top-1) | {job['metrics']['baseline']['accuracy']:.4f} | {res['accuracy']:.4f} |" in markdown
    assert model["sha256"] in markdown


def test_evaluation_only_job_and_failure_is_reported(deployment: Deployment) -> None:
    client = deployment.client(deployment.new_key(f"e2e-{uuid.uuid4().hex[:6]}"))
    model = _upload(client, "/v1/models", digits_onnx_bytes(), "digits.onnx")
    dataset = _upload(client, "/v1/datasets", digits_npz_bytes(n=64), "d.npz")
    job = wait_job(
        client,
        client.post("/v1/jobs", json={"model_id": model["id"], "dataset_id": dataset["id"]}).json()["id"],
    )
    assert job["status"] == "succeeded"
    assert job["metrics"]["result"] is None and job["metrics"]["baseline"]["samples"] == 64
    assert sorted(a["kind"] for a in job["artifacts"]) == ["report", "report_markdown"]
    # Labels out of range do not break the worker: accuracy is simply measured (and low).
    x = np.load(io.BytesIO(digits_npz_bytes(n=8)))["input"]
    buf = io.BytesIO()
    np.savez(buf, input=x, labels=np.full(8, 99, dtype=np.int64))
    ds2 = _upload(client, "/v1/datasets", buf.getvalue(), "bad-labels.npz")
    job2 = wait_job(
        client, client.post("/v1/jobs", json={"model_id": model["id"], "dataset_id": ds2["id"]}).json()["id"]
    )
    assert job2["status"] == "succeeded" and job2["metrics"]["baseline"]["accuracy"] == 0.0
