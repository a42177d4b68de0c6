"""Upload throughput and memory: a large file through the real API, multipart and raw, against `cp`.

    .venv/bin/python bench/upload.py                 # 2 GiB (the default), ~1-2 minutes
    .venv/bin/python bench/upload.py --size-mb 256   # quicker

What runs: `squeeze serve --no-worker` (uvicorn in that very process) on a fresh PostgreSQL database
(squeeze_bench_<random>, dropped at the end) with Redis as the broker and its blob store in a temporary folder.
The file is a valid `.npz` dataset (the API inspects every upload and refuses anything else) holding one
uint8 array of pseudo-random bytes (os.urandom blocks XORed with a counter: no two MiB alike, nothing
compressible). It is uploaded with curl (which streams it from disk):

- multipart: `curl -F file=@FILE`                   → POST /v1/datasets
- raw:       `curl -T FILE -X POST` (octet-stream)  → POST /v1/datasets?name=...

and copied with `cp FILE DEST` on the same filesystem: the baseline, measured in the same run. Reported: MB/s
(MB = 10^6 bytes of the file, request start to response), the ratio to cp, the API process's RSS growth during
the upload (VmRSS from /proc/<pid>/status sampled every 10 ms, from just before the upload to its peak), and
that the stored blob's sha256 equals the file's. Printed for context, the target being against plain cp:
`cp + fsync` (the API fsyncs every blob before it answers; plain cp does not), and `ASGI sink, raw`: the same raw
upload to bench/sink_app.py, a bare ASGI app under uvicorn that discards the body (the most any uvicorn app can
do with it here: what that cannot beat, the API cannot either).

Each upload is preceded by `sync` (no dirty pages left from the previous step) and followed by a DELETE of the
dataset so that the next upload stores its own copy. A small warm-up upload of each kind comes first, so that
one-time imports (numpy, the inspection code) are not counted as per-upload memory.

Targets: upload MB/s >= 0.5 x cp; RSS growth <= 64 MiB; sha256 equal.  Exit status 1 if one is missed
(--no-check: 0).  Needs: curl, PostgreSQL at 127.0.0.1:5432 (user postgres, trust), Redis at 127.0.0.1:6379
(it takes an empty database and empties it at the end).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
from _common import Deployment, Targets, add_common_args, free_port, header, print_table, wait_for

MiB = 1024**2
ROW = MiB  # one "sample" of the array is 1 MiB of bytes


def make_npz(path: Path, size_bytes: int) -> str:
    """Write an .npz of about ``size_bytes`` (one uint8 array of shape [n, 1 MiB]); return its sha256."""
    rows = max(1, size_bytes // ROW)
    base = np.frombuffer(os.urandom(ROW), dtype=np.uint64)
    with (
        zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf,
        zf.open("input.npy", "w", force_zip64=True) as fp,
    ):
        np.lib.format.write_array_header_1_0(fp, {"descr": "|u1", "fortran_order": False, "shape": (rows, ROW)})
        for i in range(rows):
            fp.write((base ^ np.uint64((i + 1) * 0x9E3779B97F4A7C15 % 2**64)).tobytes())
    return sha256_file(path)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 * MiB):
            h.update(chunk)
    return h.hexdigest()


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with open(task / "children") as f:
            out += [int(p) for p in f.read().split()]
    return out


class Sampler(threading.Thread):
    """Samples the server's RSS, and notes when the upload's temporary blob has received all the file's bytes."""

    def __init__(self, pid: int, tmp_dir: Path, file_bytes: int, interval: float = 0.01) -> None:
        super().__init__(daemon=True)
        self.pid, self.tmp_dir, self.file_bytes, self.interval = pid, tmp_dir, file_bytes, interval
        self.start_rss = rss_kib(pid)
        self.peak_rss = self.start_rss
        self.t0 = time.perf_counter()
        self.received_at: float | None = None
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            self.peak_rss = max(self.peak_rss, rss_kib(self.pid))
            if self.received_at is None:
                try:
                    got = sum(p.stat().st_size for p in self.tmp_dir.glob("upload-*"))
                except FileNotFoundError:  # renamed away between glob and stat: done
                    got = self.file_bytes
                if got >= self.file_bytes:
                    self.received_at = time.perf_counter() - self.t0
            time.sleep(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join()
        self.peak_rss = max(self.peak_rss, rss_kib(self.pid))


def curl_upload(base_url: str, key: str, path: Path, mode: str) -> tuple[dict, float]:
    """POST ``path`` to /v1/datasets with curl; return (response JSON, curl's time_total in seconds)."""
    out = path.parent / f"response-{mode}.json"
    common = [
        "curl",
        "-sS",
        "-o",
        str(out),
        "-w",
        "%{http_code} %{time_total}",
        "-H",
        f"Authorization: Bearer {key}",
        "-H",
        "Expect:",
    ]
    if mode == "multipart":
        cmd = [
            *common,
            "-F",
            f"file=@{path};filename=bench.npz;type=application/octet-stream",
            f"{base_url}/v1/datasets",
        ]
    else:
        cmd = [
            *common,
            "-X",
            "POST",
            "-H",
            "Content-Type: application/octet-stream",
            "-T",
            str(path),
            f"{base_url}/v1/datasets?name=bench.npz",
        ]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"curl ({mode}) failed: {res.stderr.strip()}")
    status, total = res.stdout.split()
    body = out.read_text()
    out.unlink()
    if status != "201":
        raise RuntimeError(f"{mode} upload answered {status}: {body[:500]}")
    return json.loads(body), float(total)


