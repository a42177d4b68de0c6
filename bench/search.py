"""Accuracy-aware search: wall time with 1 vs 2 workers on the same search, and the model it finds vs the best
fixed recipe a person would pick.

    .venv/bin/python bench/search.py                       # digits CNN, 1-point accuracy budget (~2 min)
    .venv/bin/python bench/search.py --model minilm --trials 8 --once   # MiniLM, cosine >= 0.99

What runs: `squeeze serve --no-worker` on a fresh PostgreSQL database with Redis, then the same search twice,
each by a new user (trials are cached per user, so the second search reuses nothing): first with one
`squeeze worker --concurrency 1`, then with a second such worker added. The ratio of the two wall times is the
parallel speed-up. Workers are meant to run on separate machines; on this one, by default
(`--cores-per-worker 1`), worker i is pinned to core i with `--threads 1`, i.e. two one-core machines, and the
API, PostgreSQL, Redis and this client share those cores (they are not counted as a machine of their own).
`--cores-per-worker 0`: no pinning, each worker's default threads. `--once`: only the 2-worker search (for
found vs fixed; no speed-up). "Best fixed recipe": the best of the search's own single-method trials (each
quantization alone: what a person would try first), which the search also ran.

After the two searches (not with --once): the workload's own capacity. --capacity-trials trials of the 1-worker
search (default 3, spread over its range of durations) run again with `cache: false`, once alone and then twice
at once, one per worker: 2 x time alone / time of the pair is what a second worker can gain on this very work on
this machine (the matmul "capacity" line measures only the cores).

Targets: none enforced (exit 0); the figures go to docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from datetime import datetime
from typing import Any

from _common import Deployment, add_common_args, header, print_table, wait_for, wait_job


def run_search(d: Deployment, spec_extra: dict[str, Any], model_bytes: bytes, data_bytes: bytes) -> dict[str, Any]:
    key = d.new_key("search")
    with d.client(key) as client:
        model = client.post("/v1/models", files={"file": ("model.onnx", model_bytes)}).raise_for_status().json()
        data = client.post("/v1/datasets", files={"file": ("data.npz", data_bytes)}).raise_for_status().json()
        started = time.perf_counter()
        r = client.post("/v1/searches", json={"model_id": model["id"], "dataset_id": data["id"], **spec_extra})
        r.raise_for_status()
        search_id = r.json()["job"]["id"]

        def done() -> dict[str, Any] | None:
            body = client.get(f"/v1/searches/{search_id}").raise_for_status().json()
            return body if body["job"]["status"] in ("succeeded", "failed", "cancelled") else None

        body = wait_for(done, timeout=7200, interval=0.5, what="the search")
        body["wall_s"] = time.perf_counter() - started
        body["key"] = key
        # Where the wall time went: each trial job's queued -> started -> finished, from the service's own clock.
        spans = []
        for t in body["trials"]:
            if t["job_id"]:
                job = client.get(f"/v1/jobs/{t['job_id']}").raise_for_status().json()
                t["error"] = job["error"]
                if job["started_at"] and job["finished_at"]:
                    spans.append(tuple(_ts(job[k]) for k in ("created_at", "started_at", "finished_at")))
                    t["spec"], t["run_s"] = job["spec"], _ts(job["finished_at"]) - _ts(job["started_at"])
        search_job = body["job"]
        t0, t1 = _ts(search_job["created_at"]), _ts(search_job["finished_at"] or search_job["created_at"])
        body["timeline"] = {
            "trial_s": sum(f - s for _, s, f in spans),
            "queue_wait_s": sum(s - c for c, s, _ in spans),
            "span_s": t1 - t0,
            "planner_gap_s": _gaps(spans, t0, t1),
        }
        return body


_SPIN = """
import os, sys, time
import numpy as np
os.sched_setaffinity(0, {int(sys.argv[1])})
a = np.random.default_rng(0).random((256, 256), dtype=np.float32)
n, t0 = 0, time.perf_counter()
while time.perf_counter() - t0 < 3.0:
    for _ in range(20):
        a = (a @ a) * 0.001 + 0.5
    n += 20
