"""The .pt2 catalogue through the service: prune 90% → fine-tune by distillation → int8 weight-only, submitted over
HTTP, run by a real Celery worker, and the downloaded program checked with plain torch.export.load."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests.e2e.conftest import Deployment
from tests.support.models import ROOT, digits_arrays, digits_npz_bytes, digits_pt2_bytes
from tests.support.service import wait_job


def test_prune_finetune_quantize_recovers_accuracy(deployment: Deployment, tmp_path: Path) -> None:
    client = deployment.client(deployment.new_key(f"catalogue-pt2-{uuid.uuid4().hex[:6]}"))
    model_id = client.post("/v1/models", files={"file": ("digits.pt2", digits_pt2_bytes())}).json()["id"]
    dataset_id = client.post("/v1/datasets", files={"file": ("digits.npz", digits_npz_bytes())}).json()["id"]
    steps = [
        {"op": "prune", "method": "magnitude", "sparsity": 0.9},
        {"op": "finetune", "method": "distill", "epochs": 3, "lr": 0.003},
        {"op": "quantize", "method": "int8_weight_only"},
    ]
    spec = {"model_id": model_id, "dataset_id": dataset_id, "steps": steps, "evaluation": {"latency_runs": 5}}
    r = client.post("/v1/jobs", json=spec)
    assert r.status_code == 202, r.text
    job = wait_job(client, r.json()["id"])
    assert job["status"] == "succeeded", job["error"]

    base, res = job["metrics"]["baseline"], job["metrics"]["result"]
    prune, finetune, quantize = (s["details"] for s in job["report"]["steps"])
    print(
        f"\ndigits pt2 magnitude 0.9 -> distill -> int8_weight_only via service: accuracy {base['accuracy']:.4f} -> "
        f"{res['accuracy']:.4f}; finetune (held-out) {finetune['accuracy_before']:.4f} -> "
        f"{finetune['accuracy_after']:.4f}; size {base['size_bytes']} -> {res['size_bytes']} bytes; sparsity "
        f"{res['sparsity']:.4f}"
    )
    assert finetune["accuracy_after"] >= finetune["accuracy_before"] + 0.1
    assert finetune["sparsity_after"] == finetune["sparsity_before"]
    assert prune["achieved"] == 0.9
    assert res["accuracy"] >= base["accuracy"] - 0.03  # 0.733 after pruning alone (tests/worker)
    assert res["parameters"] == base["parameters"] and res["sparsity"] > 0.89
    assert res["size_bytes"] < base["size_bytes"] * 0.6 and quantize["quantized_layers"] == 2

    artifact = next(a for a in job["artifacts"] if a["kind"] == "model")
    body = client.get(artifact["download_url"]).content
    assert len(body) == res["size_bytes"]
    # Plain torch in a fresh Python (no torchao, none of our code): the accuracy and sparsity the report claims.
    path = tmp_path / "result.pt2"
    path.write_bytes(body)
    _, _, x_test, y_test = digits_arrays()
    np.savez(tmp_path / "data.npz", x=x_test, y=y_test)
    script = textwrap.dedent(
        f"""
        import json, numpy as np, torch
        ep = torch.export.load({str(path)!r})
        d = np.load({str(tmp_path / "data.npz")!r})
        with torch.no_grad():
            logits = ep.module()(torch.from_numpy(d["x"])).numpy()
        state = ep.state_dict
        print(json.dumps({{
            "accuracy": float((logits.argmax(1) == d["y"]).mean()),
            "int8": sorted(k for k, v in state.items() if v.dtype == torch.int8),
            "zeros": {{k: int((v == 0).sum()) for k, v in state.items() if k in ("0.weight", "2.weight")}},
        }}))
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["accuracy"] == pytest.approx(res["accuracy"], abs=1e-9)
    assert seen["int8"] == ["6.weight_int8", "8.weight_int8"]
    # The convolutions stay float and keep exactly the zeros the pruning step made.
    pruned = {x["name"]: round(x["sparsity"] * np.prod(x["shape"])) for x in prune["layers"]}
    assert seen["zeros"] == {k: pruned[k] for k in ("0.weight", "2.weight")}


