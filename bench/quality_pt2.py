"""The .pt2 catalogue on the digits CNN: accuracy, size and latency of each method and chain, against fp32.

    .venv/bin/python bench/quality_pt2.py              # a few minutes; starts no services

Model: the digits CNN of the test support as a torch.export program (38,282 parameters, 177 KB .pt2); data: the
397 held-out digits with labels (as a user uploads them; a copy without labels for the unlabelled rows). Each row
runs the worker's own pipeline (``run_pipeline``: what a job runs, without the queue), which measures the baseline
and the result on the same data. Training steps (regularized, finetune) train on 80% of these 397 digits and
report before/after on the held-out 20%; the table's accuracy is the pipeline's, on all 397 (training samples
included). Every result is loaded again here with plain ``torch.export.load`` and must give the job's accuracy.
Latency: p50 of one batch of 64 in torch eager mode (``ep.module()``, one thread), original and result timed
alternately; the whole run uses one torch thread.

Targets (from the issue): Taylor (gradient) pruning not worse than magnitude at 80%; fine-tuning after 90%
magnitude pruning recovers accuracy with the sparsity unchanged; int8 weight-only within 0.5 pp; int4 weights
really ~8x smaller than fp32 (the packed weight bytes, group 128). Exit status 1 if a target is missed.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np


def _chains() -> list[tuple[str, bool, list[Any]]]:
    """(label, with labels, steps)."""
    from app.jobs.spec import (
        Finetune,
        PruneGradient,
        PruneMagnitude,
        PruneRegularized,
        QuantizeBf16,
        QuantizeInt4WeightOnly,
        QuantizeInt8WeightOnly,
    )

    mag90 = PruneMagnitude(method="magnitude", sparsity=0.9)
    return [
        ("magnitude 0.8", True, [PruneMagnitude(method="magnitude", sparsity=0.8)]),
        ("gradient 0.8 (labels)", True, [PruneGradient(method="gradient", sparsity=0.8)]),
        ("gradient 0.8 (no labels: original's top-1)", False, [PruneGradient(method="gradient", sparsity=0.8)]),
        ("magnitude 0.9", True, [mag90]),
        ("gradient 0.9 (labels)", True, [PruneGradient(method="gradient", sparsity=0.9)]),
        (
            "regularized 0.9 (defaults: l1 1e-4, 3 ep, lr 1e-3)",
            True,
            [PruneRegularized(method="regularized", sparsity=0.9)],
        ),
        (
            "regularized 0.9 (l1 1e-2, 5 ep, lr 3e-3)",
            True,
            [PruneRegularized(method="regularized", sparsity=0.9, strength=1e-2, epochs=5, lr=3e-3)],
        ),
        (
            "regularized 0.9 (l2 1e-2, 5 ep, lr 3e-3)",
            True,
            [PruneRegularized(method="regularized", sparsity=0.9, penalty="l2", strength=1e-2, epochs=5, lr=3e-3)],
        ),
        ("magnitude 0.9 + distill (defaults: 3 ep, lr 1e-3)", True, [mag90, Finetune(method="distill")]),
        ("magnitude 0.9 + distill (3 ep, lr 3e-3)", True, [mag90, Finetune(method="distill", lr=3e-3)]),
        ("magnitude 0.9 + distill (10 ep, lr 3e-3)", True, [mag90, Finetune(method="distill", epochs=10, lr=3e-3)]),
        ("magnitude 0.9 + labels (3 ep, lr 3e-3)", True, [mag90, Finetune(method="labels", lr=3e-3)]),
        (
            "magnitude 0.9 + distill (10 ep, lr 3e-3) + int8_weight_only",
            True,
            [mag90, Finetune(method="distill", epochs=10, lr=3e-3), QuantizeInt8WeightOnly(method="int8_weight_only")],
        ),
        ("int8_weight_only (per row)", True, [QuantizeInt8WeightOnly(method="int8_weight_only")]),
        ("int8_weight_only g32", True, [QuantizeInt8WeightOnly(method="int8_weight_only", group_size=32)]),
        ("int4_weight_only g32", True, [QuantizeInt4WeightOnly(method="int4_weight_only")]),
        ("int4_weight_only g128", True, [QuantizeInt4WeightOnly(method="int4_weight_only", group_size=128)]),
        (
            "int4_weight_only g32 asymmetric",
            True,
            [QuantizeInt4WeightOnly(method="int4_weight_only", symmetric=False)],
        ),
        ("bf16", True, [QuantizeBf16(method="bf16")]),
    ]


def main() -> int:
    from _common import ROOT, Targets, add_common_args, header, print_table

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(ap)
    ap.add_argument("--latency-runs", type=int, default=100, help="timed runs per latency measurement")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    import torch

    # One thread: with two on two shared cores, the p50 of the same fp32 model jumped between 1.5 and 10 ms.
    torch.set_num_threads(1)

    from app.jobs.spec import EvalOptions
    from tests.support.models import digits_arrays, digits_pt2_bytes
    from worker.compress.pipeline import run_pipeline
    from worker.compress.types import EvalData

    header(".pt2 catalogue on the digits CNN: accuracy, size, latency per method", wait_quiet_s=args.wait_quiet)
    _, _, x, y = digits_arrays()
    labelled, unlabelled = EvalData({"input": x}, y), EvalData({"input": x})
    batch = {"input": x[:64]}

    def plain_accuracy(path: Path) -> float:
        with torch.no_grad():
            logits = torch.export.load(str(path)).module()(torch.from_numpy(x)).numpy()
        return float((logits.argmax(1) == y).mean())

    def interleaved_p50(before: Path, after: Path) -> tuple[float, float]:
        modules = [torch.export.load(str(p)).module() for p in (before, after)]
        inp = torch.from_numpy(batch["input"])
        times: list[list[float]] = [[], []]
        with torch.inference_mode():
            for i in range(args.latency_runs + 3):
                for m, t in zip(modules, times, strict=True):
                    t0 = time.perf_counter()
                    m(inp)
                    if i >= 3:
                        t.append(1000 * (time.perf_counter() - t0))
        return float(np.median(times[0])), float(np.median(times[1]))

    rows: list[list[Any]] = []
    results: dict[str, dict[str, Any]] = {}
    details_rows: list[list[Any]] = []
    with tempfile.TemporaryDirectory(prefix="squeeze-bench-") as tmp:
        work = Path(tmp)
        source = work / "digits.pt2"
        source.write_bytes(digits_pt2_bytes())
        options = EvalOptions(batch_size=64, latency_runs=1, warmup_runs=0, layer_sensitivity="off")
        for label, with_labels, steps in _chains():
            run = work / f"run{len(results)}"
            run.mkdir()
            t0 = time.perf_counter()
            job = run_pipeline(
                model_path=source,
                fmt="pt2",
                steps=steps,
                data=labelled if with_labels else unlabelled,
                options=options,
                device="cpu",
                workdir=run,
            )
            seconds = time.perf_counter() - t0
            base, res = job.baseline, job.result
            assert res is not None and job.output_path is not None
            bare = plain_accuracy(job.output_path)
            base_acc = plain_accuracy(source)
            if with_labels:
                assert bare == res.accuracy, (bare, res.accuracy)  # the job reports what a user gets
            before_ms, after_ms = interleaved_p50(source, job.output_path)
            coded = [r for r in res.layers or [] if r["bits"] in (4, 8) and r["op"] == "linear"]
            weight_ratio = sum(4 * r["parameters"] for r in coded) / sum(r["bytes"] for r in coded) if coded else None
            results[label] = {"accuracy": bare, "base": base_acc, "report": job.steps, "weight_ratio": weight_ratio}
            rows.append(
                [
                    label,
                    base.size_bytes,
                    res.size_bytes,
                    base.size_bytes / res.size_bytes,
                    weight_ratio,
                    res.sparsity,
                    base_acc,
                    bare,
                    before_ms,
                    after_ms,
                    seconds,
                ]
            )
            for step in job.steps:
                d = step.details
                if "accuracy_after" in d:
                    details_rows.append(
                        [
                            label,
                            f"{step.op}/{step.method}",
                            d.get("accuracy_before"),
                            d.get("accuracy_trained"),
                            d.get("accuracy_after"),
                            d.get("sparsity_before"),
                            d.get("sparsity_after"),
                            d.get("loss_first_epoch"),
                            d.get("loss_last_epoch"),
                        ]
                    )
            print(f"  done: {label}", file=sys.stderr)
    print()
    print(
        "accuracy: all 397 digits, the result loaded with plain torch.export.load; Linear x smaller: fp32 bytes of "
        "the quantized Linear weights / their stored bytes (codes + scales); p50: one batch of 64, torch eager, "
        "original and result alternately; s: the whole pipeline (baseline, steps, result)"
    )
    print_table(
        [
            "chain",
            "bytes before",
            "bytes after",
            "x smaller",
            "Linear x smaller",
            "sparsity",
            "acc before",
            "acc after",
            "p50 ms fp32",
            "p50 ms after",
            "s",
        ],
        rows,
    )
    print()
    print("training steps, on the held-out 20% (79 digits) of the data: before, after training, after the step")
    print_table(
        ["chain", "step", "acc before", "acc trained", "acc after", "sparsity before", "sparsity after", "loss ep1",
         "loss last"],
        details_rows,
    )  # fmt: skip

    targets = Targets(enabled=not args.no_check)
    mag80, grad80 = results["magnitude 0.8"]["accuracy"], results["gradient 0.8 (labels)"]["accuracy"]
    targets.check(
        "gradient 0.8 vs magnitude 0.8", f"{grad80:.4f} vs {mag80:.4f}", ">= magnitude - 0.01", grad80 >= mag80 - 0.01
    )
    mag90 = results["magnitude 0.9"]["accuracy"]
    for label in ("magnitude 0.9 + distill (3 ep, lr 3e-3)", "magnitude 0.9 + labels (3 ep, lr 3e-3)"):
        tuned = results[label]["accuracy"]
        ft = results[label]["report"][-1].details
        targets.check(f"{label}: accuracy", f"{mag90:.4f} -> {tuned:.4f}", ">= +0.15", tuned >= mag90 + 0.15)
        targets.check(
            f"{label}: sparsity kept",
            f"{ft['sparsity_before']} -> {ft['sparsity_after']}",
            "equal",
            ft["sparsity_before"] == ft["sparsity_after"],
        )
    r = results["int8_weight_only (per row)"]
    targets.check(
        "int8_weight_only accuracy loss",
        f"{r['base'] - r['accuracy']:+.4f}",
        "<= 0.005",
        r["base"] - r["accuracy"] <= 0.005,
    )
    ratio = results["int4_weight_only g128"]["weight_ratio"]
    targets.check("int4 g128: Linear weight bytes fp32 / stored", f"{ratio:.2f}x", "~8x (>= 7.5x)", ratio >= 7.5)
    chain = results["magnitude 0.9 + distill (10 ep, lr 3e-3) + int8_weight_only"]
    targets.check(
        "magnitude 0.9 + distill 10 ep + int8 wo: accuracy",
        f"{chain['accuracy']:.4f} (fp32 {chain['base']:.4f})",
        "report",
        True,
    )
    return targets.finish()


if __name__ == "__main__":
    sys.exit(main())
