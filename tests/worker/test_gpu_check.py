"""bench/gpu_check.sh, the CUDA readiness check, run here in its CPU mode so that the script cannot rot.

This machine has no GPU: the run exercises the same driver (cases, pipeline, judging, table) with device cpu and
must say that nothing was verified on CUDA. The full CUDA run is `bash bench/gpu_check.sh` on a GPU machine.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from tests.support.models import ROOT, digits_onnx_bytes, digits_torchscript_bytes


def test_gpu_check_dry_run_runs_the_driver_and_says_nothing_was_verified(tmp_path: Path) -> None:
    digits_onnx_bytes(), digits_torchscript_bytes("traced")  # trained and cached here, not inside the timed run
    report = tmp_path / "gpu_check.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        ["bash", "bench/gpu_check.sh", "--dry-run", "--quick", "--hidden", "128", "--layers", "2", "--json", report],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "no CUDA device: CUDA paths NOT verified" in done.stdout
    assert "== environment" in done.stdout and "ort_providers" in done.stdout

    figures = json.loads(report.read_text())
    assert figures["device"] == "cpu"
    outcomes = {o["case"]: o for o in figures["outcomes"]}
    assert set(outcomes) >= {"onnx magnitude 0.5", "torchscript fp16", "mlp dense fp16", "mlp 2:4 + fp16"}
    for name, o in outcomes.items():
        assert o["status"] == "PASS", (name, o["reasons"])
        assert o["device"] == "cpu" and o["kernels"] is None  # a CPU run never touches the CUDA kernel swap
        assert o["p50_ms"] > 0 and o["cosine"] > 0.5
    assert outcomes["mlp 2:4 + fp16"]["size_bytes"] < outcomes["mlp 2:4 + fp16"]["baseline_size_bytes"]
    assert outcomes["onnx magnitude 0.5"]["accuracy"] > 0.9


def test_every_claimed_cuda_path_has_a_case() -> None:
    """A method newly listed for cuda in the capabilities must get a case in the check (else the check fails)."""
    import sys

    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(ROOT / "bench"))
    assert gpu_check.check_coverage(gpu_check.CASES) == []
    claimed = gpu_check.claimed_cuda_paths()
    assert ("pt2", "prune", "magnitude") in claimed and ("pt2", "quantize", "int8_dynamic") not in claimed
    extra = gpu_check.Case("only fp16", "onnx", "digits", (("quantize/fp16", {}),), 0.99)
    assert "pt2:prune/gradient" in gpu_check.check_coverage((extra,))
