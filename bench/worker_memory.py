"""Worker memory over many jobs: 50 small ONNX jobs in a row on one `squeeze worker --concurrency 1`.

    .venv/bin/python bench/worker_memory.py                  # 50 jobs, ~2-4 minutes
    .venv/bin/python bench/worker_memory.py --jobs 12 --max-tasks-per-child 5   # quicker

What runs: `squeeze serve --no-worker` and `squeeze worker --concurrency 1` on a fresh PostgreSQL database
(squeeze_bench_<random>, dropped at the end) with Redis as the broker, with SQUEEZE_WORKER_MAX_TASKS_PER_CHILD
set to `--max-tasks-per-child` (default 20, the setting's default). The digits CNN (ONNX) and its held-out data
are uploaded once; then `--jobs` jobs are submitted one at a time, each waited for before the next: alternately
int8_dynamic, fp16 and 50% magnitude pruning, all with `"cache": false` (so each really runs) and a small
evaluation.

The worker's process tree: the Celery parent (the pid `squeeze worker` runs as; it consumes the queue and
never runs a job), its prefork pool child (runs the task) and, per job, the pipeline's confined child (started by
the pool child). Before the first job and after each job (once the parent has exactly one live child again) are
read from /proc: the parent's VmRSS, the pool child's pid and VmRSS (children via `pgrep -P`), and whether
libtorch or a CUDA library is mapped in the parent (/proc/<pid>/maps).

Reported: the parent's and the pool child's RSS (first / last / max, MiB); which pid ran each job and how many
jobs each pool child ran; torch/CUDA in the parent.

Targets: every job succeeded; parent RSS growth (last - first) <= 64 MiB; no libtorch or CUDA library mapped in
the parent, ever; the pool child is replaced after exactly `--max-tasks-per-child` jobs each time.
Exit status 1 if one is missed (--no-check: 0). Needs PostgreSQL at 127.0.0.1:5432 and Redis at 127.0.0.1:6379.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path

import httpx
from _common import ROOT, Deployment, Targets, add_common_args, header, print_table, wait_for, wait_job

KiB_PER_MiB = 1024
TORCH_MARKERS = ("libtorch", "libc10")
CUDA_MARKERS = ("libcuda.so", "libcudart", "libnvidia")
STEPS = (
    [{"op": "quantize", "method": "int8_dynamic"}],
    [{"op": "quantize", "method": "fp16"}],
    [{"op": "prune", "method": "magnitude", "sparsity": 0.5}],
)


@dataclass
class Sample:
    after_job: int  # 0: before the first job
    parent_kib: int
    child_pid: int
    child_kib: int
    torch_in_parent: bool
    cuda_in_parent: bool
    seconds: float  # the job's wall time (0 for the first sample)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def children(pid: int) -> list[int]:
    """Live children (pgrep -P also lists a recycled child that is not yet reaped: a zombie, without memory)."""
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True, check=False).stdout
    return sorted(int(p) for p in out.split() if not is_zombie(int(p)))


def is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (FileNotFoundError, IndexError):
        return True  # already gone


def mapped(pid: int, markers: tuple[str, ...]) -> bool:
    maps = Path(f"/proc/{pid}/maps").read_text()
    return any(m in maps for m in markers)


def settled_child(parent: int, timeout: float = 30) -> int:
    """The parent's one pool child, once the set of children has been one stable pid for 0.3 s."""
    state: dict[str, object] = {"pids": None, "since": 0.0}

    def stable() -> int | None:
        pids = children(parent)
        if pids != state["pids"]:
            state["pids"], state["since"] = pids, time.monotonic()
            return None
        if len(pids) == 1 and time.monotonic() - float(state["since"]) >= 0.3:  # type: ignore[arg-type]
            return pids[0]
        return None

    return wait_for(stable, timeout=timeout, interval=0.05, what="one settled pool child")


def sample(parent: int, after_job: int, seconds: float) -> Sample:
    child = settled_child(parent)
    return Sample(
        after_job,
        rss_kib(parent),
        child,
        rss_kib(child),
        mapped(parent, TORCH_MARKERS),
        mapped(parent, CUDA_MARKERS),
        seconds,
    )


def last_tracebacks(log: str, n: int = 2) -> list[str]:
    """The ends of the last ``n`` tracebacks in a JSON log (for a failure's cause)."""
    found = []
    for line in log.splitlines():
        if '"exc_info"' in line:
            try:
                found.append(" | ".join(json.loads(line)["exc_info"].strip().splitlines()[-3:]))
            except (ValueError, KeyError):
                continue
    return found[-n:]


