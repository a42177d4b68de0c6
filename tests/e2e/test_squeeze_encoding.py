"""Storage encoding as a user drives it: prune → encode squeeze through the API and a real Celery worker, download
the ``.sqz``, decode it with ``squeeze.loader`` (and the ``squeeze decode`` command), run it with plain onnxruntime.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import uuid
from pathlib import Path

import onnx
import onnxruntime as ort
import pytest

from squeeze.loader import load_onnx
from tests.e2e.conftest import Deployment
from tests.support.models import digits_arrays, digits_npz_bytes, digits_onnx_bytes
from tests.support.service import wait_job

_INSTALLED = Path(sys.executable).with_name("squeeze")
SQUEEZE_CLI = [str(_INSTALLED)] if _INSTALLED.exists() else [sys.executable, "-m", "app.cli"]


def _accuracy(model: onnx.ModelProto) -> float:
    _, _, x_test, y_test = digits_arrays()
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return float((session.run(None, {"input": x_test})[0].argmax(1) == y_test).mean())


@pytest.mark.parametrize(("value_bits", "value_coding"), [(8, "uniform"), (4, "kmeans")])
def test_prune_then_squeeze_downloads_a_file_that_decodes_to_the_reported_accuracy(
    deployment: Deployment, tmp_path: Path, value_bits: int, value_coding: str
) -> None:
    client = deployment.client(deployment.new_key(f"sqz-{uuid.uuid4().hex[:6]}"))
    model = client.post("/v1/models", files={"file": ("digits.onnx", digits_onnx_bytes())}).json()
    dataset = client.post("/v1/datasets", files={"file": ("digits.npz", digits_npz_bytes())}).json()
    spec = {
        "model_id": model["id"],
        "dataset_id": dataset["id"],
        "steps": [
            {"op": "prune", "method": "magnitude", "sparsity": 0.9},
            {"op": "encode", "method": "squeeze", "value_bits": value_bits, "value_coding": value_coding},
        ],
        "evaluation": {"latency_runs": 3, "warmup_runs": 1, "layer_sensitivity": "off"},
    }
    r = client.post("/v1/jobs", json=spec)
    assert r.status_code == 202, r.text
    job = wait_job(client, r.json()["id"])
    assert job["status"] == "succeeded", job["error"]
    base, res = job["metrics"]["baseline"], job["metrics"]["result"]
    assert base["size_bytes"] / res["size_bytes"] > 15  # 154 KB -> about 7 KB (8 bits), 5 KB (4-bit codebooks)
    assert "decoded from squeeze" in res["runtime"]
    encode = job["report"]["steps"][-1]
    assert encode["op"] == "encode" and encode["details"]["bound_ratio"] <= 1.10
    assert encode["details"]["encoded_bytes"] == res["size_bytes"]
    # Every pruned weight gets a codebook with kmeans (a version-2 file), none with uniform (version 1).
    assert encode["details"]["value_coding"] == value_coding
    assert encode["details"]["codebook_tensors"] == (4 if value_coding == "kmeans" else 0)
    assert encode["details"]["format_version"] == (2 if value_coding == "kmeans" else 1)

    art = next(a for a in job["artifacts"] if a["kind"] == "model")
    assert art["format"] == "squeeze" and art["filename"].endswith(".sqz")
    download = client.get(f"/v1/artifacts/{art['id']}/download")
    assert download.status_code == 200
    body = download.content
    assert len(body) == res["size_bytes"] and hashlib.sha256(body).hexdigest() == art["sha256"]

    # The user's side: the loader, plain onnxruntime, the same accuracy as the report.
    assert _accuracy(load_onnx(body)) == pytest.approx(res["accuracy"], abs=1e-12)
    sqz = tmp_path / "digits.sqz"
    sqz.write_bytes(body)
    decoded = subprocess.run(
        [*SQUEEZE_CLI, "decode", str(sqz), "-o", str(tmp_path / "digits.onnx")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert decoded.returncode == 0, decoded.stderr
    assert _accuracy(onnx.load(str(tmp_path / "digits.onnx"))) == pytest.approx(res["accuracy"], abs=1e-12)

    # A .sqz is an output, never a model to upload; a damaged one is refused by the decoder with exit 2.
    refused = client.post("/v1/models", files={"file": ("digits.sqz", body)})
    assert refused.status_code == 422 and refused.json()["error"]["code"] == "unsupported_format"
    damaged = tmp_path / "damaged.sqz"
    damaged.write_bytes(body[: len(body) // 2])
    bad = subprocess.run(
        [*SQUEEZE_CLI, "decode", str(damaged)], capture_output=True, text=True, timeout=120, check=False
    )
    assert bad.returncode == 2 and "truncated" in bad.stderr
