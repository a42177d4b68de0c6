"""Accuracy-aware search: wall time with 1 vs 2 workers on the same search, and the model it finds vs the best
fixed recipe a person would pick.

    .venv/bin/python bench/search.py                       # digits CNN, 1-point accuracy budget (~5 min)
    .venv/bin/python bench/search.py --model minilm --trials 10   # MiniLM, cosine >= 0.99 (~15 min)

What runs: `squeeze serve --no-worker` on a fresh PostgreSQL database with Redis, then the same search twice,
each by a new user (trials are cached per user, so the second search reuses nothing): first with one
`squeeze worker --concurrency 1`, then with a second such worker added. The ratio of the two wall times is the
parallel speed-up (near 2x when trials dominate; this machine has 2 cores, and each trial's runtime also uses
threads, so expect less). "Best fixed recipe": the best of the search's own single-method trials (each
quantization alone: what a person would try first), which the search also ran.

Targets: none enforced (exit 0); the figures go to docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from _common import Deployment, add_common_args, header, print_table, wait_for


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
        return body


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", choices=("digits", "minilm"), default="digits")
    ap.add_argument("--trials", type=int, default=16, help="max_trials of the search (default 16)")
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

    results = []
    with Deployment("search", pg=True, redis=True) as d:
        d.start_api()
        d.start_worker(concurrency=1)
        results.append(("1 worker", run_search(d, spec, model_bytes, data_bytes)))
        d.procs.start("worker2", "worker", "--queues", "cpu", "--concurrency", "1")
        wait_for(lambda: "ready." in d.procs.log("worker2"), timeout=90, what="the second worker")
        results.append(("2 workers", run_search(d, spec, model_bytes, data_bytes)))

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
    speedup = results[0][1]["wall_s"] / results[1][1]["wall_s"]
    print(f"\nspeed-up with 2 workers: {speedup:.2f}x (wall time 1 worker / 2 workers)")
    for name, body in results:
        print(f"{name}: {(body['result'] or {}).get('statement')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
