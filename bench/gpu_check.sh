#!/usr/bin/env bash
# CUDA readiness check: runs every method the capabilities list for "cuda" on this machine's GPU and prints
# their figures (bench/gpu_check.py says what each case checks). Exit status 0: every claimed CUDA path ran on
# the GPU; 1: one failed; 2: no GPU visible to torch (nothing verified).
#
#   bash bench/gpu_check.sh                 # the CUDA paths, in under 8 minutes on one H100
#   bash bench/gpu_check.sh --dry-run       # the same driver on the CPU (CI, laptops): verifies nothing on CUDA
#   bash bench/gpu_check.sh --formats pt2   # a subset; --json FILE also writes the figures
#
# Python: $PYTHON, else the project's .venv, else python3 (a CUDA build of torch, with the project installed or
# its requirements importable from the repository root).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [[ -n "${PYTHON:-}" ]]; then
  py="$PYTHON"
elif [[ -x .venv/bin/python ]]; then
  py=.venv/bin/python
else
  py=python3
fi

echo "== nvidia-smi"
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,compute_cap --format=csv || nvidia-smi || true
else
  echo "nvidia-smi: not found"
fi
echo "== python: $py"

# 8 minutes for the whole check: the driver stops starting cases at its --budget (default 420 s); this is the
# backstop for one case that hangs.
export PYTHONUNBUFFERED=1 PYTHONWARNINGS="${PYTHONWARNINGS:-ignore}"
exec timeout --kill-after=10 470 "$py" bench/gpu_check.py "$@"
