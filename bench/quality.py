"""Quality of compression, one table through the service: every row a job submitted over HTTP and run by a real
Celery worker, every artifact downloaded and checked with the plain runtime.

    .venv/bin/python bench/quality.py                  # PostgreSQL + Redis + 1 worker; ~3 minutes on 2 cores
    .venv/bin/python bench/quality.py --only digits    # or minilm, hf

What runs: `squeeze serve --no-worker` and one `squeeze worker --concurrency 1` on a fresh PostgreSQL database and
Redis (bench/_common.py). Each model and dataset is uploaded once; each row is one `POST /v1/jobs` with
`cache: false`, waited for, its artifact downloaded, then the next row (nothing else runs while a job is timed).
The job's own metrics give the baseline and the result, measured in the same job on the same data: size as stored,
accuracy (digits, BERT) or `cosine` to the original's outputs (MiniLM), and the p50 of one batch in the runtime the
metrics name (`layer_sensitivity` off; --latency-runs timed runs after 3 warm-up runs). All rows run --repeat times
(default 2) in turn: the latencies shown are medians over the rounds, the latency ratio the median of each round's
result/baseline (a job times its baseline and result one after the other, so a burst of other work on the shared
cores skews one round); sizes and accuracies must be the same in every round.

Models and data:
- digits CNN (tests/support/models.py: 38,282 parameters), as `.onnx` and as `.pt2`; measured on the 397 held-out
  digits. The `.pt2` training chains (prune/gradient, finetune) get `train_dataset_id` = the 1,400 training
  digits, so every accuracy in the table is on digits the model never trained on. Calibration (`int8_static`)
  uses the 397 measured digits (it has no train dataset). Batches of 64.
- all-MiniLM-L6-v2 as ONNX (tests/support/minilm.py, 90.8 MB fp32); 32 sentences, batches of 32. Wanda
  calibrates on the sentences it is measured on.
- BERT sequence classifier (tests/support/hf_models.py: 2 layers, hidden 64, trained by the test support on the
  1,400 training digits written as text), zipped as a user uploads a folder; the 397 held-out digits as JSONL.
  Batches of 32.

Independent checks, here, on the downloaded bytes: digits `.onnx` with a bare ONNX Runtime session (batches as the
job), `.sqz` decoded with `squeeze.loader.load_onnx` and then the same, `.pt2` with plain `torch.export.load`, hf
folders with plain transformers `from_pretrained`: each accuracy must equal the job's. MiniLM: the sentence-embedding
cosine (token states mean-pooled over the attention mask, as sentence-transformers does) of the artifact against
the original, both in bare ONNX Runtime. The downloaded size must equal the job's `size_bytes` (an hf folder is
downloaded zipped: the sum of its files' sizes).

Targets (the issue's): digits CNN, magnitude 90% + 8-bit values + squeeze encoding >= 40x smaller and <= 0.5 pp
accuracy loss (Deep Compression: 39-40x on LeNets), as the issue states it (ONNX, and .pt2 with one fine-tune:
at 90% the positions alone cost ~2.2 KB of the 3.9 KB that 40x allows) and as Deep Compression's own pipeline
(.pt2: iterative pruning 0.5 -> 0.96, each level retrained on the training digits' labels, convert, 4-bit values
with float16 biases in the squeeze encoding); "x smaller" of .pt2 rows is also given against the fp32 .onnx (the
.pt2 container is 22 KB larger). MiniLM int8 dynamic and int8 weight-only with embeddings >= 3.9x
smaller with cosine >= 0.99 (the job's and the sentence cosine); from the earlier catalogues: digits structured
50% >= 3.5x smaller and faster, fine-tuning after 90% pruning recovers (>= +15 pp, zeros kept), pt2 int8
weight-only <= 0.5 pp. Every artifact must reproduce its job's figure. The rest is reported. Exit status 1 if a
target is missed (--no-check: 0).
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from _common import (
    Deployment,
    Targets,
    add_common_args,
    header,
    hf_plain_accuracy,
    mean_pooled_cosine,
    ort_logits,
    print_table,
    wait_job,
)

MAG90 = {"op": "prune", "method": "magnitude", "sparsity": 0.9}
SQUEEZE8 = {"op": "encode", "method": "squeeze", "value_bits": 8}
DISTILL10 = {"op": "finetune", "method": "distill", "epochs": 10}
CONVERT = {"op": "convert", "method": "onnx"}
EMB = ["embedding"]
DEEP_COMPRESSION = "Deep Compression: LeNets 39-40x, no loss"
LABELS20 = {"op": "finetune", "method": "labels", "epochs": 20, "lr": 3e-3}
WANDA_README = "Wanda README, Llama-2-7B wikitext ppl 5.12 -> "


@dataclass(frozen=True)
class Row:
    model: str  # a key of MODELS
    recipe: str
    steps: list[dict[str, Any]]
    anchor: str = "-"
    train: bool = False  # the job gets train_dataset_id (its chain trains)


@dataclass
class Outcome:
    row: Row
    jobs: list[dict[str, Any]] = field(default_factory=list)  # one per round
    plain: float | None = None  # accuracy (digits, BERT) or sentence cosine (MiniLM), from the downloaded artifact
    artifact_format: str = ""
    stored_bytes: int = 0  # the download's bytes; for an hf folder (a zip), the sum of its files' sizes


# model key -> (group for --only, what the table calls it, batch size)
MODELS: dict[str, tuple[str, str, int]] = {
    "digits-onnx": ("digits", "digits CNN .onnx", 64),
    "digits-pt2": ("digits", "digits CNN .pt2", 64),
    "minilm": ("minilm", "MiniLM-L6 .onnx", 32),
    "hf": ("hf", "BERT classifier (hf)", 32),
}


def rows() -> list[Row]:
    digits = [
        Row("digits-onnx", "magnitude 0.9 + squeeze 8 bit", [MAG90, SQUEEZE8], DEEP_COMPRESSION),
        Row(
            "digits-onnx",
            "structured 0.5",
            [{"op": "prune", "method": "structured", "sparsity": 0.5}],
            "issue's CNN: 290 -> 76 KB (3.8x)",
        ),
        Row("digits-onnx", "int8_static (ORT QDQ)", [{"op": "quantize", "method": "int8_static"}]),
        Row(
            "digits-pt2",
            "magnitude 0.9 + distill 10 ep",
            [MAG90, DISTILL10],
            "Han 2015: LeNets 12x fewer weights, no loss",
            train=True,
        ),
        Row(
            "digits-pt2",
            "magnitude 0.9 + distill 10 ep + onnx + squeeze 8 bit",
            [MAG90, DISTILL10, CONVERT, SQUEEZE8],
            DEEP_COMPRESSION,
            train=True,
        ),
        Row(  # Deep Compression's pipeline: iterative pruning with retraining, then 4-bit values and coding
            "digits-pt2",
            "magnitude 0.5/0.8/0.9/0.93/0.95/0.96 each + labels 20 ep; onnx; squeeze 4 bit, float16 biases",
            [
                *(
                    step
                    for sparsity in (0.5, 0.8, 0.9, 0.93, 0.95, 0.96)
                    for step in ({**MAG90, "sparsity": sparsity}, LABELS20)
                ),
                CONVERT,
                {**SQUEEZE8, "value_bits": 4, "float_tensors": "float16"},
            ],
            DEEP_COMPRESSION,
            train=True,
        ),
        Row("digits-pt2", "gradient 0.8", [{"op": "prune", "method": "gradient", "sparsity": 0.8}], train=True),
        Row("digits-pt2", "int8_weight_only", [{"op": "quantize", "method": "int8_weight_only"}]),
    ]
    minilm = [
        Row(
            "minilm",
            "int8_dynamic (ORT)",
            [{"op": "quantize", "method": "int8_dynamic"}],
            "issue: >= 3.9x, cos >= 0.99",
        ),
        Row(
            "minilm",
            "int8_weight_only + embeddings",
            [{"op": "quantize", "method": "int8_weight_only", "include": EMB}],
            "issue: >= 3.9x, cos >= 0.99",
        ),
        Row(
            "minilm",
            "int4_weight_only g32 + embeddings",
            [{"op": "quantize", "method": "int4_weight_only", "include": EMB}],
        ),
        Row(
            "minilm",
            "magnitude 2:4",
            [{"op": "prune", "method": "magnitude", "pattern": "2:4"}],
            WANDA_README + "54.59 (magnitude 2:4)",
        ),
        Row(
            "minilm",
            "wanda 0.5",
            [{"op": "prune", "method": "wanda", "sparsity": 0.5}],
            WANDA_README + "6.42 (magnitude: 14.89)",
        ),
    ]
    hf = [
        Row("hf", "int8_weight_only (torchao)", [{"op": "quantize", "method": "int8_weight_only"}]),
        Row("hf", "magnitude 0.5", [{"op": "prune", "method": "magnitude", "sparsity": 0.5}]),
        Row("hf", "onnx + int8_dynamic (ORT)", [CONVERT, {"op": "quantize", "method": "int8_dynamic"}]),
    ]
    return digits + minilm + hf


def uploads(model: str) -> tuple[tuple[str, bytes], tuple[str, bytes], tuple[str, bytes] | None]:
    """(model file, dataset file, train dataset file or None) as a user uploads them."""
    if model.startswith("digits"):
        from tests.support.models import digits_arrays, digits_npz_bytes, digits_onnx_bytes, digits_pt2_bytes

        x_train, y_train, _, _ = digits_arrays()
        buf = io.BytesIO()
        np.savez(buf, input=x_train, labels=y_train)
        if model == "digits-onnx":
            return ("digits.onnx", digits_onnx_bytes()), ("held-out.npz", digits_npz_bytes()), None
        return ("digits.pt2", digits_pt2_bytes()), ("held-out.npz", digits_npz_bytes()), ("train.npz", buf.getvalue())
    if model == "minilm":
        from tests.support.minilm import minilm_npz_bytes, minilm_onnx_path

        return ("minilm.onnx", minilm_onnx_path().read_bytes()), ("sentences.npz", minilm_npz_bytes()), None
    from tests.support.hf_models import classifier_zip_bytes, digits_jsonl_bytes

    return ("digits-bert.zip", classifier_zip_bytes()), ("held-out.jsonl", digits_jsonl_bytes()), None


class PlainCheck:
    """Scores a downloaded artifact with the ordinary runtime only (no code of the service's)."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self._minilm_reference: np.ndarray | None = None

    def __call__(self, model: str, fmt: str, body: bytes) -> float:
        batch = MODELS[model][2]
        if model == "hf":
            return hf_plain_accuracy(body, fmt, self.work, batch)
        if fmt == "squeeze":
            from squeeze.loader import load_onnx

            body, fmt = load_onnx(body).SerializeToString(), "onnx"
        if model == "minilm":
            from tests.support.minilm import minilm_arrays, minilm_onnx_path

            feeds = minilm_arrays()
            if self._minilm_reference is None:
                self._minilm_reference = ort_logits(minilm_onnx_path(), feeds, batch)
            return mean_pooled_cosine(self._minilm_reference, ort_logits(body, feeds, batch), feeds["attention_mask"])
        from tests.support.models import digits_arrays

        _, _, x, y = digits_arrays()
        if fmt == "onnx":
            logits = ort_logits(body, {"input": x}, batch)
        else:  # pt2: plain torch.export.load, the whole held-out set at once
            import torch

            path = self.work / f"artifact-{time.monotonic_ns()}.pt2"
            path.write_bytes(body)
            with torch.no_grad():
                logits = torch.export.load(str(path)).module()(torch.from_numpy(x)).numpy()
        return float((logits.argmax(1) == y).mean())


def short_runtime(runtime: str) -> str:
    """'onnxruntime 1.32.0 CPUExecutionProvider (decoded from squeeze)' -> 'ORT (.sqz)'; 'torch 2.13.0 …' -> 'torch'"""
    name = "ORT" if runtime.startswith("onnxruntime") else runtime.split(" ")[0]
    return name + (" (.sqz)" if "squeeze" in runtime else "")


def stored_bytes(fmt: str, body: bytes) -> int:
    """What a job's ``size_bytes`` counts: the file as downloaded; for an hf folder, its files (the download is the
    folder zipped, whose headers the job does not count)."""
    if fmt != "hf":
        return len(body)
    import zipfile

    with zipfile.ZipFile(io.BytesIO(body)) as zf:
        return sum(info.file_size for info in zf.infolist() if not info.is_dir())


def run_rows(d: Deployment, todo: list[Row], args: argparse.Namespace, work: Path) -> list[Outcome]:
    outcomes = [Outcome(row) for row in todo]
    plain = PlainCheck(work)
    with d.client(d.new_key("quality")) as client:
        ids: dict[str, dict[str, str]] = {}
        for model in dict.fromkeys(r.model for r in todo):
            (mname, mbytes), (dname, dbytes), train = uploads(model)
            t = time.perf_counter()
            ids[model] = {
                "model_id": client.post("/v1/models", files={"file": (mname, mbytes)}).raise_for_status().json()["id"],
                "dataset_id": client.post("/v1/datasets", files={"file": (dname, dbytes)})
                .raise_for_status()
                .json()["id"],
            }
            if train is not None:
                r = client.post("/v1/datasets", files={"file": train}).raise_for_status()
                ids[model]["train_dataset_id"] = r.json()["id"]
            sizes = f"{len(mbytes):,} + {len(dbytes):,}" + (f" + train {len(train[1]):,}" if train else "")
            print(f"upload  : {MODELS[model][1]}: {sizes} bytes in {time.perf_counter() - t:.1f} s")
        sys.stdout.flush()
        for round_ in range(1, args.repeat + 1):
            for out in outcomes:
                row = out.row
                spec: dict[str, Any] = {
                    "model_id": ids[row.model]["model_id"],
                    "dataset_id": ids[row.model]["dataset_id"],
                    "steps": row.steps,
                    "cache": False,
                    "evaluation": {
                        "batch_size": MODELS[row.model][2],
                        "warmup_runs": 3,
                        "latency_runs": args.latency_runs,
                        "layer_sensitivity": "off",
                    },
                }
                if row.train:
                    spec["train_dataset_id"] = ids[row.model]["train_dataset_id"]
                t = time.perf_counter()
                r = client.post("/v1/jobs", json=spec)
                if r.status_code != 202:
                    raise RuntimeError(f"{row.recipe}: POST /v1/jobs answered {r.status_code}: {r.text[:2000]}")
                job = wait_job(client, r.json()["id"], timeout=args.timeout)
                job["seconds"] = time.perf_counter() - t
                if job["status"] != "succeeded":
                    raise RuntimeError(f"{row.recipe}: the job ended {job['status']}: {job['error']}")
                out.jobs.append(job)
                if round_ == 1:
                    art = next(a for a in job["artifacts"] if a["kind"] == "model")
                    body = client.get(f"/v1/artifacts/{art['id']}/download").raise_for_status().content
                    out.artifact_format, out.stored_bytes = art["format"], stored_bytes(art["format"], body)
                    out.plain = plain(row.model, art["format"], body)
                print(
                    f"  round {round_}: {MODELS[row.model][1]} {row.recipe} ({job['seconds']:.1f} s)", file=sys.stderr
                )
    return outcomes


def figures(out: Outcome) -> dict[str, Any]:
    """What the table shows for one row: sizes and quality from the first job (every round must agree, checked),
    latencies as medians over the rounds."""
    first = out.jobs[0]
    base, res = first["metrics"]["baseline"], first["metrics"]["result"]
    cosine = out.row.model == "minilm"
    metric = "cosine" if cosine else "accuracy"
    p50 = [
        (j["metrics"]["baseline"]["latency_ms"]["p50"], j["metrics"]["result"]["latency_ms"]["p50"]) for j in out.jobs
    ]
    return {
        "base_bytes": base["size_bytes"],
        "res_bytes": res["size_bytes"],
        "ratio": base["size_bytes"] / res["size_bytes"],
        "q_base": 1.0 if cosine else base["accuracy"],
        "q_res": res[metric],
        "pp": None if cosine else 100 * (res["accuracy"] - base["accuracy"]),
        "p50_base": statistics.median(b for b, _ in p50),
        "p50_res": statistics.median(a for _, a in p50),
        "latency_x": statistics.median(a / b for b, a in p50),
        "runtime": f"{short_runtime(base['runtime'])} -> {short_runtime(res['runtime'])}",
        "threads": res["latency_ms"].get("threads"),
        "sparsity": res.get("sparsity"),
        "seconds": statistics.median(j["seconds"] for j in out.jobs),
        "steps": first["report"]["steps"],
        "p50_rounds": p50,
    }


def check_targets(outcomes: list[Outcome], targets: Targets) -> dict[tuple[str, str], str]:
    """Every check into ``targets``; returns the verdict shown in the table per recipe (where a target applies)."""
    verdicts: dict[tuple[str, str], list[bool]] = {}

    def check(out: Outcome, what: str, value: str, wanted: str, ok: bool, verdict: bool = True) -> None:
        targets.check(f"{MODELS[out.row.model][1]} {out.row.recipe}: {what}", value, wanted, ok)
        if verdict:
            verdicts.setdefault((out.row.model, out.row.recipe), []).append(ok)

    for out in outcomes:
        f = figures(out)
        if out.row.model == "minilm":
            check(out, "sentence cosine (bare ORT)", f"{out.plain:.4f}", "report", True, verdict=False)
        else:
            check(out, "plain runtime accuracy", f"{out.plain:.4f} vs {f['q_res']:.4f}", "= job's",
                  abs(out.plain - f["q_res"]) < 1e-9, verdict=False)  # fmt: skip
        check(out, "downloaded bytes", f"{out.stored_bytes:,}", "= size_bytes",
              out.stored_bytes == f["res_bytes"], verdict=False)  # fmt: skip
        if len(out.jobs) > 1:
            same = {(j["metrics"]["result"]["size_bytes"], j["metrics"]["result"].get("accuracy")) for j in out.jobs}
            check(out, "rounds agree", f"{len(same)} distinct", "1", len(same) == 1, verdict=False)
        deep = out.row.anchor == DEEP_COMPRESSION
        if deep:
            check(out, "x smaller", f"{f['ratio']:.1f}x", ">= 40x", f["ratio"] >= 40)
            check(out, "accuracy loss", f"{-f['pp']:.1f} pp", "<= 0.5 pp", -f["pp"] <= 0.5)
        if deep and out.row.model == "digits-pt2":
            # The job's baseline is the .pt2 (a larger container than .onnx); against the same CNN's fp32 .onnx:
            from tests.support.models import digits_onnx_bytes

            onnx_ratio = len(digits_onnx_bytes()) / f["res_bytes"]
            check(out, "x smaller than the fp32 .onnx", f"{onnx_ratio:.1f}x", ">= 40x", onnx_ratio >= 40)
        if out.row.recipe == "structured 0.5":
            check(out, "x smaller", f"{f['ratio']:.2f}x", ">= 3.5x", f["ratio"] >= 3.5)
            check(out, "p50 after/before", f"{f['latency_x']:.2f}", "< 1", f["latency_x"] < 1)
        if out.row.model == "digits-pt2" and out.row.recipe == "magnitude 0.9 + distill 10 ep":
            tuned = f["steps"][1]["details"]
            check(out, "recovers vs pruned (held-out)", f"{tuned['accuracy_before']:.4f} -> {f['q_res']:.4f}",
                  ">= +0.15", f["q_res"] >= tuned["accuracy_before"] + 0.15)  # fmt: skip
            check(out, "zeros kept", f"{tuned['sparsity_before']} -> {tuned['sparsity_after']}", "equal",
                  tuned["sparsity_before"] == tuned["sparsity_after"])  # fmt: skip
        if out.row.model == "digits-pt2" and out.row.recipe == "int8_weight_only":
            check(out, "accuracy loss", f"{-f['pp']:.2f} pp", "<= 0.5 pp", -f["pp"] <= 0.5)
        if out.row.model == "minilm" and out.row.anchor.startswith("issue"):
            check(out, "x smaller", f"{f['ratio']:.3f}x", ">= 3.9x", f["ratio"] >= 3.9)
            check(out, "job cosine", f"{f['q_res']:.4f}", ">= 0.99", f["q_res"] >= 0.99)
            check(out, "sentence cosine", f"{out.plain:.4f}", ">= 0.99", out.plain >= 0.99)
    return {key: "PASS" if all(oks) else "MISS" for key, oks in verdicts.items()}


def print_results(outcomes: list[Outcome], verdicts: dict[tuple[str, str], str]) -> None:
    table = []
    for out in outcomes:
        f = figures(out)
        cosine = out.row.model == "minilm"
        table.append(
            [
                MODELS[out.row.model][1],
                out.row.recipe,
                f"{f['base_bytes']:,} -> {f['res_bytes']:,}",
                f"{f['ratio']:.2f}x" if f["ratio"] < 10 else f"{f['ratio']:.1f}x",
                ("cos " if cosine else "") + f"{f['q_base']:.4f} -> {f['q_res']:.4f}",
                "-" if f["pp"] is None else f"{f['pp']:+.1f}",
                f"{out.plain:.4f}" if cosine else "=" if abs(out.plain - f["q_res"]) < 1e-9 else f"{out.plain:.4f}",
                f"{f['p50_base']:.2f} -> {f['p50_res']:.2f}",
                f"{f['latency_x']:.2f}",
                f"{f['runtime']}, {f['threads']:.0f} thr",
                out.row.anchor,
                verdicts.get((out.row.model, out.row.recipe), "-"),
            ]
        )
    print()
    print(
        "size: bytes as stored (the job's size_bytes; .pt2 / .onnx / .sqz / the hf folder's files); quality: accuracy "
        "on the held-out set, or for MiniLM the job's cosine to the original's outputs (token states, padding left "
        "out); pp: accuracy change in points; plain: the downloaded artifact scored here with the plain runtime "
        "('=': the job's accuracy exactly; MiniLM: sentence-embedding cosine, mean-pooled, bare ORT); p50 ms: one "
        "batch, baseline -> result, from the job's metrics, in the runtimes named (medians over rounds); latency x: "
        "result/baseline p50 (< 1 is faster)"
    )
    print_table(
        [
            "model",
            "recipe",
            "bytes before -> after",
            "x smaller",
            "quality before -> after",
            "pp",
            "plain",
            "p50 ms",
            "latency x",
            "runtime",
            "anchor",
            "verdict",
        ],
        table,
    )
    print()
    print(
        "per job: sparsity of the result, seconds from POST to succeeded (median over rounds), p50 of each round "
        "(baseline -> result), step notes"
    )
    for out in outcomes:
        f = figures(out)
        extra = ""
        for step in f["steps"]:
            d = step["details"]
            if "accuracy_after" in d and "accuracy_before" in d:
                before, after = d["accuracy_before"], d["accuracy_after"]
                extra += f"; {step['op']}/{step['method']} (held-out) {before:.4f} -> {after:.4f}"
            if "bound_ratio" in d:
                extra += f"; squeeze: {d.get('encoded_bytes'):,} B, {d['bound_ratio']:.3f}x its entropy bound"
        sparsity = "-" if f["sparsity"] is None else f"{f['sparsity']:.3f}"
        rounds = ", ".join(f"{b:.2f} -> {a:.2f}" for b, a in f["p50_rounds"])
        print(
            f"  {MODELS[out.row.model][1]} {out.row.recipe}: sparsity {sparsity}, {f['seconds']:.1f} s; "
            f"p50 ms per round {rounds}{extra}"
        )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", choices=["digits", "minilm", "hf"], help="run one part of the table")
    ap.add_argument("--repeat", type=int, default=2, help="rounds of all rows (latencies: medians; default 2)")
    ap.add_argument("--latency-runs", type=int, default=20, help="timed runs per latency measurement (default 20)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds to wait for one job (default 900)")
    add_common_args(ap)
    args = ap.parse_args()
    header("quality: one table through the service", wait_quiet_s=args.wait_quiet)
    todo = [r for r in rows() if args.only in (None, MODELS[r.model][0])]
    t0 = time.perf_counter()
    with Deployment("quality", pg=True, redis=True) as d, tempfile.TemporaryDirectory() as tmp:
        d.start_api()
        d.start_worker(concurrency=1)
        outcomes = run_rows(d, todo, args, Path(tmp))
    targets = Targets(enabled=not args.no_check)
    verdicts = check_targets(outcomes, targets)
    print_results(outcomes, verdicts)
    print(f"\nwall    : {time.perf_counter() - t0:.0f} s (start-up, uploads, {len(todo) * args.repeat} jobs, checks)")
    return targets.finish()


if __name__ == "__main__":
    sys.exit(main())
