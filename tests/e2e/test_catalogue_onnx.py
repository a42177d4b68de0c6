"""The ONNX catalogue through the service: structured pruning and int4 weight-only, submitted over HTTP, run by a
real Celery worker, and the downloaded artifacts checked with plain onnxruntime against the report's figures."""

from __future__ import annotations

import io
import uuid
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from tests.e2e.conftest import Deployment
from tests.support.models import digits_arrays, digits_npz_bytes, digits_onnx_bytes
from tests.support.onnx_graphs import mlp_model
from tests.support.service import wait_job


def _run_job(deployment: Deployment, model: bytes, data: bytes, steps: list[dict]) -> tuple[dict, bytes]:
    client = deployment.client(deployment.new_key(f"catalogue-{uuid.uuid4().hex[:6]}"))
    model_id = client.post("/v1/models", files={"file": ("model.onnx", model)}).json()["id"]
    dataset_id = client.post("/v1/datasets", files={"file": ("data.npz", data)}).json()["id"]
    r = client.post(
        "/v1/jobs",
        json={"model_id": model_id, "dataset_id": dataset_id, "steps": steps, "evaluation": {"latency_runs": 10}},
    )
    assert r.status_code == 202, r.text
    job = wait_job(client, r.json()["id"])
    assert job["status"] == "succeeded", job["error"]
    artifact = next(a for a in job["artifacts"] if a["kind"] == "model")
    return job, client.get(artifact["download_url"]).content


def test_structured_half_of_the_digits_channels(deployment: Deployment) -> None:
    job, body = _run_job(
        deployment,
        digits_onnx_bytes(),
        digits_npz_bytes(),
        [{"op": "prune", "method": "structured", "sparsity": 0.5}],
    )
    base, res = job["metrics"]["baseline"], job["metrics"]["result"]
    assert len(body) == res["size_bytes"] < base["size_bytes"] / 3.5
    assert res["parameters"] < base["parameters"] / 3.5
    details = job["report"]["steps"][0]["details"]
    assert [(r["channels_before"], r["channels_after"]) for r in details["layers"]] == [(16, 8), (32, 16), (64, 32)]
    print(
        f"\ndigits structured 0.5 via service: {base['size_bytes']} -> {res['size_bytes']} bytes, accuracy "
        f"{base['accuracy']:.4f} -> {res['accuracy']:.4f}, p50 {base['latency_ms']['p50']:.3f} -> "
        f"{res['latency_ms']['p50']:.3f} ms (batch {res['latency_ms']['batch_size']:.0f})"
    )
    # Plain onnxruntime on the downloaded bytes: the accuracy the report claims.
    _, _, x_test, y_test = digits_arrays()
    logits = ort.InferenceSession(body, providers=["CPUExecutionProvider"]).run(None, {"input": x_test})[0]
    assert float((logits.argmax(1) == y_test).mean()) == pytest.approx(res["accuracy"], abs=1e-9)
    assert {tuple(t.dims) for t in onnx.load_from_string(body).graph.initializer} >= {(8, 1, 3, 3), (16, 8, 3, 3)}


def test_int4_weight_only_mlp(deployment: Deployment, tmp_path: Path) -> None:
    model = mlp_model(tmp_path / "mlp.onnx").read_bytes()
    x = np.random.default_rng(0).standard_normal((64, 256)).astype(np.float32)
    buf = io.BytesIO()
    np.savez(buf, x=x)
    job, body = _run_job(
        deployment, model, buf.getvalue(), [{"op": "quantize", "method": "int4_weight_only", "group_size": 32}]
    )
    base, res = job["metrics"]["baseline"], job["metrics"]["result"]
    assert base["size_bytes"] / res["size_bytes"] > 5.5 and res["cosine"] > 0.99
    assert res["parameters"] == base["parameters"]
    assert {r["bits"] for r in res["layers"] if r["name"].endswith(".weight")} == {4}
    print(
        f"\nMLP int4_weight_only via service: {base['size_bytes'] / res['size_bytes']:.2f}x smaller, "
        f"cosine {res['cosine']:.5f}"
    )
    ref = ort.InferenceSession(model, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    out = ort.InferenceSession(body, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    cos = (ref * out).sum(1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(out, axis=1))
    assert float(cos.mean()) == pytest.approx(res["cosine"], abs=1e-4)
