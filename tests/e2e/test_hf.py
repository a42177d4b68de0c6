"""A Hugging Face model folder through the real API and Celery worker: a BERT classifier trained on digits written
as text (tests/support/hf_models.py), uploaded as a plain tar, with a JSONL dataset tokenized by its own tokenizer.

Two jobs: magnitude 0.5 -> int8 weight-only (torchao) and Wanda 0.5 -> ONNX -> int8 dynamic (ONNX Runtime). The
downloaded artifacts are loaded by transformers' from_pretrained in a fresh Python and by plain ONNX Runtime, and
must give the accuracy the report claims.
"""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
import textwrap
import uuid
import zipfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from tests.e2e.conftest import Deployment
from tests.support.hf_folders import folder_tar_bytes
from tests.support.hf_models import ROOT, classifier_folder, digits_jsonl_bytes, digits_texts
from tests.support.service import wait_job

EVALUATION = {"latency_runs": 5, "layer_sensitivity": "off"}


def _download(client, job: dict) -> bytes:
    art = next(a for a in job["artifacts"] if a["kind"] == "model")
    r = client.get(f"/v1/artifacts/{art['id']}/download")
    assert r.status_code == 200 and hashlib.sha256(r.content).hexdigest() == art["sha256"]
    return r.content


def _fresh_python(folder: Path) -> dict:
    """transformers' own from_pretrained in a new process (none of the service's code): accuracy and weights."""
    script = textwrap.dedent(
        f"""
        import json, sys
        sys.path.insert(0, {str(ROOT)!r})
        from transformers import AutoModelForSequenceClassification
        from tests.support.hf_models import held_out_accuracy
        model = AutoModelForSequenceClassification.from_pretrained({str(folder)!r}, local_files_only=True)
        w = model.bert.encoder.layer[0].intermediate.dense.weight
        print(json.dumps({{
            "accuracy": held_out_accuracy({str(folder)!r}),
            "weight": type(w).__name__,
            "zeros": float((w.dequantize() == 0).float().mean()),
        }}))
        """
    )
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HOME": str(folder)}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_hf_folder_pruned_quantized_and_converted(deployment: Deployment, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    client = deployment.client(deployment.new_key(f"e2e-hf-{uuid.uuid4().hex[:6]}"))
    r = client.post("/v1/models", files={"file": ("digits-bert.tar", folder_tar_bytes(classifier_folder(), root="m"))})
    assert r.status_code == 201, r.text
    model = r.json()
    assert (model["format"], model["packaging"], model["parameters"]) == ("hf", "tar", 84_618)
    r = client.post("/v1/datasets", files={"file": ("digits.jsonl", digits_jsonl_bytes())})
    assert r.status_code == 201, r.text
    dataset = r.json()
    assert (dataset["format"], dataset["num_samples"], dataset["label_values"]) == ("jsonl", 397, list(range(10)))

    common = {"model_id": model["id"], "dataset_id": dataset["id"], "evaluation": EVALUATION}
    pruned_int8 = [
        {"op": "prune", "method": "magnitude", "sparsity": 0.5},
        {"op": "quantize", "method": "int8_weight_only"},
    ]
    wanda_onnx = [
        {"op": "prune", "method": "wanda", "sparsity": 0.5},
        {"op": "convert", "method": "onnx"},
        {"op": "quantize", "method": "int8_dynamic"},
    ]
    ids = []
    for steps in (pruned_int8, wanda_onnx):
        r = client.post("/v1/jobs", json={**common, "steps": steps})
        assert r.status_code == 202, r.text
        ids.append(r.json()["id"])

    job = wait_job(client, ids[0])
    assert job["status"] == "succeeded", job["error"]
    base, res = job["metrics"]["baseline"], job["metrics"]["result"]
    prune, quantize = (s["details"] for s in job["report"]["steps"])
    print(
        f"\nhf digits-bert magnitude 0.5 -> int8_weight_only via service: accuracy {base['accuracy']:.4f} -> "
        f"{res['accuracy']:.4f}; size {base['size_bytes']} -> {res['size_bytes']} bytes"
    )
    assert base["accuracy"] > 0.8 and res["accuracy"] >= base["accuracy"] - 0.05
    assert prune["achieved"] == 0.5 and quantize["quantized_layers"] == 14
    assert res["size_bytes"] < 0.5 * base["size_bytes"] and res["parameters"] == base["parameters"]
    folder = tmp_path / "int8"
    with zipfile.ZipFile(io.BytesIO(_download(client, job))) as zf:
        assert "tokenizer.json" in zf.namelist() and "config.json" in zf.namelist()
        zf.extractall(folder)
    seen = _fresh_python(folder)
    assert seen["weight"] == "Int8Tensor" and seen["zeros"] >= 0.5
    assert seen["accuracy"] == pytest.approx(res["accuracy"], abs=1e-9)

    job = wait_job(client, ids[1])
    assert job["status"] == "succeeded", job["error"]
    base, res = job["metrics"]["baseline"], job["metrics"]["result"]
    wanda, convert, _ = (s["details"] for s in job["report"]["steps"])
    print(
        f"hf digits-bert wanda 0.5 -> onnx -> int8_dynamic via service: accuracy {base['accuracy']:.4f} -> "
        f"{res['accuracy']:.4f}; size {base['size_bytes']} -> {res['size_bytes']} bytes; runtime {res['runtime']}"
    )
    assert wanda["achieved_sparsity"] == 0.5 and convert["max_abs_difference"] < 1e-4
    assert res["runtime"].startswith("onnxruntime") and res["accuracy"] >= base["accuracy"] - 0.08
    artifact = next(a for a in job["artifacts"] if a["kind"] == "model")
    assert artifact["format"] == "onnx" and artifact["filename"].endswith(".onnx")
    # Plain ONNX Runtime, tokenized by the uploaded tokenizer with plain transformers.
    _, _, texts, labels = digits_texts()
    tokenizer = AutoTokenizer.from_pretrained(str(classifier_folder()), local_files_only=True)
    feed = {k: np.asarray(v, dtype=np.int64) for k, v in tokenizer(texts, padding=True, return_tensors="np").items()}
    session = ort.InferenceSession(_download(client, job), providers=["CPUExecutionProvider"])
    # In batches of the job's evaluation batch size: int8_dynamic quantizes activations per batch.
    batch = job["spec"]["evaluation"]["batch_size"]
    logits = np.concatenate(
        [session.run(None, {k: v[i : i + batch] for k, v in feed.items()})[0] for i in range(0, len(labels), batch)]
    )
    assert float((logits.argmax(1) == labels).mean()) == pytest.approx(res["accuracy"], abs=1e-9)
