"""Run a job's pipeline in a separate, confined process.

Uploaded models are parsed by native code (ONNX Runtime, torch's deserialisers) and, for torch.export programs,
PyTorch itself allows code to ride along. So the pipeline never runs in the process that holds database and
broker credentials. The Celery pool process starts ``python -m worker.sandbox`` with:

- an environment reduced to an allow-list (no ``SQUEEZE_*`` settings, no cloud credentials), its working and
  temporary folders inside the job's scratch folder;
- resource limits: address space (``sandbox_memory_mb``), CPU seconds (the job's hard limit), open files, no
  core dumps; killed with its parent (``PR_SET_PDEATHSIG``);
- no network where the OS allows it (a new, empty network namespace; silently skipped where not permitted).

It reads one JSON request on stdin, writes progress lines and one final result line as JSON on stdout. Nothing
on stdin or stdout is pickled.

This module must not import torch at import time: the Celery side imports it to call ``run_sandboxed``.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ENV_ALLOW = (
    "PATH",
    "LANG",
    "LC_ALL",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "CUDA_VISIBLE_DEVICES",
    "NVIDIA_VISIBLE_DEVICES",
    "LD_LIBRARY_PATH",
    "OPENBLAS_CORETYPE",
    "OPENBLAS_L2_SIZE",
    "PYTHONPATH",
    "VIRTUAL_ENV",
)
PR_SET_PDEATHSIG = 1
CLONE_NEWNET = 0x40000000
STDERR_TAIL = 4000
# How running out of address space shows in a child's stderr (Python, C++, the dynamic loader, libc).
OOM_SIGNS = ("MemoryError", "std::bad_alloc", "failed to map segment", "Cannot allocate memory")


class SandboxError(Exception):
    def __init__(self, code: str, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.details = code, message, details or {}


def confine(memory_bytes: int | None, cpu_seconds: int | None, isolate_network: bool, parent_pid: int) -> None:
    """Applied by the child to itself first thing, while it is single-threaded (no preexec_fn in a threaded parent)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before the line above took effect
        os._exit(1)
    if isolate_network:
        libc.unshare(CLONE_NEWNET)  # EPERM without CAP_SYS_ADMIN: then the network stays as it is
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_NOFILE, (4096, 4096))
    if memory_bytes:
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    if cpu_seconds:
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 5))


def sandbox_env(workdir: Path) -> dict[str, str]:
    """The child's whole environment: allow-listed variables only, home and temp inside the job's folder."""
    env = {k: os.environ[k] for k in ENV_ALLOW if k in os.environ}
    env.update(HOME=str(workdir), TMPDIR=str(workdir / "tmp"), PYTHONUNBUFFERED="1", PYTHONNOUSERSITE="1")
    # Hugging Face libraries: everything comes from the uploaded folder, never from the Hub.
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1")
    return env


def run_sandboxed(
    request: dict[str, Any],
    *,
    workdir: Path,
    progress: Callable[[float, str], None],
    memory_bytes: int | None,
    cpu_seconds: int | None,
    isolate_network: bool = True,
) -> dict[str, Any]:
    """Run the pipeline described by ``request`` in a confined child; return its result dictionary.

    ``progress`` is called for each progress line; if it raises (the job was cancelled, or the Celery soft time
    limit fired) the child is killed and the exception propagates.
    """
    tmp = workdir / "tmp"
    tmp.mkdir(exist_ok=True)
    env = sandbox_env(workdir)
    stderr_path = workdir / "sandbox.stderr"
    with open(stderr_path, "wb") as stderr:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "worker.sandbox",
                json.dumps(
                    {
                        "memory_bytes": memory_bytes,
                        "cpu_seconds": cpu_seconds,
                        "isolate_network": isolate_network,
                        "parent_pid": os.getpid(),
                    }
                ),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            cwd=workdir,
            env=env,
            close_fds=True,
        )
        result: dict[str, Any] | None = None
        try:
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.write(json.dumps(request).encode())
            proc.stdin.close()
            for raw in proc.stdout:
                line = json.loads(raw)
                if "progress" in line:
                    progress(float(line["progress"]), str(line["stage"]))
                else:
                    result = line
            proc.wait()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
    if result is not None and "error" in result:
        err = result["error"]
        raise SandboxError(err["code"], err["message"], err.get("details"))
    if result is None or proc.returncode != 0:
        tail = stderr_path.read_bytes()[-STDERR_TAIL:].decode("utf-8", "replace")
        if proc.returncode < 0:
            sig = signal.Signals(-proc.returncode).name
            hint = "it ran out of memory or CPU time" if sig in ("SIGKILL", "SIGXCPU", "SIGSEGV", "SIGABRT") else ""
            raise SandboxError(
                "pipeline_crashed",
                f"the compression process was killed by {sig}" + (f" ({hint})" if hint else ""),
                {"signal": sig, "stderr_tail": tail},
            )
        if any(sign in tail for sign in OOM_SIGNS):
            raise SandboxError(
                "out_of_memory",
                "the compression process ran out of memory (limit: "
                f"{(memory_bytes or 0) // 2**20} MiB); ask an admin to raise SQUEEZE_SANDBOX_MEMORY_MB",
                {"stderr_tail": tail},
            )
        raise SandboxError(
            "pipeline_crashed", f"the compression process exited with status {proc.returncode}", {"stderr_tail": tail}
        )
    return result["result"]


