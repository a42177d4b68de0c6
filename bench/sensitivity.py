"""Per-layer sensitivity on MiniLM-L6 (ONNX): what it adds to an int8_dynamic job, and in-memory weight swaps vs
rewritten model files.

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
  (what jobs did before; still the path for other formats and for CUDA).

Rounds alternate the variants; medians are printed, and the per-layer values of the two sensitivity paths are
compared exactly. Targets: the values are identical; the in-memory path is at least 2x faster than rewriting.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from _common import Targets, add_common_args, header, print_table

from app.jobs.spec import EvalOptions, QuantizeInt8Dynamic
from tests.support.minilm import minilm_arrays, minilm_onnx_path
from worker.compress.onnx_format import OnnxBackend
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


def time_sensitivity(model: Path, data: EvalData, swap: bool, work: Path) -> tuple[float, dict[str, float]]:
    backend = OnnxBackend()
    if not swap:
        backend.weight_swapper = lambda path, device: None  # type: ignore[method-assign]
    rows = _Rows(list(backend.prunable_weights(model)))
    options = EvalOptions(batch_size=32, layer_sensitivity="on")
    t = time.perf_counter()
    layer_sensitivity(
        backend,
        model,
        [QuantizeInt8Dynamic(op="quantize", method="int8_dynamic")],
        data,
        options,
        "cpu",
        rows,  # type: ignore[arg-type]
        work,
    )
    return time.perf_counter() - t, {r["name"]: r["sensitivity"] for r in rows.layers}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2, help="rounds of the four variants, alternated (default 2)")
    add_common_args(ap)
    args = ap.parse_args()

    model = minilm_onnx_path()  # exported before the header, so the export is not in any timing
    data = EvalData(minilm_arrays())
    header("sensitivity: MiniLM-L6 ONNX, int8_dynamic, 36 Linear layers", wait_quiet_s=args.wait_quiet)
    print(f"data    : {data.num_samples} sentences, {next(iter(data.inputs.values())).shape[1]} tokens each\n")
    times: dict[str, list[float]] = {}
    values: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="squeeze-bench-sensitivity-") as tmp:
        work = Path(tmp)
        for r in range(args.rounds):
            for name, run in (
                ("job, sensitivity off", lambda: time_job(model, data, "off", work)),
                ("job, sensitivity auto", lambda: time_job(model, data, "auto", work)),
                ("sensitivity, weights swapped in memory", lambda: time_sensitivity(model, data, True, work)),
                ("sensitivity, models rewritten", lambda: time_sensitivity(model, data, False, work)),
            ):
                out = run()
                seconds, found = out if isinstance(out, tuple) else (out, None)
                times.setdefault(name, []).append(seconds)
                if found is not None:
                    values[name] = found
                print(f"round {r + 1}: {name:<40} {seconds:7.2f} s", flush=True)

    med = {k: statistics.median(v) for k, v in times.items()}
    off = med["job, sensitivity off"]
    swapped, written = med["sensitivity, weights swapped in memory"], med["sensitivity, models rewritten"]
    print(f"\nmedians over {args.rounds} round(s)")
    print_table(
        ["variant", "seconds (median)", "x job without sensitivity", "x in-memory sensitivity"],
        [
            (k, v, v / off if k.startswith("job") else None, v / swapped if k.startswith("sens") else None)
            for k, v in med.items()
        ],
    )
    same = values["sensitivity, weights swapped in memory"] == values["sensitivity, models rewritten"]
    worst = sorted(values["sensitivity, models rewritten"].items(), key=lambda kv: kv[1])[:3]
    print(f"\nmost sensitive layers (cosine change): {', '.join(f'{n} {v:+.6f}' for n, v in worst)}")

    targets = Targets(enabled=not args.no_check)
    targets.check("per-layer values, in memory vs rewritten", "identical" if same else "differ", "identical", same)
    speedup = written / swapped
    targets.check("sensitivity, rewritten / in memory", f"{speedup:.2f}x", ">= 2x", speedup >= 2)
    return targets.finish()


if __name__ == "__main__":
    raise SystemExit(main())
