"""Every upload format through the real API and Celery worker, converted to ONNX on request.

The downloaded artifacts are checked with plain ONNX Runtime, independently of the service's code, and must give the
accuracy the report claims, measured in the runtime the report names.
"""

from __future__ import annotations

import hashlib
import uuid

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from tests.e2e.conftest import Deployment
from tests.support.models import digits_arrays, digits_npz_bytes, digits_pt2_bytes, digits_torchscript_bytes
from tests.support.service import wait_job


def _upload(client, path: str, data: bytes, filename: str) -> dict:
    r = client.post(path, files={"file": (filename, data)})
    assert r.status_code == 201, r.text
    return r.json()


def _model_artifact(client, job: dict) -> tuple[dict, bytes]:
    art = next(a for a in job["artifacts"] if a["kind"] == "model")
    r = client.get(f"/v1/artifacts/{art['id']}/download")
    assert r.status_code == 200 and hashlib.sha256(r.content).hexdigest() == art["sha256"]
    return art, r.content


def _onnx_accuracy(body: bytes, batch: int) -> float:
    _, _, x_test, y_test = digits_arrays()
    sess = ort.InferenceSession(body, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    logits = np.concatenate([sess.run(None, {name: x_test[i : i + batch]})[0] for i in range(0, len(x_test), batch)])
    return float((logits.argmax(1) == y_test).mean())


def test_torchscript_pruned_converted_and_quantized(deployment: Deployment) -> None:
    client = deployment.client(deployment.new_key(f"e2e-{uuid.uuid4().hex[:6]}"))
    model = _upload(client, "/v1/models", digits_torchscript_bytes("scripted"), "digits.pt")
    assert model["format"] == "torchscript"
    dataset = _upload(client, "/v1/datasets", digits_npz_bytes(), "digits.npz")
    spec = {
        "model_id": model["id"],
        "dataset_id": dataset["id"],
        "steps": [
            {"op": "prune", "method": "magnitude", "sparsity": 0.5},
            {"op": "convert", "method": "onnx"},
            {"op": "quantize", "method": "int8_dynamic"},
        ],
        "output_format": "onnx",
    }
    r = client.post("/v1/jobs", json=spec)
    assert r.status_code == 202, r.text
    job = wait_job(client, r.json()["id"])
    assert job["status"] == "succeeded", job["error"]
    base, res = job["metrics"]["baseline"], job["metrics"]["result"]
    # Each measurement says which runtime it was taken in.
    assert base["runtime"].endswith("(TorchScript)") and res["runtime"].startswith("onnxruntime ")
    assert base["accuracy"] > 0.95 and res["accuracy"] >= base["accuracy"] - 0.03
    assert res["sparsity"] > 0.4 and res["size_bytes"] < base["size_bytes"] / 2.5

    art, body = _model_artifact(client, job)
    assert art["format"] == "onnx" and len(body) == res["size_bytes"]
    # Plain ONNX Runtime: the accuracy the report claims, at the job's batch size (dynamic quantization
    # scales activations per batch); pruned weights are still zero after quantization.
    assert _onnx_accuracy(body, 32) == pytest.approx(res["accuracy"], abs=1e-9)
    weights = [numpy_helper.to_array(t) for t in onnx.load_from_string(body).graph.initializer]
    big = [w for w in weights if w.ndim >= 2]
    assert sum(int((w == 0).sum()) for w in big) / sum(w.size for w in big) >= 0.49


def test_pt2_converted_to_onnx_on_request(deployment: Deployment) -> None:
    client = deployment.client(deployment.new_key(f"e2e-{uuid.uuid4().hex[:6]}"))
    model = _upload(client, "/v1/models", digits_pt2_bytes(), "digits.pt2")
    dataset = _upload(client, "/v1/datasets", digits_npz_bytes(), "digits.npz")
    spec = {"model_id": model["id"], "dataset_id": dataset["id"], "output_format": "onnx"}
    r = client.post("/v1/jobs", json=spec)
    assert r.status_code == 202, r.text
    job = wait_job(client, r.json()["id"])
    assert job["status"] == "succeeded", job["error"]
    base, res = job["metrics"]["baseline"], job["metrics"]["result"]
    assert "torch.export" in base["runtime"] and res["runtime"].startswith("onnxruntime ")
    assert res["accuracy"] == pytest.approx(base["accuracy"], abs=0.003)  # the same network, another runtime
    assert res["parameters"] == base["parameters"]

    art, body = _model_artifact(client, job)
    assert art["format"] == "onnx"
    sess = ort.InferenceSession(body, providers=["CPUExecutionProvider"])
    assert isinstance(sess.get_inputs()[0].shape[0], str)  # the batch dimension stays dynamic
    assert _onnx_accuracy(body, 50) == pytest.approx(res["accuracy"], abs=1e-9)