def mib(kib: float) -> float:
    return kib / KiB_PER_MiB


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=50, help="jobs in a row (default 50)")
    ap.add_argument("--max-tasks-per-child", type=int, default=20, help="SQUEEZE_WORKER_MAX_TASKS_PER_CHILD (20)")
    ap.add_argument("--max-growth-mib", type=float, default=64, help="allowed parent RSS growth, MiB (64)")
    ap.add_argument("--max-seconds", type=float, default=900, help="bound on the whole series of jobs (900)")
    add_common_args(ap)
    args = ap.parse_args()
    header("worker memory over many jobs", wait_quiet_s=args.wait_quiet)
    checks = Targets(enabled=not args.no_check)

    sys.path.insert(0, str(ROOT))
    from tests.support.models import digits_npz_bytes, digits_onnx_bytes

    samples: list[Sample] = []
    failed: list[str] = []
    with Deployment("worker-memory", pg=True, redis=True) as d:
        d.procs.env["SQUEEZE_WORKER_MAX_TASKS_PER_CHILD"] = str(args.max_tasks_per_child)
        d.start_api()
        parent = d.start_worker(concurrency=1).pid
        key = d.new_key()
        deadline = time.monotonic() + args.max_seconds
        with d.client(key) as c:
            model = c.post("/v1/models", files={"file": digits_onnx_bytes()}).raise_for_status().json()["id"]
            data = c.post("/v1/datasets", files={"file": digits_npz_bytes()}).raise_for_status().json()["id"]
            samples.append(sample(parent, 0, 0.0))
            for i in range(1, args.jobs + 1):
                spec = {
                    "model_id": model,
                    "dataset_id": data,
                    "steps": STEPS[(i - 1) % len(STEPS)],
                    "evaluation": {"batch_size": 64, "max_samples": 256, "latency_runs": 3, "warmup_runs": 1},
                    "cache": False,
                }
                t0 = time.monotonic()
                left = deadline - time.monotonic()
                if left <= 0:
                    failed.append(f"stopped before job {i}: --max-seconds {args.max_seconds:g} spent")
                    break
                try:
                    job = c.post("/v1/jobs", json=spec).raise_for_status().json()
                    done = wait_job(c, job["id"], timeout=min(left, 180))
                except (httpx.HTTPError, TimeoutError) as exc:
                    failed.append(f"job {i}: {type(exc).__name__}: {exc}")
                    failed += [f"API: {line}" for line in last_tracebacks(d.procs.log("api"))]
                    break
                if done["status"] != "succeeded":
                    failed.append(f"job {i} ({job['id']}): {done['status']} {done.get('error')}")
                samples.append(sample(parent, i, time.monotonic() - t0))
                s = samples[-1]
                print(
                    f"  job {i:3d}  {s.seconds:5.1f} s   ran in {samples[-2].child_pid}   then: parent "
                    f"{mib(s.parent_kib):6.1f} MiB, pool child {s.child_pid} {mib(s.child_kib):6.1f} MiB",
                    flush=True,
                )
        child_torch = mapped(samples[-1].child_pid, TORCH_MARKERS)

    # -- report ------------------------------------------------------------------------------------------------
    jobs_run = samples[1:]
    parent_kib = [s.parent_kib for s in samples]
    # Job i ran in the pool child sampled just before it (after job i-1): its RSS there is what the child had
    # accumulated from its earlier jobs. (After a child's last job it is gone: recycled.)
    took = samples[: len(jobs_run)]
    print()
    print_table(
        ["RSS, MiB", "first", "last", "max", "growth"],
        [
            (
                "parent (before job 1 -> after the last)",
                mib(parent_kib[0]),
                mib(parent_kib[-1]),
                mib(max(parent_kib)),
                mib(parent_kib[-1] - parent_kib[0]),
            ),
            (
                "pool child (taking job 1 -> taking the last)",
                mib(took[0].child_kib) if took else None,
                mib(took[-1].child_kib) if took else None,
                mib(max(s.child_kib for s in samples)),
                mib(took[-1].child_kib - took[0].child_kib) if took else None,
            ),
        ],
    )
    runs = [(pid, list(group)) for pid, group in groupby(took, key=lambda s: s.child_pid)]
    print()
    print_table(
        ["pool child pid", "jobs run", "RSS taking job 1", "taking job 2", "taking its last", "growth 2 -> last"],
        [
            (
                pid,
                len(group),
                mib(group[0].child_kib),
                mib(group[1].child_kib) if len(group) > 1 else None,
                mib(group[-1].child_kib),
                mib(group[-1].child_kib - group[1].child_kib) if len(group) > 1 else None,
            )
            for pid, group in runs
        ],
    )
    print(
        "  A fresh child's first job imports what running a job needs: a one-time step. Growth from its second\n"
        "  job to its last is what its jobs leave behind. MiB; RSS read before each job."
    )
    torch_parent = any(s.torch_in_parent for s in samples)
    cuda_parent = any(s.cuda_in_parent for s in samples)
    print()
    print(
        f"parent pid {parent}: libtorch mapped: {'yes' if torch_parent else 'no'}; "
        f"CUDA library mapped: {'yes' if cuda_parent else 'no'} (checked {len(samples)} times)"
    )
    print(f"last pool child {samples[-1].child_pid}: libtorch mapped: {'yes' if child_torch else 'no'} (informative)")
    secs = [s.seconds for s in jobs_run]
    if secs:
        print(f"job wall time: median {sorted(secs)[len(secs) // 2]:.1f} s, max {max(secs):.1f} s")
    for f in failed[:12]:
        print(f"  {f}")

    n = args.max_tasks_per_child
    counts = [len(group) for _, group in runs]
    # Every child but the last ran its full quota; the last, at most that.
    recycled_ok = (
        all(c == n for c in counts[:-1]) and bool(counts) and counts[-1] <= n and len(counts) > (args.jobs - 1) // n
    )
    growth = mib(parent_kib[-1] - parent_kib[0])
    checks.check(
        "jobs succeeded",
        f"{len(jobs_run) - len(failed)}/{args.jobs}",
        f"{args.jobs}/{args.jobs}",
        not failed and len(jobs_run) == args.jobs,
    )
    checks.check(
        "parent RSS growth", f"{growth:.1f} MiB", f"<= {args.max_growth_mib:g} MiB", growth <= args.max_growth_mib
    )
    checks.check(
        "libtorch / CUDA in the parent",
        "yes" if torch_parent or cuda_parent else "no",
        "no",
        not (torch_parent or cuda_parent),
    )
    checks.check("pool child recycled", " ".join(map(str, counts)) + " jobs per child", f"every {n} jobs", recycled_ok)
    return checks.finish()


if __name__ == "__main__":
    sys.exit(main())