# ---------------------------------------------------------------------------------------------------------------
# The child side.


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj, default=str) + "\n")
    sys.stdout.flush()


def _resolve_device(requested: str, steps: list[Any], fmt: str) -> str:
    import torch

    from app.jobs.capabilities import plan_formats
    from worker.compress.types import CompressionError

    if requested == "cpu":
        return "cpu"
    if requested == "cuda":
        if not torch.cuda.is_available():
            raise CompressionError("device_unavailable", "this worker has no CUDA device")
        return "cuda"
    cuda_ok = torch.cuda.is_available() and all(
        "cuda" in (info or {}).get("devices", []) for _, info in plan_formats(fmt, steps)
    )
    return "cuda" if cuda_ok else "cpu"


def _load_data(spec: dict[str, Any] | None, model_path: Path, fmt: str, max_samples: int) -> Any:
    if spec is None:
        return None
    if fmt == "hf" and "text" in spec["mapping"]:
        # A JSONL text dataset (app.inspection.text_dataset): tokenized here by the model's own tokenizer.
        from worker.compress.hf_format import load_text_dataset

        return load_text_dataset(Path(spec["path"]), model_path, limit=max_samples)
    import numpy as np

    from worker.compress.types import EvalData

    with np.load(spec["path"], allow_pickle=False) as npz:
        inputs = {model_name: npz[array] for array, model_name in spec["mapping"].items()}
        labels = npz["labels"] if spec["has_labels"] else None
    return EvalData(inputs=inputs, labels=labels)


def child_main() -> int:
    confine(**json.loads(sys.argv[1]))
    from app.jobs.spec import JobSpec
    from worker.compress.types import CompressionError

    request = json.loads(sys.stdin.read())
    try:
        from worker.compress.pipeline import run_pipeline
        from worker.compress.types import MAX_TRAIN_SAMPLES

        spec = JobSpec.model_validate(request["spec"])
        steps = spec.effective_steps()
        device = _resolve_device(spec.device, steps, request["format"])
        model_path, fmt = Path(request["model_path"]), request["format"]
        result = run_pipeline(
            model_path=model_path,
            fmt=fmt,
            steps=steps,
            data=_load_data(request["dataset"], model_path, fmt, spec.evaluation.max_samples),
            train_data=_load_data(request.get("train_dataset"), model_path, fmt, MAX_TRAIN_SAMPLES),
            options=spec.evaluation,
            device=device,
            workdir=Path(request["workdir"]),
            progress=lambda f, s: _emit({"progress": f, "stage": s}),
        )
    except CompressionError as exc:
        _emit({"error": {"code": exc.code, "message": exc.message, "details": exc.details}})
        return 0
    except MemoryError:
        _emit({"error": {"code": "out_of_memory", "message": "the compression process ran out of memory"}})
        return 0
    _emit(
        {
            "result": {
                "device": device,
                "output_path": str(result.output_path) if result.output_path else None,
                "output_format": result.output_format,
                "baseline": result.baseline.as_dict(),
                "result": result.result.as_dict() if result.result else None,
                "steps": [
                    {"op": r.op, "method": r.method, "details": r.details, "notes": r.notes} for r in result.steps
                ],
                "notes": result.notes,
            }
        }
    )
    return 0


if __name__ == "__main__":
    sys.exit(child_main())
