"""Rules the code keeps on every path that may see uploaded bytes, checked on the source and on the worker."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SOURCES = [p for d in ("app", "worker") for p in (ROOT / d).rglob("*.py")]


def test_no_unsafe_deserialisation_in_service_code() -> None:
    offenders = []
    for path in SOURCES:
        text = path.read_text()
        for m in re.finditer(r"torch\.load\(([^)]*)\)", text):
            if "weights_only=True" not in m.group(1):
                offenders.append(f"{path.relative_to(ROOT)}: {m.group(0)}")
        for pattern in (
            r"\bpickle\.loads?\(",
            r"dill\.load",
            r"cloudpickle\.load",
            r"trust_remote_code\s*=\s*True",
            r"allow_pickle\s*=\s*True",
            r"register_custom_ops_library",
            r"(?<![.\w])eval\(",  # Python's eval; a module's .eval() (inference mode) is fine
            r"(?<![.\w])exec\(",
            r"builtins\.(eval|exec)\b",
        ):
            offenders += [f"{path.relative_to(ROOT)}: {pattern}" for _ in re.finditer(pattern, text)]
    assert offenders == []


def test_worker_refuses_to_start_when_weights_only_loading_is_disabled() -> None:
    env = {**os.environ, "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "app.cli", "worker"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 2
    assert "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD" in out.stderr


def test_api_and_worker_parent_never_import_torch() -> None:
    code = "import sys, app.main, app.cli, worker.tasks, worker.runner, worker.sandbox; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
