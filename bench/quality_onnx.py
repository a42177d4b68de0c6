"""The ONNX catalogue on real models: size, quality and latency of each method, against the fp32 original.

    .venv/bin/python bench/quality_onnx.py              # a few minutes; starts no services
    .venv/bin/python bench/quality_onnx.py --only digits

Models: the digits CNN of the test support (38,282 parameters, 154 KB fp32 .onnx, 397 held-out digits) and
all-MiniLM-L6-v2 exported to ONNX (tests/support/minilm.py, 22.6 M parameters, 90.8 MB; 32 sentences, offline).
Each row runs the worker's own pipeline (``run_pipeline``: what a job runs, without the queue), which measures the
baseline and the result in the same run on the same data: size on disk, accuracy (digits), token-level cosine with
padding left out (MiniLM), and p50 latency of one batch (digits 64, MiniLM 32 sentences). Every artifact is loaded
again here with a bare InferenceSession: the digits accuracy must equal the job's, and MiniLM's sentence-embedding
cosine (mean-pooled, as sentence-transformers does) is computed independently. Wanda calibrates on the same 32
sentences it is measured on (the job's dataset serves both); no fine-tuning follows any pruning.

Targets (from the issue): structured 50% on the digits CNN makes the file much smaller (its CNN: 290 -> 76 KB,
3.8x; here >= 3.5x) and the batch faster; MiniLM int8 dynamic and int8 weight-only with embeddings >= 3.9x smaller
with cosine >= 0.99; int4 weights really ~8x smaller than fp32 (the packed weight bytes). Exit status 1 if a
target is missed (--no-check: 0).
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np


def _steps() -> dict[str, list[tuple[str, Any]]]:
    from app.jobs.spec import (
        PruneMagnitude,
        PruneStructured,
        PruneWanda,
        QuantizeInt4WeightOnly,
        QuantizeInt8Dynamic,
        QuantizeInt8WeightOnly,
    )

    emb = ["embedding"]
    return {
        "digits": [
            ("prune/structured 0.5 l1", PruneStructured(method="structured", sparsity=0.5)),
            ("prune/structured 0.5 l2", PruneStructured(method="structured", sparsity=0.5, norm="l2")),
            ("prune/structured 0.25 l1", PruneStructured(method="structured", sparsity=0.25)),
            ("prune/structured 0.25 round_to 16", PruneStructured(method="structured", sparsity=0.25, round_to=16)),
            ("prune/structured 0.5 round_to 16", PruneStructured(method="structured", sparsity=0.5, round_to=16)),
            ("quantize/int8_weight_only", QuantizeInt8WeightOnly(method="int8_weight_only")),
            ("quantize/int4_weight_only g32", QuantizeInt4WeightOnly(method="int4_weight_only")),
        ],
        "minilm": [
            ("quantize/int8_dynamic", QuantizeInt8Dynamic(method="int8_dynamic")),
            ("quantize/int8_weight_only", QuantizeInt8WeightOnly(method="int8_weight_only")),
            ("quantize/int8_weight_only +emb", QuantizeInt8WeightOnly(method="int8_weight_only", include=emb)),
            ("quantize/int4_weight_only g32 +emb", QuantizeInt4WeightOnly(method="int4_weight_only", include=emb)),
            (
                "quantize/int4_weight_only g128 +emb",
                QuantizeInt4WeightOnly(method="int4_weight_only", group_size=128, include=emb),
            ),
            (
                "quantize/int4_weight_only g32 asym +emb",
                QuantizeInt4WeightOnly(method="int4_weight_only", symmetric=False, include=emb),
            ),
            ("prune/magnitude 2:4", PruneMagnitude(method="magnitude", pattern="2:4")),
            ("prune/magnitude 0.5 per layer", PruneMagnitude(method="magnitude", sparsity=0.5, scope="per_layer")),
            ("prune/wanda 0.5", PruneWanda(method="wanda", sparsity=0.5)),
            ("prune/wanda 2:4", PruneWanda(method="wanda", pattern="2:4")),
            ("prune/structured 0.5 (FFN)", PruneStructured(method="structured", sparsity=0.5)),
        ],
    }


def main() -> int:
    from _common import ROOT, Targets, add_common_args, header, mean_pooled_cosine, print_table

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(ap)
    ap.add_argument("--only", choices=["digits", "minilm"], help="run one model's rows")
    ap.add_argument(
        "--latency-runs",
        type=int,
        default=0,
        help="timed runs per latency measurement (default: digits 200, MiniLM 10)",
    )
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    import onnxruntime as ort

    from app.jobs.spec import EvalOptions
    from tests.support.minilm import minilm_arrays, minilm_onnx_path
    from tests.support.models import digits_npz_bytes, digits_onnx_bytes
    from worker.compress.pipeline import run_pipeline
    from worker.compress.types import EvalData

    header("ONNX catalogue: size, quality, latency per method", wait_quiet_s=args.wait_quiet)
    digits = np.load(io.BytesIO(digits_npz_bytes()))
    datasets = {
        "digits": EvalData({"input": digits["input"]}, digits["labels"]),
        "minilm": EvalData(minilm_arrays()),
    }
    batch = {"digits": 256, "minilm": 32}
    latency_runs = {"digits": args.latency_runs or 200, "minilm": args.latency_runs or 10}
    results: dict[tuple[str, str], dict[str, Any]] = {}

    def sentence_cosine(reference: np.ndarray, path: Path) -> float:
        feeds = datasets["minilm"].inputs
        out = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
        return mean_pooled_cosine(reference, out, feeds["attention_mask"])

    def interleaved_p50(before: Path, after: Path, feeds: dict[str, np.ndarray], runs: int) -> tuple[float, float]:
        """p50 ms of one batch, the two models timed alternately so that both see the same machine load."""
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1  # two threads on two shared cores measured the other sessions' load
        sessions = [ort.InferenceSession(str(p), options, providers=["CPUExecutionProvider"]) for p in (before, after)]
        times: list[list[float]] = [[], []]
        for i in range(runs + 3):
            for s, t in zip(sessions, times, strict=True):
                t0 = time.perf_counter()
                s.run(None, feeds)
                if i >= 3:
                    t.append(1000 * (time.perf_counter() - t0))
        return float(np.median(times[0])), float(np.median(times[1]))

    rows: list[list[Any]] = []
    with tempfile.TemporaryDirectory(prefix="squeeze-bench-") as tmp:
        work = Path(tmp)
        sources = {"digits": work / "digits.onnx", "minilm": minilm_onnx_path()}
        sources["digits"].write_bytes(digits_onnx_bytes())
        for model, steps in _steps().items():
            if args.only and model != args.only:
                continue
            data = datasets[model]
            options = EvalOptions(batch_size=batch[model], latency_runs=1, warmup_runs=0, layer_sensitivity="off")
            reference = ort.InferenceSession(str(sources[model]), providers=["CPUExecutionProvider"]).run(
                None, data.inputs
            )[0]
            for label, step in steps:
                run = work / f"{model}-{len(results)}"
                run.mkdir()
                job = run_pipeline(
                    model_path=sources[model],
                    fmt="onnx",
                    steps=[step],
                    data=data,
                    options=options,
                    device="cpu",
                    workdir=run,
                )
                base, res = job.baseline, job.result
                assert res is not None and job.output_path is not None
                if model == "digits":
                    logits = ort.InferenceSession(str(job.output_path), providers=["CPUExecutionProvider"]).run(
                        None, data.inputs
                    )[0]
                    bare = float((logits.argmax(1) == data.labels).mean())
                    assert bare == res.accuracy, (bare, res.accuracy)  # the job reports what a user gets
                    quality = {"base": base.accuracy, "result": res.accuracy, "sentence": None}
                else:
                    quality = {
                        "base": 1.0,
                        "result": res.cosine,
                        "sentence": sentence_cosine(reference, job.output_path),
                    }
                feeds = {k: v[: batch[model]] for k, v in data.inputs.items()}
                before_ms, after_ms = interleaved_p50(sources[model], job.output_path, feeds, latency_runs[model])
                weights = [r for r in res.layers or [] if r["bits"] == 4]
                fp32_bytes = sum(4 * r["parameters"] for r in weights)
                packed = sum(r["bytes"] for r in weights)
                results[(model, label)] = {
                    "ratio": base.size_bytes / res.size_bytes,
                    "quality": quality,
                    "latency": after_ms / before_ms,
                    "int4_weight_ratio": fp32_bytes / packed if packed else None,
                }
                rows.append(
                    [
                        f"{model} {label}",
                        base.size_bytes,
                        res.size_bytes,
                        base.size_bytes / res.size_bytes,
                        quality["base"],
                        quality["result"],
                        quality["sentence"],
                        before_ms,
                        after_ms,
                        after_ms / before_ms,
                    ]
                )
                print(f"  done: {model} {label}", file=sys.stderr)
        print()
        print(
            "accuracy (digits) or token cosine (MiniLM, padding left out); sentence cos: mean-pooled, bare ORT; "
            "p50 of one batch, bare ORT, original and result timed alternately"
        )
        print_table(
            [
                "model / step",
                "bytes before",
                "bytes after",
                "x smaller",
                "quality before",
                "quality after",
                "sentence cos",
                "p50 ms before",
                "p50 ms after",
                "latency ratio",
            ],
            rows,
        )

    targets = Targets(enabled=not args.no_check)
    if (key := ("digits", "prune/structured 0.5 l1")) in results:
        r = results[key]
        targets.check("digits structured 0.5: x smaller", f"{r['ratio']:.2f}x", ">= 3.5x", r["ratio"] >= 3.5)
        targets.check("digits structured 0.5: p50 after/before", f"{r['latency']:.2f}", "< 1.0", r["latency"] < 1.0)
        targets.check(
            "digits structured 0.5: accuracy (no fine-tuning)", f"{r['quality']['result']:.4f}", "report", True
        )
    for label in ("quantize/int8_dynamic", "quantize/int8_weight_only +emb"):
        if (key := ("minilm", label)) in results:
            r = results[key]
            cos = r["quality"]["sentence"]
            targets.check(f"MiniLM {label}: x smaller", f"{r['ratio']:.3f}x", ">= 3.9x", r["ratio"] >= 3.9)
            targets.check(f"MiniLM {label}: sentence cosine", f"{cos:.4f}", ">= 0.99", cos >= 0.99)
    if (key := ("minilm", "quantize/int4_weight_only g32 +emb")) in results:
        r = results[key]
        targets.check(
            "MiniLM int4: packed weight bytes vs fp32",
            f"{r['int4_weight_ratio']:.2f}x",
            "8x",
            abs(r["int4_weight_ratio"] - 8) < 0.01,
        )
    for label in ("prune/magnitude 2:4", "prune/wanda 0.5", "prune/wanda 2:4"):
        if (key := ("minilm", label)) in results:
            cos = results[key]["quality"]["sentence"]
            targets.check(f"MiniLM {label}: sentence cosine", f"{cos:.4f}", "report", True)
    return targets.finish()


if __name__ == "__main__":
    sys.exit(main())
