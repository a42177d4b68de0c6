"""The hf catalogue through the service: a transformers sequence classifier, each method's size, accuracy, latency.

    .venv/bin/python bench/quality_hf.py              # PostgreSQL + Redis + 1 worker; ~6 minutes (2 rounds)

Model: BERT (2 layers, hidden 64, 84,618 parameters) trained by the test support (tests/support/hf_models.py) on
scikit-learn's digits written as text (one word per inked pixel), saved with save_pretrained and its WordPiece
tokenizer, zipped as a user uploads a folder. Data: the 397 held-out digits as JSONL ({"text", "label"}), tokenized
by the worker with the folder's own tokenizer. Every row is one job through the API and a real Celery worker
(`cache: false`), whose metrics give the baseline and the result measured in the same job: bytes (the folder's files;
for ONNX the .onnx), accuracy on the 397 digits, and the p50 of one batch of 32 (3 warm-up + 20 timed runs) in the
runtime the report names (torch eager for hf, ONNX Runtime after a conversion). The chains run --repeat times
(default 2) in turn; latencies are medians over the rounds and the latency ratio the median of each round's ratio
(a job's baseline and result are timed one after the other, so a burst of other work on the shared cores skews
one round). Sizes and accuracies must be the same in every round. Each artifact is downloaded and
scored again here with plain transformers (from_pretrained + its tokenizer) or plain ONNX Runtime (batches of 32,
as the job; int8_dynamic quantizes activations per batch): it must give the job's accuracy.

Targets: every artifact reproduces its job's accuracy with the plain loader; int8 weight-only (torchao) loses at
most 1 pp and makes the folder at least 2x smaller (embeddings, a fifth of this model, stay float). The rest is
reported. Exit status 1 if a target is missed (--no-check: 0).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()

MAGNITUDE = {"op": "prune", "method": "magnitude", "sparsity": 0.5}
WANDA = {"op": "prune", "method": "wanda", "sparsity": 0.5}
CONVERT = {"op": "convert", "method": "onnx"}
ORT_INT8 = {"op": "quantize", "method": "int8_dynamic"}
CHAINS: list[tuple[str, list[dict[str, Any]]]] = [
    ("magnitude 0.5", [MAGNITUDE]),
    ("wanda 0.5", [WANDA]),
    ("magnitude 2:4", [{"op": "prune", "method": "magnitude", "pattern": "2:4"}]),
    ("wanda 2:4", [{"op": "prune", "method": "wanda", "pattern": "2:4"}]),
    (
        "magnitude 0.8 + finetune labels (3 ep, lr 2e-3)",
        [
            {"op": "prune", "method": "magnitude", "sparsity": 0.8},
            {"op": "finetune", "method": "labels", "epochs": 3, "lr": 0.002},
        ],
    ),
    ("int8_weight_only (torchao)", [{"op": "quantize", "method": "int8_weight_only"}]),
    ("int8_dynamic (torchao)", [{"op": "quantize", "method": "int8_dynamic"}]),
    ("fp16", [{"op": "quantize", "method": "fp16"}]),
    ("bf16", [{"op": "quantize", "method": "bf16"}]),
    ("convert onnx", [CONVERT]),
    ("convert onnx + int8_dynamic (ORT)", [CONVERT, ORT_INT8]),
    ("wanda 0.5 + convert onnx + int8_dynamic (ORT)", [WANDA, CONVERT, ORT_INT8]),
]


def main() -> int:
    from _common import ROOT, Deployment, Targets, add_common_args, header, hf_plain_accuracy, print_table

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--timeout", type=float, default=600, help="seconds to wait for a job (default 600)")
    ap.add_argument("--repeat", type=int, default=2, help="rounds of all chains (default 2)")
    add_common_args(ap)
    args = ap.parse_args()
    header("hf catalogue: a transformers sequence classifier through the service", wait_quiet_s=args.wait_quiet)
    sys.path.insert(0, str(ROOT))
    from tests.support.hf_models import classifier_zip_bytes, digits_jsonl_bytes
    from tests.support.service import wait_job

    t = time.perf_counter()
    model_bytes = classifier_zip_bytes()
    print(f"model   : digits-bert.zip, {len(model_bytes):,} bytes (trained/cached in {time.perf_counter() - t:.1f} s)")
    evaluation = {"batch_size": 32, "warmup_runs": 3, "latency_runs": 20, "layer_sensitivity": "off"}
    runs: dict[str, list[dict[str, Any]]] = {label: [] for label, _ in CHAINS}
    targets = Targets(enabled=not args.no_check)
    with Deployment("quality-hf", pg=True, redis=True) as d, tempfile.TemporaryDirectory() as tmp:
        d.start_api()
        d.start_worker()
        with d.client(d.new_key()) as client:
            model = client.post("/v1/models", files={"file": ("digits-bert.zip", model_bytes)}).raise_for_status()
            data = client.post("/v1/datasets", files={"file": ("digits.jsonl", digits_jsonl_bytes())})
            common = {
                "model_id": model.json()["id"],
                "dataset_id": data.raise_for_status().json()["id"],
                "evaluation": evaluation,
                "cache": False,
            }
            for round_ in range(1, args.repeat + 1):
                for label, steps in CHAINS:
                    t = time.perf_counter()
                    job = client.post("/v1/jobs", json={**common, "steps": steps}).raise_for_status().json()
                    job = wait_job(client, job["id"], timeout=args.timeout)
                    seconds = time.perf_counter() - t
                    if job["status"] != "succeeded":
                        raise RuntimeError(f"{label}: the job ended {job['status']}: {job['error']}")
                    art = next(a for a in job["artifacts"] if a["kind"] == "model")
                    run: dict[str, Any] = {
                        "base": job["metrics"]["baseline"],
                        "res": job["metrics"]["result"],
                        "format": art["format"],
                        "seconds": seconds,
                    }
                    if round_ == 1:
                        body = client.get(f"/v1/artifacts/{art['id']}/download").raise_for_status().content
                        run["plain"] = hf_plain_accuracy(body, art["format"], Path(tmp), evaluation["batch_size"])
                    runs[label].append(run)
                    print(f"  round {round_}: {label} ({seconds:.1f} s)", file=sys.stderr)
    rows: list[list[Any]] = []
    for label, rounds in runs.items():
        first = rounds[0]
        base, res = first["base"], first["res"]
        before = statistics.median(r["base"]["latency_ms"]["p50"] for r in rounds)
        after = statistics.median(r["res"]["latency_ms"]["p50"] for r in rounds)
        ratio = statistics.median(r["res"]["latency_ms"]["p50"] / r["base"]["latency_ms"]["p50"] for r in rounds)
        rows.append(
            [
                label,
                base["size_bytes"],
                res["size_bytes"],
                base["size_bytes"] / res["size_bytes"],
                res["sparsity"],
                base["accuracy"],
                res["accuracy"],
                100 * (res["accuracy"] - base["accuracy"]),
                before,
                after,
                ratio,
                res["runtime"].split(" (")[0],
                statistics.median(r["seconds"] for r in rounds),
            ]
        )
    print()
    print(
        "bytes: the folder's files (hf) or the .onnx; accuracy: 397 held-out digits (the job's metrics); pp: "
        "accuracy change in points; p50: one batch of 32, the baseline in torch eager and the result in its runtime, "
        "in the same job, medians over the rounds; latency x: median of after/before (< 1 is faster); s: POST to "
        "succeeded"
    )
    print_table(
        [
            "chain",
            "bytes before",
            "bytes after",
            "x smaller",
            "sparsity",
            "acc before",
            "acc after",
            "pp",
            "p50 ms before",
            "p50 ms after",
            "latency x",
            "runtime after",
            "s",
        ],
        rows,
    )
    for label, rounds in runs.items():
        first = rounds[0]
        targets.check(
            f"{label}: plain {first['format']} loader",
            f"{first['plain']:.4f} vs {first['res']['accuracy']:.4f}",
            "equal",
            abs(first["plain"] - first["res"]["accuracy"]) < 1e-9,
        )
        same = {(r["res"]["accuracy"], r["res"]["size_bytes"]) for r in rounds}
        if len(rounds) > 1:
            targets.check(f"{label}: rounds agree", f"{len(same)} distinct", "1 (accuracy, bytes)", len(same) == 1)
    wo = runs["int8_weight_only (torchao)"][0]
    loss = 100 * (wo["base"]["accuracy"] - wo["res"]["accuracy"])
    targets.check("int8_weight_only accuracy loss", f"{loss:+.2f} pp", "<= 1 pp", loss <= 1.0)
    ratio = wo["base"]["size_bytes"] / wo["res"]["size_bytes"]
    targets.check("int8_weight_only folder x smaller", f"{ratio:.2f}x", ">= 2x", ratio >= 2.0)
    return targets.finish()


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parent))
    raise SystemExit(main())
