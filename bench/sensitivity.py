"""Per-layer sensitivity on MiniLM-L6: what it adds to an int8_dynamic job (ONNX), and in-memory weight swaps vs
rewritten model files (ONNX and the Hugging Face folder).

    .venv/bin/python bench/sensitivity.py            # ~2-3 minutes on 2 cores
    .venv/bin/python bench/sensitivity.py --rounds 1

What runs, in this process (the worker's own code, no service): MiniLM-L6 exported to ONNX
(tests/support/minilm.py, cached under .pytest_cache) on its 32 test sentences, as bench/minilm_int8.py uses.

- `job, sensitivity off` / `job, sensitivity auto`: ``run_pipeline`` with one ``quantize/int8_dynamic`` step and
  ``evaluation.layer_sensitivity`` off or auto (the default, which measures MiniLM's 36 Linear layers one at a
  time): what the default costs a user on top of the job itself.
- `sensitivity, weights swapped in memory` (what jobs do): one ONNX Runtime session per layer with that layer's
  weight replaced through ``SessionOptions.add_initializer`` (worker/compress/onnx_format.py, ``WeightSwapper``).
- `sensitivity, models rewritten`: the same analysis writing each one-layer variant as a model file and opening it
  (what jobs did before; still the path for ONNX on CUDA).
- `hf sensitivity, ...`: the same two paths on the package's own MiniLM folder (transformers, eager torch; 37 Linear
  layers with the pooler, emulating int8_weight_only), the live model's tensor copied in place vs a saved folder.

A warm-up job runs first, untimed. Rounds alternate the variants; medians are printed, and the per-layer values of
the two sensitivity paths are compared exactly. Targets: the values are identical (both formats); on ONNX the
in-memory path is at least 2x faster than rewriting (the Hugging Face ratio is reported, without a target).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from _common import Targets, add_common_args, header, print_table

from app.jobs.spec import EvalOptions, QuantizeInt8Dynamic, QuantizeInt8WeightOnly, Step
from tests.support.minilm import minilm_arrays, minilm_onnx_path, model_dir
from worker.compress.backend import get_backend
from worker.compress.pipeline import run_pipeline
from worker.compress.sensitivity import layer_sensitivity
from worker.compress.types import EvalData


class _Rows:
    def __init__(self, names: list[str]) -> None:
        self.layers = [{"name": n} for n in names]


def time_job(model: Path, data: EvalData, sensitivity: str, work: Path) -> float:
    options = EvalOptions(batch_size=32, warmup_runs=3, latency_runs=20, layer_sensitivity=sensitivity)  # type: ignore[arg-type]
    t = time.perf_counter()
    result = run_pipeline(
        model_path=model,
        fmt="onnx",
        steps=[QuantizeInt8Dynamic(op="quantize", method="int8_dynamic")],
        data=data,
        options=options,
        device="cpu",
        workdir=work,
    )
    elapsed = time.perf_counter() - t
    measured = result.baseline.layers is not None and any("sensitivity" in r for r in result.baseline.layers)
    assert measured == (sensitivity == "auto"), "sensitivity ran when it should not have, or the other way round"
    return elapsed


def time_sensitivity(fmt: str, model: Path, data: EvalData, swap: bool, work: Path) -> tuple[float, dict[str, float]]:
    backend = get_backend(fmt)
    if not swap:
        backend.weight_swapper = lambda path, device: None  # type: ignore[attr-defined]
    rows = _Rows(list(backend.prunable_weights(model)))  # type: ignore[attr-defined]
    options = EvalOptions(batch_size=32, layer_sensitivity="on")
    step: Step = (
        QuantizeInt8Dynamic(op="quantize", method="int8_dynamic")
        if fmt == "onnx"
        else QuantizeInt8WeightOnly(op="quantize", method="int8_weight_only")
    )
    t = time.perf_counter()
    layer_sensitivity(backend, model, [step], data, options, "cpu", rows, work)  # type: ignore[arg-type]
    return time.perf_counter() - t, {r["name"]: r["sensitivity"] for r in rows.layers}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2, help="rounds of the four variants, alternated (default 2)")
    add_common_args(ap)
    args = ap.parse_args()

    model = minilm_onnx_path()  # exported before the header, so the export is not in any timing
    data = EvalData(minilm_arrays())
    header("sensitivity: MiniLM-L6, ONNX (36 Linear layers) and Hugging Face folder (37)", wait_quiet_s=args.wait_quiet)
    print(f"data    : {data.num_samples} sentences, {next(iter(data.inputs.values())).shape[1]} tokens each\n")
    times: dict[str, list[float]] = {}
    values: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="squeeze-bench-sensitivity-") as tmp:
        work = Path(tmp)
        folder = work / "minilm-hf"
        shutil.copytree(model_dir(), folder)
        time_job(model, data, "off", work)  # warm-up, not counted: one-time imports and ONNX Runtime's first session
        for r in range(args.rounds):
            for name, run in (
                ("job, sensitivity off", lambda: time_job(model, data, "off", work)),
                ("job, sensitivity auto", lambda: time_job(model, data, "auto", work)),
                ("sensitivity, weights swapped in memory", lambda: time_sensitivity("onnx", model, data, True, work)),
                ("sensitivity, models rewritten", lambda: time_sensitivity("onnx", model, data, False, work)),
                ("hf sensitivity, weights swapped in memory", lambda: time_sensitivity("hf", folder, data, True, work)),
                ("hf sensitivity, models rewritten", lambda: time_sensitivity("hf", folder, data, False, work)),
            ):
                out = run()
                seconds, found = out if isinstance(out, tuple) else (out, None)
                times.setdefault(name, []).append(seconds)
                if found is not None:
                    values[name] = found
                print(f"round {r + 1}: {name:<43} {seconds:7.2f} s", flush=True)

    med = {k: statistics.median(v) for k, v in times.items()}
    off = med["job, sensitivity off"]
    print(f"\nmedians over {args.rounds} round(s)")
    print_table(
        ["variant", "seconds (median)", "x job without sensitivity", "x in-memory sensitivity"],
        [
            (
                k,
                v,
                v / off if k.startswith("job") else None,
                v / med[k.replace("models rewritten", "weights swapped in memory")] if "sensitivity," in k else None,
            )
            for k, v in med.items()
        ],
    )
    targets = Targets(enabled=not args.no_check)
    for prefix in ("", "hf "):
        swapped = values[f"{prefix}sensitivity, weights swapped in memory"]
        written = values[f"{prefix}sensitivity, models rewritten"]
        worst = sorted(written.items(), key=lambda kv: kv[1])[:3]
        label = prefix.strip() or "onnx"
        print(f"{label}: most sensitive layers (cosine change): {', '.join(f'{n} {v:+.6f}' for n, v in worst)}")
        same = swapped == written
        verdict = "identical" if same else "differ"
        targets.check(f"{label}: per-layer values, in memory vs rewritten", verdict, "identical", same)
    speedup = med["sensitivity, models rewritten"] / med["sensitivity, weights swapped in memory"]
    targets.check("onnx: sensitivity, rewritten / in memory", f"{speedup:.2f}x", ">= 2x", speedup >= 2)
    return targets.finish()


if __name__ == "__main__":
    raise SystemExit(main())
