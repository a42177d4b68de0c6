"""Job status reads: GET /v1/jobs/{id} throughput and latency against a bare FastAPI handler, same run.

    .venv/bin/python bench/status_throughput.py                       # 32 connections, 10 s each (~1 minute)
    .venv/bin/python bench/status_throughput.py --connections 8 --duration 5

What runs: `squeeze serve --no-worker` on a fresh PostgreSQL database (squeeze_bench_<random>, dropped at the
end) with Redis as the broker. A worker is started just long enough to run one real job (the digits CNN,
int8_dynamic, evaluated on 397 samples), so that the row read back has metrics, a report and two artifacts;
then it is stopped. The baseline is bench/bare_app.py: a FastAPI app whose handler returns a constant JSON,
served by the same `uvicorn.run(app, host, port, log_level="info")` call as `squeeze serve` (one process,
access log on), measured in the same run with the same client and the same request (same path shape, same
Authorization header).

The client is a closed-loop HTTP/1.1 keep-alive load generator written here with asyncio (uvloop when
installed): N connections, each sends a request, reads the whole response, records its latency and sends the
next. Every target gets `--warmup` seconds unrecorded, then `--duration` seconds recorded. Client and server
share the machine's cores (2 on the reference machine), so absolute figures are lower than on separate
machines; the ratio is what the target is about. In a closed loop, latency ~= connections / throughput.

Also measured (for diagnosis, not targets; --skip-extra skips them): the bare app's handler as a plain `def`
(thread pool, like the real handler); the service's /healthz (no key, no database) and /v1/capabilities (key
check only: one database read) to split the cost of a request; the job read at 1 connection. For each, the
server process's CPU time per request.

Targets: service throughput >= 50% of the bare handler's; service p99 <= 20 ms; no non-200 answer.
Exit status 1 if one is missed (--no-check: 0). Needs PostgreSQL at 127.0.0.1:5432 and Redis at 127.0.0.1:6379
(it takes an empty database and empties it at the end).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from _common import Deployment, Targets, add_common_args, free_port, header, print_table, wait_healthy, wait_job


@dataclass
class Result:
    name: str
    connections: int
    seconds: float
    latencies_ms: list[float] = field(default_factory=list)
    errors: int = 0
    response_bytes: int = 0
    total: int = 0  # responses received, warm-up included

    @property
    def rps(self) -> float:
        return len(self.latencies_ms) / self.seconds

    def pct(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else float("nan")


async def _connection(
    host: str, port: int, request: bytes, t_record: float, t_end: float, out: Result, first: list[bytes]
) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while True:
            t0 = time.perf_counter()
            if t0 >= t_end:
                return
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            lower = head.lower()
            i = lower.find(b"\r\ncontent-length:")
            if i < 0:
                raise RuntimeError(f"response without Content-Length: {head[:200]!r}")
            n = int(head[i + 17 : head.index(b"\r\n", i + 2)])
            body = await reader.readexactly(n)
            t1 = time.perf_counter()
            out.total += 1
            if not first:
                first.append(head + body)
            if t0 >= t_record:
                out.latencies_ms.append((t1 - t0) * 1000.0)
                out.response_bytes = len(head) + n
                if head[9:12] != b"200":
                    out.errors += 1
            if b"\r\nconnection: close" in lower:
                raise RuntimeError("the server closed the keep-alive connection")
    finally:
        writer.close()


def load(name: str, base_url: str, path: str, key: str, connections: int, warmup: float, duration: float) -> Result:
    """Closed-loop load on GET ``path``; latencies of the requests started in the recorded window."""
    host, port = base_url.removeprefix("http://").split(":")
    request = (
        f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer {key}\r\n"
        "Accept: application/json\r\nUser-Agent: squeeze-bench\r\n\r\n"
    ).encode()
    out = Result(name, connections, duration)
    first: list[bytes] = []

    async def run() -> None:
        now = time.perf_counter()
        t_record, t_end = now + warmup, now + warmup + duration
        await asyncio.gather(
            *(_connection(host, int(port), request, t_record, t_end, out, first) for _ in range(connections))
        )

    try:
        import uvloop

        uvloop.run(run())
    except ImportError:
        asyncio.run(run())
    out.first_response = first[0] if first else b""  # type: ignore[attr-defined]
    return out


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def setup_job(d: Deployment, key: str) -> str:
    """Upload the digits CNN and its data, run one int8_dynamic job to success; return the job id."""
    from tests.support.models import digits_npz_bytes, digits_onnx_bytes

    with d.client(key) as client:
        model = client.post("/v1/models", files={"file": ("digits.onnx", digits_onnx_bytes())}).raise_for_status()
        data = client.post("/v1/datasets", files={"file": ("digits.npz", digits_npz_bytes())}).raise_for_status()
        spec = {
            "model_id": model.json()["id"],
            "dataset_id": data.json()["id"],
            "steps": [{"op": "quantize", "method": "int8_dynamic"}],
        }
        job = client.post("/v1/jobs", json=spec).raise_for_status().json()
        done = wait_job(client, job["id"], timeout=300)
    if done["status"] != "succeeded":
        raise RuntimeError(f"the setup job did not succeed: {done['error']}")
    return done["id"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--connections", type=int, default=32, help="concurrent keep-alive connections (default 32)")
    ap.add_argument("--duration", type=float, default=10.0, help="recorded seconds per target (default 10)")
    ap.add_argument("--warmup", type=float, default=2.0, help="unrecorded seconds before each (default 2)")
    ap.add_argument("--min-ratio", type=float, default=0.5, help="target: service / bare throughput (default 0.5)")
    ap.add_argument("--max-p99-ms", type=float, default=20.0, help="target: service p99 in ms (default 20)")
    ap.add_argument(
        "--skip-extra",
        action="store_true",
        help="skip the diagnostic runs (bare def handler, /healthz, /v1/capabilities, 1 connection)",
    )
    add_common_args(ap)
    args = ap.parse_args()
    header(
        f"status throughput: GET /v1/jobs/{{id}} vs a bare FastAPI handler, {args.connections} connections",
        wait_quiet_s=args.wait_quiet,
    )

    targets = Targets(enabled=not args.no_check)
    with Deployment("status", pg=True, redis=True) as d:
        api = d.start_api()
        d.start_worker()
        key = d.new_key()
        job_id = setup_job(d, key)
        d.procs.stop("worker")  # nothing but the API and the database is left running
        port = free_port()
        bare_proc = d.start_script("bare", Path(__file__).with_name("bare_app.py"), str(port))
        bare_url = f"http://127.0.0.1:{port}"
        wait_healthy(bare_url)
        print(f"job     : {job_id} (succeeded; worker stopped)")

        job = f"/v1/jobs/{job_id}"
        plan = [
            ("bare FastAPI (async def)", bare_url, job, args.connections, bare_proc.pid),
            ("squeeze GET /v1/jobs/{id}", d.base_url, job, args.connections, api.pid),
        ]
        if not args.skip_extra:
            plan += [
                ("bare FastAPI (def, thread pool)", bare_url, f"/sync{job}", args.connections, bare_proc.pid),
                ("squeeze GET /healthz (no key, no DB)", d.base_url, "/healthz", args.connections, api.pid),
                ("squeeze GET /v1/capabilities (key only)", d.base_url, "/v1/capabilities", args.connections, api.pid),
                ("squeeze GET /v1/jobs/{id}", d.base_url, job, 1, api.pid),
            ]
        results = []
        for name, url, path, conns, pid in plan:
            cpu0 = cpu_s(pid)
            r = load(name, url, path, key, conns, args.warmup, args.duration)
            r.server_cpu_ms = (cpu_s(pid) - cpu0) * 1000 / max(1, r.total)  # type: ignore[attr-defined]
            results.append(r)
            print(f"  done: {name}, {conns} connection(s): {r.rps:,.0f} req/s")
        service_body = results[1].first_response.split(b"\r\n\r\n", 1)[1]  # type: ignore[attr-defined]
        shown = json.loads(service_body)
        if shown.get("id") != job_id or shown.get("status") != "succeeded":
            raise RuntimeError(f"the service did not answer with the job: {service_body[:300]!r}")

    bare, service = results[0], results[1]
    print()
    print_table(
        [
            "target",
            "conns",
            "requests",
            "req/s",
            "x bare",
            "p50 ms",
            "p90 ms",
            "p99 ms",
            "max ms",
            "non-200",
            "bytes",
            "server CPU ms/req",
        ],
        [
            (
                r.name,
                r.connections,
                len(r.latencies_ms),
                r.rps,
                r.rps / bare.rps,
                r.pct(50),
                r.pct(90),
                r.pct(99),
                max(r.latencies_ms),
                r.errors,
                r.response_bytes,
                r.server_cpu_ms,  # type: ignore[attr-defined]
            )
            for r in results
        ],
    )
    print("  bytes: one response, headers included. x bare: throughput / the bare async handler's.")
    print("  server CPU ms/req: the server process's CPU time (user + system, all threads) over the whole load,")
    print("  warm-up included, per request answered; the database's own CPU is not in it.")
    ratio = service.rps / bare.rps
    targets.check("throughput vs bare", f"{ratio:.2f}x", f">= {args.min_ratio}x", ratio >= args.min_ratio)
    targets.check(
        f"p99 at {args.connections} conns",
        f"{service.pct(99):.1f} ms",
        f"<= {args.max_p99_ms:g} ms",
        service.pct(99) <= args.max_p99_ms,
    )
    targets.check("non-200 answers", str(service.errors), "0", service.errors == 0)
    return targets.finish()


if __name__ == "__main__":
    raise SystemExit(main())