print(n / (time.perf_counter() - t0))
"""


def parallel_capacity(cores: int) -> tuple[float, list[float]]:
    """What ``cores`` one-threaded compute processes, each pinned to its core, do together vs one alone (in units
    of one process alone): the most a search on that many one-core workers can gain on this machine. 2 vCPUs of
    a VM can be two hyperthreads of one physical core, or share caches and memory bandwidth."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

    def spin(core_ids: list[int]) -> list[float]:
        procs = [
            subprocess.Popen([sys.executable, "-c", _SPIN, str(c)], stdout=subprocess.PIPE, env=env) for c in core_ids
        ]
        return [float(p.communicate()[0]) for p in procs]

    alone = spin([0])[0]
    together = spin(list(range(cores)))
    return sum(together) / alone, [alone, *together]


def workload_capacity(d: Deployment, body: dict[str, Any], picks: int) -> tuple[float, list[tuple]]:
    """What two of the search's own trials running at once on the two workers do, against one running alone.

    The matmul loops above measure the cores; this measures the work a search actually does (model loading,
    ONNX Runtime, zstd, the database writes), with the API, PostgreSQL and Redis on the same machine. ``picks``
    trials of the finished search, spread over its range of durations, are each run again (``cache: false``):
    once alone, then twice submitted together. Returns (capacity, rows): the summed time of the ones alone
    x 2 over the summed time of the pairs (1 job's time = started_at -> finished_at; a pair's = both done),
    with the pairs' overlap so a reader can see they really ran side by side."""
    trials = sorted((t for t in body["trials"] if t.get("run_s")), key=lambda t: t["run_s"])
    spread = sorted({round(i * (len(trials) - 1) / max(1, picks - 1)) for i in range(picks)}) if trials else []
    chosen = [trials[i] for i in spread]
    rows, alone_sum, pair_sum = [], 0.0, 0.0
    with d.client(body["key"]) as client:

        def run(n: int, spec: dict[str, Any]) -> list[dict[str, Any]]:
            posted = [client.post("/v1/jobs", json={**spec, "cache": False}) for _ in range(n)]
            # Times come from the jobs' own started_at / finished_at, so waiting on one after the other is exact.
            jobs = [wait_job(client, r.raise_for_status().json()["id"], timeout=3600) for r in posted]
            if any(j["status"] != "succeeded" for j in jobs):
                raise RuntimeError(f"a capacity job did not succeed: {[j['error'] for j in jobs]}")
            return jobs

        for t in chosen:
            spec = {k: v for k, v in t["spec"].items() if v is not None}
            (one,) = run(1, spec)
            alone = _ts(one["finished_at"]) - _ts(one["started_at"])
            pair = run(2, spec)
            starts = [_ts(j["started_at"]) for j in pair]
            ends = [_ts(j["finished_at"]) for j in pair]
            both = max(ends) - min(starts)
            overlap = max(0.0, min(ends) - max(starts)) / both
            alone_sum, pair_sum = alone_sum + alone, pair_sum + both
            rows.append((t["recipe"], f"{alone:.2f}", f"{both:.2f}", f"{2 * alone / both:.2f}x", f"{overlap:.2f}"))
    return (2 * alone_sum / pair_sum if pair_sum else 0.0), rows


