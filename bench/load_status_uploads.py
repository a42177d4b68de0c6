"""Job status under upload load: 200 clients polling GET /v1/jobs/{id} while 10 clients each upload 100 MiB.

    .venv/bin/python bench/load_status_uploads.py                                   # ~1-2 minutes
    .venv/bin/python bench/load_status_uploads.py --pollers 50 --uploads 4 --size-mb 32   # quicker

What runs: `squeeze serve --no-worker` (uvicorn in that very process) on a fresh PostgreSQL database
(squeeze_bench_<random>, dropped at the end) with Redis as the broker (a free database the run claims)
and its blob store in a temporary folder. A small model (the digits CNN) and dataset are uploaded and
`--jobs` jobs submitted; no worker runs, so they stay queued and every poll reads a live job row.

The uploads are real datasets, so that the API inspects and stores them: each file is an uncompressed `.npz`
holding one float32 array `input` of shape (N, 1, 8, 8) filled by numpy's random generator (a different seed per
file: no two alike, nothing deduplicated), N chosen for `--size-mb` MiB of array data. Half are sent as multipart
(`file` part), half as a raw `application/octet-stream` body, both streamed from disk in 1 MiB chunks.

Clients, all asyncio + httpx on 127.0.0.1:
- `--pollers` tasks in this process, each: GET /v1/jobs/{id} (the jobs in turn), then sleeps `--interval` s
  (default 1: up to 200 polls/s offered);
- the `--uploads` uploads, all started at once, in a child process with its own event loop (so that the upload
  streams do not steal this process's loop from the pollers and inflate their latencies).
Pollers run `--baseline` seconds alone first (status latency without uploads; its first 2 s, while connections
open, are not counted), then the uploads start; the "during uploads" figures cover the polls sent between the
first upload's start and the last one's end. The load phase (baseline + uploads) is bounded by `--max-seconds`;
uploads still running then are errors.

Afterwards each dataset is downloaded back (GET /v1/datasets/{id}/download, streamed and hashed) and three
sha256 compared: the file's, the one the API returned, the downloaded bytes'.

Reported: polls and their p50/p99/max latency (baseline vs during uploads), poll rate; per-upload MB/s and
the aggregate (all bytes over the upload window; MB = 10^6 bytes); errors. Client and server share the machine
(2 cores on the reference machine), so this is the service's behaviour under contention, not its capacity.

Targets: zero errors (every poll 200 with its job, every upload 201); every sha256 triple equal.
Exit status 1 if one is missed (--no-check: 0). Needs PostgreSQL at 127.0.0.1:5432 (user postgres, trust) and
Redis at 127.0.0.1:6379 (the run claims an empty database and empties only that one).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import multiprocessing as mp
import os
import random
import ssl
import sys
import time
import zipfile
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Event as MpEvent
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from _common import ROOT, Deployment, Targets, add_common_args, header, print_table

MiB = 1024**2
CHUNK = MiB
SAMPLE_BYTES = 1 * 8 * 8 * 4  # one (1, 8, 8) float32 sample


@dataclass
class UploadFile:
    path: Path
    size: int
    sha256: str
    samples: int
    multipart: bool


@dataclass
class UploadResult:
    name: str
    multipart: bool
    size: int
    t0: float = 0.0
    t1: float = 0.0
    status: int = 0
    body: dict[str, Any] = field(default_factory=dict)
    error: str = ""

    @property
    def mb_per_s(self) -> float:
        return self.size / 1e6 / (self.t1 - self.t0) if self.t1 > self.t0 else float("nan")


# -- files ------------------------------------------------------------------------------------------------------


def make_dataset(path: Path, size_mb: int, seed: int, *, multipart: bool) -> UploadFile:
    """An uncompressed .npz with one float32 (N, 1, 8, 8) array of about ``size_mb`` MiB; written in blocks."""
    samples = size_mb * MiB // SAMPLE_BYTES
    rng = np.random.default_rng(seed)
    block = 16_384  # samples per write: 1 MiB
    with (
        zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf,
        zf.open("input.npy", "w", force_zip64=True) as fp,
    ):
        header_ = {"descr": "<f4", "fortran_order": False, "shape": (samples, 1, 8, 8)}
        np.lib.format.write_array_header_1_0(fp, header_)
        for start in range(0, samples, block):
            fp.write(rng.random((min(block, samples - start), 1, 8, 8), dtype=np.float32).tobytes())
    return UploadFile(path, path.stat().st_size, sha256_file(path), samples, multipart)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 * MiB):
            h.update(chunk)
    return h.hexdigest()


async def file_chunks(path: Path, prefix: bytes = b"", suffix: bytes = b"") -> AsyncIterator[bytes]:
    if prefix:
        yield prefix
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            yield chunk
    if suffix:
        yield suffix


# -- uploads (child process) -----------------------------------------------------------------------------------


async def upload_one(client: httpx.AsyncClient, f: UploadFile) -> UploadResult:
    res = UploadResult(f.path.name, f.multipart, f.size)
    if f.multipart:
        boundary = f"squeeze-bench-{random.getrandbits(64):016x}"
        prefix = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="name"\r\n\r\n{f.path.name}\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{f.path.name}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        suffix = f"\r\n--{boundary}--\r\n".encode()
        headers = {
            "Content-Type": f"multipart/form-data; boundary={boundary}",
            "Content-Length": str(len(prefix) + f.size + len(suffix)),
        }
        kwargs: dict[str, Any] = {"content": file_chunks(f.path, prefix, suffix), "headers": headers}
    else:
        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(f.size)}
        kwargs = {"content": file_chunks(f.path), "headers": headers, "params": {"name": f.path.name}}
    res.t0 = time.monotonic()
    try:
        r = await client.post("/v1/datasets", **kwargs)
        res.status = r.status_code
        res.body = r.json()
    except (httpx.HTTPError, ValueError) as exc:
        res.error = f"{type(exc).__name__}: {exc}"
    res.t1 = time.monotonic()
    return res


async def upload_all(base_url: str, key: str, files: list[UploadFile]) -> list[UploadResult]:
    limits = httpx.Limits(max_connections=len(files))
    async with httpx.AsyncClient(
        base_url=base_url, headers={"Authorization": f"Bearer {key}"}, timeout=600, limits=limits
    ) as client:
        return list(await asyncio.gather(*(upload_one(client, f) for f in files)))


def upload_child(base_url: str, key: str, files: list[UploadFile], go: MpEvent, conn: Connection) -> None:
    go.wait()
    conn.send(asyncio.run(upload_all(base_url, key, files)))
    conn.close()


# -- polls (this process) --------------------------------------------------------------------------------------


@dataclass
class Polls:
    samples: list[tuple[float, float]] = field(default_factory=list)  # (start, latency s)
    errors: list[str] = field(default_factory=list)

    def window(self, t0: float, t1: float) -> np.ndarray:
        return np.array([lat for start, lat in self.samples if t0 <= start < t1]) * 1000


def poll_client(base_url: str, key: str, tls: ssl.SSLContext) -> httpx.AsyncClient:
    """One client per poller, with its own connection (a client shared by 200 tasks costs O(connections) per
    request in httpcore's pool). Idle connections are dropped before uvicorn's 5 s keep-alive timeout closes them,
    so that no request races a server-side close. One TLS context for all (unused on http://, but each client
    would otherwise load the CA bundle: seconds of CPU for 200)."""
    return httpx.AsyncClient(
        base_url=base_url,
        headers={"Authorization": f"Bearer {key}"},
        timeout=60,
        limits=httpx.Limits(max_connections=1, keepalive_expiry=4),
        verify=tls,
    )


async def poller(
    client: httpx.AsyncClient, job_ids: list[str], i: int, interval: float, stop: asyncio.Event, out: Polls
) -> None:
    async with client:
        await _poll(client, job_ids, i, interval, stop, out)


async def _poll(
    client: httpx.AsyncClient, job_ids: list[str], i: int, interval: float, stop: asyncio.Event, out: Polls
) -> None:
    await asyncio.sleep(random.random() * max(interval, 0.05))  # spread the first requests
    k = i
    while not stop.is_set():
        job_id = job_ids[k % len(job_ids)]
        k += 1
        t0 = time.monotonic()
        try:
            r = await client.get(f"/v1/jobs/{job_id}")
            latency = time.monotonic() - t0
            if r.status_code != 200 or r.json().get("id") != job_id:
                out.errors.append(f"poll {job_id}: {r.status_code} {r.text[:200]}")
            out.samples.append((t0, latency))
        except (httpx.HTTPError, ValueError) as exc:
            out.errors.append(f"poll {job_id}: {type(exc).__name__}: {exc}")
        if interval:
            await asyncio.sleep(interval)


async def load_phase(
    base_url: str, key: str, job_ids: list[str], args: argparse.Namespace, go: MpEvent, conn: Connection
) -> tuple[Polls, list[UploadResult] | None, float, float, float]:
    polls, stop = Polls(), asyncio.Event()
    tls = ssl.create_default_context()
    clients = [poll_client(base_url, key, tls) for _ in range(args.pollers)]
    t_begin = time.monotonic()
    tasks = [
        asyncio.create_task(poller(client, job_ids, i, args.interval, stop, polls)) for i, client in enumerate(clients)
    ]
    await asyncio.sleep(args.baseline)
    t_uploads = time.monotonic()
    go.set()
    left = args.max_seconds - (t_uploads - t_begin)
    ready = await asyncio.get_running_loop().run_in_executor(None, conn.poll, max(left, 0))
    results = conn.recv() if ready else None
    stop.set()
    await asyncio.gather(*tasks)
    return polls, results, t_begin, t_uploads, time.monotonic()


# -- main ------------------------------------------------------------------------------------------------------


def unhandled_errors(log: str) -> Counter[str]:
    """The API's unhandled exceptions (its JSON log lines with a traceback), by their last traceback line."""
    found: Counter[str] = Counter()
    for line in log.splitlines():
        if '"exc_info"' not in line or '"squeeze.api"' not in line:
            continue
        try:
            exc = json.loads(line)["exc_info"]
        except (ValueError, KeyError):
            continue
        found[exc.strip().splitlines()[-1][:200]] += 1
    return found


def pct(a: np.ndarray, q: float) -> float:
    return float(np.percentile(a, q)) if a.size else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pollers", type=int, default=200, help="concurrent status pollers (default 200)")
    ap.add_argument("--interval", type=float, default=1.0, help="each poller's pause between polls, s (1.0)")
    ap.add_argument("--uploads", type=int, default=10, help="concurrent uploads (default 10)")
    ap.add_argument("--size-mb", type=int, default=100, help="MiB of array data per uploaded file (default 100)")
    ap.add_argument("--jobs", type=int, default=10, help="queued jobs the pollers read in turn (default 10)")
    ap.add_argument("--baseline", type=float, default=10.0, help="seconds of polling before the uploads (10)")
    ap.add_argument("--max-seconds", type=float, default=60.0, help="bound on baseline + uploads (default 60)")
    add_common_args(ap)
    args = ap.parse_args()
    header("job status under concurrent 100 MiB uploads", wait_quiet_s=args.wait_quiet)
    checks = Targets(enabled=not args.no_check)

    sys.path.insert(0, str(ROOT))
    from tests.support.models import digits_npz_bytes, digits_onnx_bytes

    with Deployment("load", pg=True, redis=True) as d:
        files_dir = d.tmp / "files"
        files_dir.mkdir()
        t = time.monotonic()
        files = [
            make_dataset(files_dir / f"upload-{i:02d}.npz", args.size_mb, seed=1000 + i, multipart=i % 2 == 0)
            for i in range(args.uploads)
        ]
        print(f"files   : {len(files)} x {files[0].size / 1e6:.1f} MB .npz written in {time.monotonic() - t:.1f} s")

        d.start_api()
        key = d.new_key()
        with d.client(key) as c:
            model = c.post("/v1/models", files={"file": digits_onnx_bytes()}).raise_for_status().json()
            data = c.post("/v1/datasets", files={"file": digits_npz_bytes()}).raise_for_status().json()
            job_ids = []
            for i in range(args.jobs):
                spec = {
                    "model_id": model["id"],
                    "dataset_id": data["id"],
                    "steps": [{"op": "prune", "method": "magnitude", "sparsity": round(0.05 * (i + 1), 2)}],
                    "cache": False,
                }
                job_ids.append(c.post("/v1/jobs", json=spec).raise_for_status().json()["id"])

        ctx = mp.get_context("fork")  # before any event loop exists in this process
        go = ctx.Event()
        parent_conn, child_conn = ctx.Pipe(duplex=False)
        child = ctx.Process(target=upload_child, args=(d.base_url, key, files, go, child_conn), daemon=True)
        child.start()
        child_conn.close()
        try:
            cpu0 = os.times()
            polls, results, t_begin, t_uploads, t_end_load = asyncio.run(
                load_phase(d.base_url, key, job_ids, args, go, parent_conn)
            )
            cpu1 = os.times()
        finally:
            if child.is_alive():
                child.terminate()
            child.join(10)

        errors = list(polls.errors)
        if results is None:
            errors.append(f"uploads not finished within --max-seconds {args.max_seconds:g}")
            results = []
        for r in results:
            if r.error or r.status != 201:
                errors.append(f"upload {r.name}: {r.status} {r.error or str(r.body)[:200]}")

        # Download each stored dataset back and compare the three sha256.
        by_name = {f.path.name: f for f in files}
        rows_sha: list[tuple[str, str, str, str, str]] = []
        mismatches = 0
        with d.client(key) as c:
            for r in results:
                if r.status != 201:
                    continue
                f = by_name[r.name]
                h = hashlib.sha256()
                with c.stream("GET", f"/v1/datasets/{r.body['id']}/download") as resp:
                    if resp.status_code != 200:
                        errors.append(f"download {r.name}: {resp.status_code}")
                        continue
                    for chunk in resp.iter_bytes(CHUNK):
                        h.update(chunk)
                got = h.hexdigest()
                same = f.sha256 == r.body.get("sha256") == got and r.body.get("num_samples") == f.samples
                mismatches += not same
                rows_sha.append(
                    (r.name, f.sha256[:16], str(r.body.get("sha256"))[:16], got[:16], "equal" if same else "DIFFER")
                )
        server_errors = unhandled_errors(d.procs.log("api"))

    # -- report ------------------------------------------------------------------------------------------------
    done = [r for r in results if r.status == 201]
    t_up_end = max((r.t1 for r in results), default=t_end_load)
    t_up_start = min((r.t0 for r in results), default=t_uploads)
    warm = t_begin + min(2.0, args.baseline / 2)  # the first seconds: connections opening
    base = polls.window(warm, t_uploads)
    during = polls.window(t_up_start, t_up_end)
    print()
    print(
        f"load    : {args.pollers} pollers (pause {args.interval:g} s), {args.jobs} queued jobs; "
        f"{args.uploads} uploads of {files[0].size / 1e6:.1f} MB ({sum(f.multipart for f in files)} multipart, "
        f"{sum(not f.multipart for f in files)} raw); client CPU (pollers' process) "
        f"{(cpu1.user + cpu1.system - cpu0.user - cpu0.system) / (t_end_load - t_begin) * 100:.0f}% of a core"
    )
    print()
    print_table(
        ["GET /v1/jobs/{id}", "polls", "polls/s", "p50 ms", "p99 ms", "max ms"],
        [
            (name, a.size, a.size / max(t1 - t0, 1e-9), pct(a, 50), pct(a, 99), float(a.max()) if a.size else None)
            for name, a, t0, t1 in (
                ("baseline (no uploads)", base, warm, t_uploads),
                ("during uploads", during, t_up_start, t_up_end),
            )
        ],
    )
    print()
    window = t_up_end - t_up_start
    print_table(
        ["upload", "kind", "MB", "seconds", "MB/s", "status"],
        [
            (r.name, "multipart" if r.multipart else "raw", r.size / 1e6, r.t1 - r.t0, r.mb_per_s, r.status or r.error)
            for r in sorted(results, key=lambda r: r.name)
        ]
        + [
            (
                "all (aggregate)",
                "",
                sum(r.size for r in done) / 1e6,
                window,
                sum(r.size for r in done) / 1e6 / window if window > 0 else None,
                f"{len(done)}/{len(files)} stored",
            )
        ],
    )
    print()
    print_table(["upload", "file sha256", "API sha256", "downloaded sha256", "verdict"], rows_sha)
    if errors:
        print(f"\nerrors ({len(errors)}), first 10:")
        for e in errors[:10]:
            print(f"  {e}")
    if server_errors:
        print("\nunhandled exceptions in the API's log (count, last line of the traceback):")
        for line, n in server_errors.most_common(5):
            print(f"  {n:5d}  {line}")

    checks.check("errors (polls, uploads, downloads)", str(len(errors)), "0", not errors)
    checks.check("uploads stored", f"{len(done)}/{len(files)}", f"{len(files)}/{len(files)}", len(done) == len(files))
    checks.check(
        "sha256 file = API = download", f"{len(rows_sha) - mismatches}/{len(files)} equal", "all", not mismatches
    )
    checks.check("polls during uploads", str(during.size), "> 0", during.size > 0)
    return checks.finish()


if __name__ == "__main__":
    sys.exit(main())