def test_finetune_on_labels_needs_a_labelled_dataset(deployment: Deployment) -> None:
    client = deployment.client(deployment.new_key(f"catalogue-pt2-{uuid.uuid4().hex[:6]}"))
    model_id = client.post("/v1/models", files={"file": ("digits.pt2", digits_pt2_bytes())}).json()["id"]
    buf = io.BytesIO()
    np.savez(buf, input=digits_arrays()[2][:16])
    dataset_id = client.post("/v1/datasets", files={"file": ("x.npz", buf.getvalue())}).json()["id"]
    steps = [{"op": "finetune", "method": "labels"}]
    r = client.post("/v1/jobs", json={"model_id": model_id, "dataset_id": dataset_id, "steps": steps})
    assert r.status_code == 422 and r.json()["error"]["code"] == "labels_required"


def _digits_pt2_with_train_data(
    deployment: Deployment, name: str
) -> tuple[httpx.Client, str, dict[str, Any], dict[str, Any]]:
    """A new user with the digits .pt2, the 397 held-out digits and the 1,400 labelled training digits uploaded:
    (client, model id, held-out dataset, train dataset)."""
    client = deployment.client(deployment.new_key(f"{name}-{uuid.uuid4().hex[:6]}"))
    model_id = client.post("/v1/models", files={"file": ("digits.pt2", digits_pt2_bytes())}).json()["id"]
    held_out = client.post("/v1/datasets", files={"file": ("held-out.npz", digits_npz_bytes())}).json()
    x_train, y_train, _, _ = digits_arrays()
    buf = io.BytesIO()
    np.savez(buf, input=x_train, labels=y_train)
    train = client.post("/v1/datasets", files={"file": ("train.npz", buf.getvalue())}).json()
    return client, model_id, held_out, train