def curl_sink(sink_url: str, path: Path) -> float:
    """POST ``path`` raw to bench/sink_app.py; return curl's time_total (checking that every byte arrived)."""
    headers = ["-H", "Expect:", "-H", "Content-Type: application/octet-stream"]
    res = subprocess.run(
        ["curl", "-sS", "-w", " %{time_total}", *headers, "-X", "POST", "-T", str(path), sink_url],
        capture_output=True,
        text=True,
        check=True,
    )
    received, total = res.stdout.split()
    if int(received) != path.stat().st_size:
        raise RuntimeError(f"the sink received {received} bytes of {path.stat().st_size}")
    return float(total)


def one_round(
    d: Deployment, client, key: str, pid: int, src: Path, size: int, file_sha: str, sink_url: str
) -> dict[str, dict]:
    """cp (then fsync), the ASGI sink, multipart upload, raw upload: each preceded by `sync`, uploads deleted."""
    out: dict[str, dict] = {}
    dst = d.tmp / "copy.npz"
    os.sync()
    t = time.perf_counter()
    subprocess.run(["cp", str(src), str(dst)], check=True)
    cp_s = time.perf_counter() - t
    with open(dst, "rb+") as f:
        os.fsync(f.fileno())
    cp_fsync_s = time.perf_counter() - t
    dst.unlink()
    base = {"rss": None, "recv": None, "cpu": None, "sha_ok": None}
    out["cp"] = {"s": cp_s, "mbs": size / cp_s / 1e6, **base}
    out["cp + fsync"] = {"s": cp_fsync_s, "mbs": size / cp_fsync_s / 1e6, **base}
    os.sync()
    sink_s = curl_sink(sink_url, src)
    out["ASGI sink, raw"] = {"s": sink_s, "mbs": size / sink_s / 1e6, **base}
    store_tmp = d.data_dir / "blobs" / "tmp"
    for mode in ("multipart", "raw"):
        os.sync()
        cpu0 = cpu_s(pid)
        sampler = Sampler(pid, store_tmp, size)
        sampler.start()
        try:
            ds, total_s = curl_upload(d.base_url, key, src, mode)
        finally:
            sampler.stop()
        server_cpu = cpu_s(pid) - cpu0
        blob = d.data_dir / "blobs" / ds["sha256"][:2] / ds["sha256"][2:4] / ds["sha256"]
        blob_sha = sha256_file(blob)
        client.delete(f"/v1/datasets/{ds['id']}").raise_for_status()
        out[f"API {mode}"] = {
            "s": total_s,
            "mbs": size / total_s / 1e6,
            "rss": (sampler.peak_rss - sampler.start_rss) / 1024,
            "recv": sampler.received_at,
            "cpu": server_cpu,
            "sha_ok": ds["sha256"] == blob_sha == file_sha and ds["size_bytes"] == size,
        }
    return out


def _answers(url: str) -> bool:
    import httpx

    try:
        return httpx.post(url, content=b"x", timeout=2).text == "1"
    except httpx.HTTPError:
        return False


