"""CUDA readiness check: every method that ``app/jobs/capabilities.py`` lists for "cuda", run on the GPU.

    bash bench/gpu_check.sh                 # on a GPU machine: the CUDA paths; exit 1 if a claimed one fails
    bash bench/gpu_check.sh --dry-run       # anywhere: the same driver with device cpu; verifies nothing on CUDA
    .venv/bin/python bench/gpu_check.py --help

Each case is one job as a worker runs it, through the pure compression package (``run_pipeline``: baseline,
steps, result, all measured on the device) without API, queue or sandbox, on models built here:

- the digits CNN of the test support (``tests/support/models.py``; trained on the CPU in ~2 s, cached) as .pt2,
  ONNX and TorchScript, with the 397 held-out digits (labels, so accuracy is shown);
- an MLP of ``--layers`` Linear(H, H) + ReLU, H = 4096 on CUDA (256 in a dry run), exported as .pt2 with a
  dynamic batch, with ``--tokens`` random input rows: big enough for the 2:4 sparse and torchao int4/int8
  kernels to matter. Its dense fp16 result is the reference of the MLP's latency ratios.

Every (format, op, method) the capabilities claim for cuda must be covered by a case (else the check fails
before running anything), so a new claim cannot go unchecked. A case passes when the pipeline finished, the
result was measured on the device (torch runtime ``cuda``, ONNX Runtime ``CUDAExecutionProvider``), its cosine
to the original is above the case's floor (a broken kernel gives garbage, not a small loss), and, on CUDA, the
kernel swap the case is about was used (``metrics.kernels``). On the CPU no kernel swap may happen at all.

Latency: p50 of the pipeline's own measurement (torch on CUDA: CUDA events, inputs already on the GPU; ONNX
Runtime: wall time of ``session.run`` including host-device copies). "ratio" divides it by the job's own
baseline (the fp32 original) for digits, and by the MLP's dense fp16 result for the MLP.

Budget: the whole run stops starting cases after ``--budget`` seconds (default 420, inside the 8 minutes
``gpu_check.sh`` allows); cases not run count as failures.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

NOT_VERIFIED = "no CUDA device: CUDA paths NOT verified"


@dataclass(frozen=True)
class Case:
    name: str
    fmt: str  # the uploaded model's format
    model: str  # "digits" | "mlp"
    steps: tuple[tuple[str, dict[str, Any]], ...]  # ("op/method", fields)
    min_cosine: float  # below this the result is garbage, not a compression loss
    kernels: str | None = None  # on CUDA this kernels count must be > 0 ("semi_structured_2_4", "torchao_int4"...)
    quick: bool = False  # part of --quick (the unit test's dry run)


CASES: tuple[Case, ...] = (
    # .pt2, digits CNN
    Case("pt2 magnitude 0.5", "pt2", "digits", (("prune/magnitude", {"sparsity": 0.5}),), 0.9),
    Case("pt2 gradient 0.5", "pt2", "digits", (("prune/gradient", {"sparsity": 0.5, "samples": 128}),), 0.8),
    Case(
        "pt2 regularized 0.5",
        "pt2",
        "digits",
        (("prune/regularized", {"sparsity": 0.5, "epochs": 1}),),
        0.8,
    ),
    Case(
        "pt2 magnitude 0.8 + distill",
        "pt2",
        "digits",
        (("prune/magnitude", {"sparsity": 0.8}), ("finetune/distill", {"epochs": 1})),
        0.8,
    ),
    Case(
        "pt2 magnitude 0.8 + labels",
        "pt2",
        "digits",
        (("prune/magnitude", {"sparsity": 0.8}), ("finetune/labels", {"epochs": 1})),
        0.8,
    ),
    Case("pt2 fp16", "pt2", "digits", (("quantize/fp16", {}),), 0.999),
    Case("pt2 bf16", "pt2", "digits", (("quantize/bf16", {}),), 0.99),
    Case("pt2 int8 weight-only", "pt2", "digits", (("quantize/int8_weight_only", {}),), 0.99),
    Case("pt2 int4 weight-only g32", "pt2", "digits", (("quantize/int4_weight_only", {}),), 0.95),
    Case("pt2 -> onnx", "pt2", "digits", (("convert/onnx", {}),), 0.999),
    # ONNX, digits CNN
    Case("onnx magnitude 0.5", "onnx", "digits", (("prune/magnitude", {"sparsity": 0.5}),), 0.9, quick=True),
    Case("onnx structured 0.25", "onnx", "digits", (("prune/structured", {"sparsity": 0.25}),), 0.8),
    Case("onnx wanda 0.5", "onnx", "digits", (("prune/wanda", {"sparsity": 0.5}),), 0.9),
    Case("onnx fp16", "onnx", "digits", (("quantize/fp16", {}),), 0.999),
    Case(
        "onnx magnitude 0.5 + squeeze",
        "onnx",
        "digits",
        (("prune/magnitude", {"sparsity": 0.5}), ("encode/squeeze", {})),
        0.9,
    ),
    # TorchScript, digits CNN (traced)
    Case("torchscript magnitude 0.5", "torchscript", "digits", (("prune/magnitude", {"sparsity": 0.5}),), 0.9),
    Case("torchscript fp16", "torchscript", "digits", (("quantize/fp16", {}),), 0.999, quick=True),
    Case("torchscript bf16", "torchscript", "digits", (("quantize/bf16", {}),), 0.99),
    Case("torchscript -> onnx", "torchscript", "digits", (("convert/onnx", {}),), 0.999),
    # .pt2, MLP: the kernels. "mlp dense fp16" is the reference of the MLP's latency ratios.
    Case("mlp dense fp16", "pt2", "mlp", (("quantize/fp16", {}),), 0.999, quick=True),
    Case(
        "mlp 2:4 + fp16",
        "pt2",
        "mlp",
        (("prune/magnitude", {"pattern": "2:4"}), ("quantize/fp16", {})),
        0.5,
        kernels="semi_structured_2_4",
        quick=True,
    ),
    Case(
        "mlp int8 weight-only",
        "pt2",
        "mlp",
        (("quantize/int8_weight_only", {}),),
        0.99,
        kernels="torchao_int8",
    ),
    Case(
        "mlp int4 weight-only g128",
        "pt2",
        "mlp",
        (("quantize/int4_weight_only", {"group_size": 128}),),
        0.9,
        kernels="torchao_int4",
        quick=True,
    ),
)
MLP_REFERENCE = "mlp dense fp16"


@dataclass
class Outcome:
    case: Case
    status: str  # "PASS" | "FAIL" | "NOT RUN"
    reasons: list[str] = field(default_factory=list)
    seconds: float = 0.0
    device: str | None = None
    runtime: str | None = None
    cosine: float | None = None
    accuracy: float | None = None
    baseline_accuracy: float | None = None
    p50_ms: float | None = None
    baseline_p50_ms: float | None = None
    size_bytes: int | None = None
    baseline_size_bytes: int | None = None
    kernels: dict[str, Any] | None = None


# ----------------------------------------------------------------------------------------------------
# Environment


def environment() -> dict[str, Any]:
    """What the figures ran on: torch and its CUDA, the GPU, torchao, ONNX Runtime and its providers."""
    import numpy as np
    import onnxruntime as ort
    import torch

    try:
        import torchao

        torchao_version = torchao.__version__
    except Exception as exc:  # torchao missing: the .pt2 backend cannot load, which the cases will show
        torchao_version = f"not importable ({type(exc).__name__}: {exc})"
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "torchao": torchao_version,
        "onnxruntime": ort.__version__,
        "ort_providers": ort.get_available_providers(),
        "numpy": np.__version__,
    }
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        env |= {
            "gpu": torch.cuda.get_device_name(),
            "capability": f"sm_{major}{minor}",
            "gpu_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1),
            "cusparselt": torch.backends.cusparselt.is_available(),
            "cusparselt_version": torch.backends.cusparselt.version()
            if torch.backends.cusparselt.is_available()
            else None,
        }
    return env


# ----------------------------------------------------------------------------------------------------
# Models and data


@dataclass(frozen=True)
class Sizes:
    hidden: int
    layers: int
    tokens: int
    digits_latency_runs: int
    mlp_latency_runs: int


def _digits(fmt: str, folder: Path) -> Path:
    from tests.support.models import digits_onnx_bytes, digits_pt2_bytes, digits_torchscript_bytes

    path = folder / {"pt2": "digits.pt2", "onnx": "digits.onnx", "torchscript": "digits.pt"}[fmt]
    if not path.exists():
        payload = {"pt2": digits_pt2_bytes, "onnx": digits_onnx_bytes}.get(fmt)
        path.write_bytes(payload() if payload else digits_torchscript_bytes("traced"))
    return path


def _mlp(sizes: Sizes, folder: Path) -> Path:
    import torch

    path = folder / f"mlp-{sizes.layers}x{sizes.hidden}.pt2"
    if not path.exists():
        torch.manual_seed(0)
        layers: list[torch.nn.Module] = []
        for _ in range(sizes.layers):
            layers += [torch.nn.Linear(sizes.hidden, sizes.hidden), torch.nn.ReLU()]
        model = torch.nn.Sequential(*layers[:-1]).eval()
        batch = torch.export.Dim("batch", min=1, max=65536)
        example = torch.zeros(4, sizes.hidden)
        torch.export.save(torch.export.export(model, (example,), dynamic_shapes=({0: batch},)), str(path))
    return path


def _data(model: str, sizes: Sizes) -> Any:
    import numpy as np

    from worker.compress.types import EvalData

    if model == "digits":
        from tests.support.models import digits_arrays

        _, _, x_test, y_test = digits_arrays()
        return EvalData({"input": x_test}, y_test)
    rng = np.random.default_rng(0)
    return EvalData({"input": rng.standard_normal((sizes.tokens, sizes.hidden), dtype=np.float32)})


# ----------------------------------------------------------------------------------------------------
# Running


def claimed_cuda_paths() -> set[tuple[str, str, str]]:
    from app.jobs.capabilities import CAPABILITIES

    return {
        (fmt, op, method)
        for fmt, ops in CAPABILITIES.items()
        for op, methods in ops.items()
        for method, info in methods.items()
        if "cuda" in info["devices"]
    }


def covered_paths(case: Case) -> set[tuple[str, str, str]]:
    """(format, op, method) of each step of the case, under the format that step receives."""
    from app.jobs.capabilities import plan_formats

    steps = build_steps(case)
    return {(fmt, s.op, s.method) for s, (fmt, _) in zip(steps, plan_formats(case.fmt, steps), strict=True)}


def build_steps(case: Case) -> list[Any]:
    from app.jobs.spec import STEP_TYPES

    return [STEP_TYPES[key](method=key.split("/")[1], **fields) for key, fields in case.steps]


def run_case(case: Case, device: str, sizes: Sizes, folder: Path) -> Outcome:
    from app.jobs.spec import EvalOptions
    from worker.compress.pipeline import run_pipeline

    data = _data(case.model, sizes)
    model = _digits(case.fmt, folder) if case.model == "digits" else _mlp(sizes, folder)
    if case.model == "digits":
        options = EvalOptions(
            batch_size=64, latency_runs=sizes.digits_latency_runs, warmup_runs=3, layer_sensitivity="off"
        )
    else:
        options = EvalOptions(
            batch_size=sizes.tokens,
            max_samples=sizes.tokens,
            latency_runs=sizes.mlp_latency_runs,
            warmup_runs=5,
            layer_sensitivity="off",
        )
    workdir = Path(tempfile.mkdtemp(prefix="case-", dir=folder))
    started = time.perf_counter()
    outcome = Outcome(case, "FAIL")
    try:
        result = run_pipeline(
            model_path=model,
            fmt=case.fmt,
            steps=build_steps(case),
            data=data,
            options=options,
            device=device,
            workdir=workdir,
        )
    except Exception as exc:
        outcome.reasons.append(f"{type(exc).__name__}: {getattr(exc, 'message', exc)}"[:500])
        if not hasattr(exc, "code"):  # not a CompressionError: a bug, show where
            outcome.reasons.append(traceback.format_exc(limit=-3).strip().replace("\n", " | ")[:800])
        outcome.seconds = time.perf_counter() - started
        return outcome
    finally:
        shutil.rmtree(workdir, ignore_errors=True)  # the MLP's artifacts are hundreds of MB each
    outcome.seconds = time.perf_counter() - started
    assert result.result is not None
    res, base = result.result, result.baseline
    outcome.device, outcome.runtime, outcome.kernels = res.device, res.runtime, res.kernels
    outcome.cosine, outcome.accuracy, outcome.baseline_accuracy = res.cosine, res.accuracy, base.accuracy
    outcome.p50_ms = (res.latency_ms or {}).get("p50")
    outcome.baseline_p50_ms = (base.latency_ms or {}).get("p50")
    outcome.size_bytes, outcome.baseline_size_bytes = res.size_bytes, base.size_bytes
    outcome.reasons += judge(case, device, outcome)
    outcome.status = "FAIL" if outcome.reasons else "PASS"
    return outcome


def judge(case: Case, device: str, o: Outcome) -> list[str]:
    """Why an outcome fails (empty: it passes)."""
    reasons = []
    if o.device != device or ran_on(o.runtime) != device:
        reasons.append(f"measured on {o.device} with runtime {o.runtime!r}, not on {device}")
    if o.cosine is None or not o.cosine >= case.min_cosine:
        reasons.append(f"cosine {o.cosine} below {case.min_cosine}: broken numerics")
    if device == "cpu" and o.kernels is not None:
        reasons.append("a CPU run touched the CUDA kernel swap")
    if device == "cuda" and case.kernels is not None:
        k = o.kernels or {}
        if not k.get("used") or not k.get(case.kernels):
            reasons.append(f"{case.kernels} kernels not used: {json.dumps(k)[:400]}")
    return reasons


def ran_on(runtime: str | None) -> str | None:
    """The device a runtime string names: "torch 2.13.0 cuda (...)", "onnxruntime 1.32.0 CUDAExecutionProvider"."""
    words = f" {runtime or ''} "
    if "CUDAExecutionProvider" in words or " cuda " in words:
        return "cuda"
    if "CPUExecutionProvider" in words or " cpu " in words:
        return "cpu"
    return None


def check_coverage(cases: tuple[Case, ...]) -> list[str]:
    """Claimed CUDA paths that no case exercises (the check must grow with the claims)."""
    covered = set().union(*(covered_paths(c) for c in cases))
    return sorted(f"{f}:{op}/{m}" for f, op, m in claimed_cuda_paths() - covered)


# ----------------------------------------------------------------------------------------------------
# Reporting


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def table(outcomes: list[Outcome], device: str) -> str:
    reference = next((o for o in outcomes if o.case.name == MLP_REFERENCE and o.p50_ms), None)
    head = (
        f"{'case':<30} {'status':<7} {'ran on':<7} {'cosine':>8} {'acc':>11} {'p50 ms':>9} {'ratio':>6} "
        f"{'size KB':>16} {'kernels':<22} {'s':>5}"
    )
    lines = [head, "-" * len(head)]
    for o in outcomes:
        ran = ran_on(o.runtime) or "-"
        ratio = None
        against = reference.p50_ms if o.case.model == "mlp" and reference else o.baseline_p50_ms
        if o.p50_ms and against:
            ratio = o.p50_ms / against
        acc = "-" if o.accuracy is None else f"{o.baseline_accuracy:.3f}>{o.accuracy:.3f}"
        size = "-"
        if o.size_bytes is not None and o.baseline_size_bytes is not None:
            size = f"{o.baseline_size_bytes / 1024:.0f}>{o.size_bytes / 1024:.0f}"
        kernels = "-"
        if o.kernels is not None:
            used = [
                f"{k.split('_')[-1] if k != 'semi_structured_2_4' else '2:4'}x{o.kernels[k]}"
                for k in ("semi_structured_2_4", "torchao_int4", "torchao_int8")
                if o.kernels.get(k)
            ]
            kernels = ",".join(used) if o.kernels.get("used") else ("fallback" if o.kernels.get("fallback") else "none")
        lines.append(
            f"{o.case.name:<30} {o.status:<7} {ran:<7} {_num(o.cosine, '.5f'):>8} {acc:>11} "
            f"{_num(o.p50_ms, '.3f'):>9} {_num(ratio, '.2f'):>6} {size:>16} {kernels:<22} {o.seconds:>5.1f}"
        )
    for o in outcomes:
        for reason in o.reasons:
            lines.append(f"  {o.case.name}: {reason}")
        if o.runtime and (o.reasons or ";" in o.runtime):  # failures, and what the kernel swaps did
            lines.append(f"  {o.case.name}: runtime {o.runtime}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="run the driver with device cpu (verifies no CUDA)")
    parser.add_argument("--quick", action="store_true", help="only the cases marked quick (the unit test's run)")
    parser.add_argument("--formats", default="pt2,onnx,torchscript", help="formats to check (comma-separated)")
    parser.add_argument("--only", default="", help="cases whose name contains one of these (comma-separated)")
    parser.add_argument("--budget", type=float, default=420.0, help="seconds after which no new case starts")
    parser.add_argument("--hidden", type=int, default=None, help="MLP width (default 4096 on CUDA, 256 on CPU)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=None, help="MLP input rows (default 512 on CUDA, 64 on CPU)")
    parser.add_argument("--json", type=Path, default=None, help="also write the environment and outcomes here")
    args = parser.parse_args(argv)
    started = time.perf_counter()

    env = environment()
    print("== environment")
    for key, value in env.items():
        print(f"{key:>20}: {value}")
    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not env["cuda_available"]:
        print(f"\n{NOT_VERIFIED}: torch sees no GPU (use --dry-run to exercise the driver on the CPU)")
        return 2
    on_gpu = device == "cuda"
    sizes = Sizes(
        hidden=args.hidden or (4096 if on_gpu else 256),
        layers=args.layers,
        tokens=args.tokens or (512 if on_gpu else 64),
        digits_latency_runs=20 if on_gpu else 3,
        mlp_latency_runs=50 if on_gpu else 3,
    )

    missing = check_coverage(CASES)
    if missing:
        print(f"\nFAIL: capabilities claim cuda for paths no case checks: {', '.join(missing)}")
        return 1
    formats = {f.strip() for f in args.formats.split(",") if f.strip()}
    only = [part.strip() for part in args.only.split(",") if part.strip()]
    cases = [
        c
        for c in CASES
        if c.fmt in formats and (c.quick or not args.quick) and (not only or any(part in c.name for part in only))
    ]
    left_out = [c.name for c in CASES if c not in cases]
    print(f"\n== {len(cases)} cases on {device} (MLP: {sizes.layers} x Linear({sizes.hidden}), {sizes.tokens} rows)")

    outcomes: list[Outcome] = []
    with tempfile.TemporaryDirectory(prefix="squeeze-gpu-check-") as tmp:
        for case in cases:
            if time.perf_counter() - started > args.budget:
                outcomes.append(Outcome(case, "NOT RUN", [f"over the {args.budget:.0f} s budget"]))
                continue
            outcome = run_case(case, device, sizes, Path(tmp))
            print(f"{outcome.status:<7} {case.name} ({outcome.seconds:.1f} s)", flush=True)
            outcomes.append(outcome)

    print(f"\n== results on {device}")
    print(table(outcomes, device))
    failed = [o for o in outcomes if o.status != "PASS"]
    total = time.perf_counter() - started
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "environment": env,
                    "device": device,
                    "seconds": round(total, 1),
                    "outcomes": [
                        {k: v for k, v in o.__dict__.items() if k != "case"} | {"case": o.case.name} for o in outcomes
                    ],
                },
                indent=2,
                default=str,
            )
        )
    print()
    if left_out:
        print(f"not checked in this run (--formats/--quick/--only): {', '.join(left_out)}")
    if device == "cpu":
        verdict = "the driver ran" if not failed else f"{len(failed)} case(s) FAILED on the CPU"
        print(f"{NOT_VERIFIED} (dry run on the CPU: {len(outcomes)} cases, {verdict}, {total:.0f} s)")
    elif failed:
        print(f"FAIL: {len(failed)} of {len(outcomes)} CUDA cases failed ({total:.0f} s)")
        if not any("CUDAExecutionProvider" in p for p in env["ort_providers"]):
            print("hint: this onnxruntime has no CUDAExecutionProvider; ONNX on CUDA needs onnxruntime-gpu")
    else:
        print(f"PASS: all {len(outcomes)} CUDA cases ran on {env.get('gpu')} ({total:.0f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