def _run_trained(
    client: httpx.Client, model_id: str, held_out: dict[str, Any], train: dict[str, Any], steps: list[dict[str, Any]]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Submit ``steps`` trained on ``train`` and measured on ``held_out``, wait for success: (job, spec)."""
    spec = {
        "model_id": model_id,
        "dataset_id": held_out["id"],
        "train_dataset_id": train["id"],
        "steps": steps,
        "evaluation": {"latency_runs": 2, "layer_sensitivity": "off"},
    }
    r = client.post("/v1/jobs", json=spec)
    assert r.status_code == 202, r.text
    job = wait_job(client, r.json()["id"], timeout=300)
    assert job["status"] == "succeeded", job["error"]
    return job, spec


def test_finetune_trains_on_the_train_dataset_and_is_measured_on_the_held_out_one(deployment: Deployment) -> None:
    """train_dataset_id: the 1400 training digits train the fine-tune; the 397 held-out digits (dataset_id) measure
    it, before/after included, so the job's accuracy is on data the model never trained on."""
    client, model_id, held_out, train = _digits_pt2_with_train_data(deployment, "catalogue-pt2")
    assert train["num_samples"] == 1400 and held_out["num_samples"] == 397
    steps = [
        {"op": "prune", "method": "magnitude", "sparsity": 0.9},
        {"op": "finetune", "method": "distill", "epochs": 3, "lr": 0.003},
    ]
    job, spec = _run_trained(client, model_id, held_out, train, steps)

    result = job["metrics"]["result"]
    finetune = job["report"]["steps"][1]
    tuned = finetune["details"]
    print(
        f"\ndigits pt2 magnitude 0.9 -> distill on the 1400 training digits: held-out accuracy "
        f"{tuned['accuracy_before']:.4f} (pruned) -> {tuned['accuracy_after']:.4f}; job result {result['accuracy']:.4f}"
    )
    assert tuned["train_samples"] == 1400
    assert "all 397 samples of the job's dataset (dataset_id)" in tuned["measured_on"]
    assert any("train_dataset_id, 1400 samples" in note for note in finetune["notes"])
    assert result["samples"] == 397
    # accuracy_before is the pruned model on the held-out digits (0.733 in tests/worker); the job's final
    # accuracy, on the same held-out digits, recovers well above it.
    assert result["accuracy"] >= tuned["accuracy_before"] + 0.15
    assert tuned["accuracy_after"] == pytest.approx(result["accuracy"], abs=1 / 397)

    report = next(a for a in job["artifacts"] if a["kind"] == "report")
    inputs = client.get(report["download_url"]).json()["inputs"]
    assert inputs["train_dataset"] == {"id": train["id"], "sha256": train["sha256"]}
    assert inputs["dataset"] == {"id": held_out["id"], "sha256": held_out["sha256"]}
    markdown = next(a for a in job["artifacts"] if a["kind"] == "report_markdown")
    assert f"train dataset `{train['id']}` (sha256 `{train['sha256']}`" in client.get(markdown["download_url"]).text

    # The train dataset's bytes are part of the cache key: the same job again is a hit, other training data is not.
    assert client.post("/v1/jobs", json=spec).json()["cache_hit"] is True
    x_train, y_train, _, _ = digits_arrays()
    half = io.BytesIO()
    np.savez(half, input=x_train[:700], labels=y_train[:700])
    fewer = client.post("/v1/datasets", files={"file": ("train-700.npz", half.getvalue())}).json()
    other = client.post("/v1/jobs", json={**spec, "train_dataset_id": fewer["id"]}).json()
    assert other["cache_hit"] is False and other["status"] == "queued"
    client.post(f"/v1/jobs/{other['id']}/cancel")


def test_deep_compression_pipeline_as_one_job_is_40x_smaller_at_held_out_accuracy(
    deployment: Deployment, tmp_path: Path
) -> None:
    """Han et al.'s pipeline in one job: prune in steps, retraining on the training digits after each, convert, then
    4-bit values and float16 biases in the squeeze encoding; measured on the 397 held-out digits only. The issue's
    bar is 40x at <= 0.5 pp (one digit is 0.25 pp); bench/quality.py measured 42.0x at -0.25 pp."""
    from squeeze.loader import load_onnx
    from tests.support.models import digits_onnx_bytes

    client, model_id, held_out, train = _digits_pt2_with_train_data(deployment, "deep-compression")
    _, _, x_test, y_test = digits_arrays()
    steps: list[dict[str, Any]] = []
    for sparsity in (0.5, 0.8, 0.9, 0.93, 0.95, 0.96):
        steps += [
            {"op": "prune", "method": "magnitude", "sparsity": sparsity},
            {"op": "finetune", "method": "labels", "epochs": 20, "lr": 0.003},
        ]
    steps += [
        {"op": "convert", "method": "onnx"},
        {"op": "encode", "method": "squeeze", "value_bits": 4, "float_tensors": "float16"},
    ]
    job, _ = _run_trained(client, model_id, held_out, train, steps)
    base, result = job["metrics"]["baseline"], job["metrics"]["result"]
    encode = job["report"]["steps"][-1]["details"]
    fp32_onnx = len(digits_onnx_bytes())
    print(
        f"\ndigits Deep Compression pipeline: {result['size_bytes']} B, {fp32_onnx / result['size_bytes']:.1f}x vs the "
        f"fp32 .onnx, held-out accuracy {base['accuracy']:.4f} -> {result['accuracy']:.4f}, sparsity "
        f"{result['sparsity']:.3f}, half tensors {encode['half_tensors']}, graph dropped {encode['graph_dropped']}"
    )
    assert result["sparsity"] > 0.95 and encode["half_tensors"] == 4 and encode["format_version"] == 2
    # A margin of one digit over the 0.5 pp (two digits): training threads may order float sums differently.
    assert fp32_onnx / result["size_bytes"] >= 40
    assert base["accuracy"] - result["accuracy"] <= 0.0076

    # Independently: the downloaded .sqz decodes with the client loader and scores the same in plain ONNX Runtime.
    import onnxruntime as ort

    art = next(a for a in job["artifacts"] if a["kind"] == "model")
    path = tmp_path / "digits.sqz"
    path.write_bytes(client.get(art["download_url"]).content)
    assert path.stat().st_size == result["size_bytes"]
    session = ort.InferenceSession(load_onnx(path).SerializeToString(), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    logits = np.concatenate([session.run(None, {name: x_test[i : i + 64]})[0] for i in range(0, len(x_test), 64)])
    assert float((logits.argmax(1) == y_test).mean()) == pytest.approx(result["accuracy"], abs=1e-9)