def print_round(r: int, rd: dict[str, dict]) -> None:
    print(f"\nround {r}")
    print_table(
        ["copy", "seconds", "MB/s", "x cp", "RSS growth MiB", "body in (s)", "server CPU s", "blob sha256"],
        [
            (
                m,
                x["s"],
                x["mbs"],
                x["mbs"] / rd["cp"]["mbs"],
                x["rss"],
                x["recv"],
                x["cpu"],
                "-" if x["sha_ok"] is None else ("equal" if x["sha_ok"] else "DIFFERENT"),
            )
            for m, x in rd.items()
        ],
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--size-mb", type=int, default=2048, help="file size in MiB (default 2048)")
    ap.add_argument("--repeat", type=int, default=3, help="rounds of cp/multipart/raw, interleaved (default 3)")
    ap.add_argument("--tmp-dir", default=None, help="parent of the temporary folder (default: the system's)")
    ap.add_argument("--min-ratio", type=float, default=0.5, help="target: upload MB/s / cp MB/s (default 0.5)")
    ap.add_argument("--max-rss-mib", type=float, default=64, help="target: API RSS growth in MiB (default 64)")
    add_common_args(ap)
    args = ap.parse_args()
    header(f"upload: {args.size_mb} MiB file through POST /v1/datasets vs cp", wait_quiet_s=args.wait_quiet)

    targets = Targets(enabled=not args.no_check)
    with Deployment("upload", pg=True, redis=True, tmp_parent=args.tmp_dir) as d:
        src = d.tmp / "bench.npz"
        t = time.perf_counter()
        file_sha = make_npz(src, args.size_mb * MiB)
        size = src.stat().st_size
        print(
            f"file    : {size:,} bytes (.npz, pseudo-random uint8), sha256 {file_sha[:16]}…, "
            f"written in {time.perf_counter() - t:.1f} s to {d.tmp}"
        )

        sink_port = free_port()
        d.start_script("sink", Path(__file__).with_name("sink_app.py"), str(sink_port))
        sink_url = f"http://127.0.0.1:{sink_port}/"
        wait_for(lambda: _answers(sink_url), timeout=30, interval=0.2, what="the ASGI sink")

        api = d.start_api()
        pid = api.pid
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        kids = children(pid)
        print(f"server  : pid {pid} ({cmdline.strip()}); child processes: {kids or 'none'}")
        if kids:
            raise RuntimeError("the API process has children: its RSS would not be the uvicorn server's")
        key = d.new_key()
        rss_idle = rss_kib(pid)

        # Warm-up: one small upload of each kind (imports, first DB connections), then delete them.
        small = d.tmp / "small.npz"
        make_npz(small, 4 * MiB)
        with d.client(key) as client:
            for mode in ("multipart", "raw"):
                ds, _ = curl_upload(d.base_url, key, small, mode)
                client.delete(f"/v1/datasets/{ds['id']}").raise_for_status()
        small.unlink()
        print(f"RSS     : {rss_idle / 1024:.1f} MiB idle, {rss_kib(pid) / 1024:.1f} MiB after the warm-up uploads")

        rounds: list[dict[str, dict]] = []
        with d.client(key) as client:
            for r in range(1, args.repeat + 1):
                rounds.append(one_round(d, client, key, pid, src, size, file_sha, sink_url))
                print_round(r, rounds[-1])

        # The ratio of each round uses that round's cp (closest in time); medians over the rounds.
        modes = ("cp", "cp + fsync", "ASGI sink, raw", "API multipart", "API raw")
        summary = []
        for m in modes:
            runs = [rd[m] for rd in rounds]
            ratios = [rd[m]["mbs"] / rd["cp"]["mbs"] for rd in rounds]
            summary.append(
                (
                    m,
                    statistics.median(x["mbs"] for x in runs),
                    statistics.median(ratios),
                    min(ratios),
                    max(ratios),
                    max((x["rss"] for x in runs if x["rss"] is not None), default=None),
                    all(x["sha_ok"] for x in runs) if m.startswith("API") else None,
                    statistics.median(x["cpu"] / (size / 1e9) for x in runs) if m.startswith("API") else None,
                )
            )
        print(
            f"\nsummary over {args.repeat} round(s): median MB/s, median/min/max of the per-round ratio to cp, "
            "largest RSS growth"
        )
        print_table(
            [
                "copy",
                "MB/s (median)",
                "x cp (median)",
                "x cp (min)",
                "x cp (max)",
                "RSS growth MiB (max)",
                "blob sha256",
                "server CPU s/GB",
            ],
            [
                (m, mbs, ratio, lo, hi, rss, "-" if ok is None else ("equal" if ok else "DIFFERENT"), cpu)
                for m, mbs, ratio, lo, hi, rss, ok, cpu in summary
            ],
        )
        print("  MB/s: 10^6 bytes of the file per second, from the request's start to the response (curl's")
        print("  time_total). body in: when the last byte reached the temporary blob; the rest of the time is the")
        print("  inspection (a full read of the .npz to check its CRC), fsync, rename and the database rows.")
        print("  server CPU s/GB: the API process's CPU time (all threads) per 10^9 bytes uploaded, median: it")
        print("  drifts far less than wall times on a shared machine.")

    for m, _mbs, ratio, _lo, _hi, rss, ok, _cpu in summary:
        if not m.startswith("API"):
            continue
        mode = m.removeprefix("API ")
        targets.check(f"{mode} MB/s vs cp", f"{ratio:.2f}x", f">= {args.min_ratio}x", ratio >= args.min_ratio)
        targets.check(f"{mode} RSS growth", f"{rss:.1f} MiB", f"<= {args.max_rss_mib:g} MiB", rss <= args.max_rss_mib)
        targets.check(f"{mode} blob sha256", "equal" if ok else "different", "equal", bool(ok))
    return targets.finish()


if __name__ == "__main__":
    raise SystemExit(main())