def _ts(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def _gaps(spans: list[tuple[float, float, float]], t0: float, t1: float) -> float:
    """Seconds of the search during which no trial ran at all (planning, dispatch, process start-up)."""
    idle, edge = 0.0, t0
    for _, start, finish in sorted(spans, key=lambda x: x[1]):
        idle += max(0.0, start - edge)
        edge = max(edge, finish)
    return idle + max(0.0, t1 - edge)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", choices=("digits", "minilm"), default="digits")
    ap.add_argument("--trials", type=int, default=16, help="max_trials of the search (default 16)")
    ap.add_argument("--cores-per-worker", type=int, default=1, help="pin each worker to this many cores (0: none)")
    ap.add_argument("--once", action="store_true", help="run only the search with 2 workers")
    ap.add_argument(
        "--capacity-trials",
        type=int,
        default=3,
        help="trials of the 1-worker search rerun alone and in pairs to measure the workload's capacity (0: skip)",
    )
    add_common_args(ap)
    args = ap.parse_args()
    header(f"search: {args.model}, 1 worker then 2 workers, max_trials {args.trials}", wait_quiet_s=args.wait_quiet)

    if args.model == "digits":
        from tests.support.models import digits_npz_bytes, digits_onnx_bytes

        model_bytes, data_bytes = digits_onnx_bytes(), digits_npz_bytes()
        spec: dict[str, Any] = {"constraint": {"max_accuracy_drop": 0.01}, "objective": "size"}
    else:
        from tests.support.minilm import minilm_npz_bytes, minilm_onnx_path

        model_bytes, data_bytes = minilm_onnx_path().read_bytes(), minilm_npz_bytes()
        spec = {"constraint": {"min_cosine": 0.99}, "objective": "size"}
    spec["max_trials"] = args.trials

    c = args.cores_per_worker

    def pinning(i: int) -> dict[str, Any]:
        return {"cpus": f"{i * c}-{i * c + c - 1}", "threads": c} if c else {}

    capacity = None
    if c == 1 and not args.once:
        capacity, rates = parallel_capacity(2)
        print(
            f"capacity: 2 pinned one-thread matmul loops together do {capacity:.2f}x the work of one alone "
            f"({rates[0]:.0f} it/s alone; {rates[1]:.0f} + {rates[2]:.0f} together): the most 2 one-core workers "
            "can gain here"
        )
    results = []
    with Deployment("search", pg=True, redis=True) as d:
        d.start_api()
        d.start_worker(concurrency=1, **pinning(0))
        if not args.once:
            results.append(("1 worker", run_search(d, spec, model_bytes, data_bytes)))
        d.start_worker(concurrency=1, name="worker2", **pinning(1))
        results.append(("2 workers", run_search(d, spec, model_bytes, data_bytes)))
        workload = None
        if args.capacity_trials and not args.once:
            workload = workload_capacity(d, results[0][1], args.capacity_trials)
    print()
    print_table(
        ["run", "search s", "trials run s (sum)", "busy share", "no trial running s", "queue wait s (sum)"],
        [
            (
                name,
                f"{b['timeline']['span_s']:.1f}",
                f"{b['timeline']['trial_s']:.1f}",
                f"{b['timeline']['trial_s'] / (b['timeline']['span_s'] * (1 if name == '1 worker' else 2)):.2f}",
                f"{b['timeline']['planner_gap_s']:.1f}",
                f"{b['timeline']['queue_wait_s']:.1f}",
            )
            for name, b in results
        ],
    )
    print("  busy share: trial seconds / (workers x search seconds); from the jobs' created/started/finished times.")
    print(f"\nworkers: {f'each pinned to {c} core(s), --threads {c}' if c else 'not pinned, default threads'}")

    rows = []
    for name, body in results:
        trials = [t for t in body["trials"] if t["job_id"]]
        result = body["result"] or {}
        best = result.get("best") or {}
        singles = [t for t in trials if t["status"] == "succeeded" and t["meets_constraint"] and len(t["steps"]) == 1]
        hand = min(singles, key=lambda t: t["size_bytes"]) if singles else {}
        rows.append(
            (
                name,
                f"{body['wall_s']:.1f}",
                len(trials),
                sum(t["status"] == "skipped" for t in body["trials"]),
                best.get("recipe", "-"),
                best.get("size_bytes", "-"),
                f"{best.get('accuracy_drop') if best.get('accuracy_drop') is not None else best.get('cosine')}",
                hand.get("recipe", "-"),
                hand.get("size_bytes", "-"),
                f"{hand['size_bytes'] / best['size_bytes']:.2f}x" if hand and best else "-",
            )
        )
    print()
    print_table(
        [
            "run",
            "wall s",
            "trials",
            "skipped",
            "best found",
            "bytes",
            "acc drop / cosine",
            "best fixed recipe",
            "bytes",
            "found vs fixed",
        ],
        rows,
    )
    if len(results) == 2:
        speedup = results[0][1]["wall_s"] / results[1][1]["wall_s"]
        print(f"\nspeed-up with 2 workers: {speedup:.2f}x (wall time 1 worker / 2 workers)")
        if capacity:
            print(f"parallel efficiency: {speedup / capacity:.2f} (speed-up / this machine's capacity {capacity:.2f}x)")
        if workload and workload[0]:
            print("\nthe search's own work, alone vs two at once on the 2 workers (1-worker search's trials, rerun):")
            print_table(["trial", "alone s", "pair s (both done)", "work x", "overlap"], workload[1])
            print(
                f"workload capacity: {workload[0]:.2f}x (2 x time alone / time of the pair, summed)\n"
                f"parallel efficiency vs the workload capacity: {speedup / workload[0]:.2f}"
            )
    for name, body in results:
        print(f"{name}: {(body['result'] or {}).get('statement')}")
        for t in body["trials"]:
            why = t.get("reason") or t.get("error") or ""
            print(f"  {t['status']:<9} {t['recipe']:<48} {t.get('size_bytes') or '-':>10} {why}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
