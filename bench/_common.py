"""Shared plumbing of the benchmarks: a throw-away deployment (temp folder, PostgreSQL database, Redis db),
real ``squeeze`` processes (``tests/support/service.py``), result tables and target checks.

Everything a benchmark starts is stopped and everything it writes is removed when it ends, also on an error,
Ctrl-C or SIGTERM. Only 127.0.0.1 is ever contacted.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.support.service import (  # noqa: E402  (after the sys.path fix, so that `python bench/x.py` works)
    Processes,
    create_key,
    free_port,
    wait_for,
    wait_healthy,
    wait_job,
)

__all__ = [
    "ROOT",
    "Deployment",
    "Processes",
    "Targets",
    "create_key",
    "free_port",
    "header",
    "hf_plain_accuracy",
    "mean_pooled_cosine",
    "ort_logits",
    "print_table",
    "wait_for",
    "wait_healthy",
    "wait_job",
]

PG_SERVER = "postgresql://postgres@127.0.0.1:5432"
REDIS_SERVER = "redis://127.0.0.1:6379"
# Redis databases a benchmark may take (0 is left to applications, 14 to the test suite): the first one found
# empty is claimed with a marker key (SET NX) and emptied when the benchmark ends. Nothing else is touched, so
# benchmarks and test runs can share the Redis server.
REDIS_DBS = (*range(1, 14), 15)
REDIS_MARKER = "squeeze-bench:owner"


def _raise_on_sigterm() -> None:
    """Turn SIGTERM/SIGHUP into SystemExit so that ``finally`` blocks (cleanup) run."""

    def handler(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, handler)


def _drop_squeeze_env() -> None:
    """The caller's SQUEEZE_* settings must not leak into the processes a benchmark starts."""
    for key in [k for k in os.environ if k.startswith("SQUEEZE_")]:
        del os.environ[key]


class Deployment:
    """A temporary deployment: its own folder, optionally its own PostgreSQL database and the benchmark Redis db.

    ``with Deployment("upload", pg=True, redis=True) as d:`` then ``d.env`` (SQUEEZE_* settings), ``d.procs``
    (``Processes``), ``d.tmp`` (the folder), ``d.start_api()``, ``d.start_worker()``, ``d.new_key()``.
    """

    def __init__(
        self,
        name: str,
        *,
        pg: bool,
        redis: bool,
        pg_server: str = PG_SERVER,
        redis_server: str = REDIS_SERVER,
        tmp_parent: str | None = None,
    ) -> None:
        self.name = name
        self.use_pg, self.use_redis = pg, redis
        self.pg_server, self.redis_server = pg_server, redis_server
        self.redis_url = ""
        self.tmp_parent = tmp_parent
        self.db_name: str | None = None
        self.base_url = ""
        self._stack = ExitStack()

    # -- lifecycle -------------------------------------------------------------------------------------
    def __enter__(self) -> Deployment:
        _raise_on_sigterm()
        _drop_squeeze_env()
        try:
            self.tmp = Path(tempfile.mkdtemp(prefix=f"squeeze-bench-{self.name}-", dir=self.tmp_parent))
            self._stack.callback(shutil.rmtree, self.tmp, True)
            self.data_dir = self.tmp / "data"
            self.logdir = self.tmp / "logs"
            self.logdir.mkdir()
            env = {"SQUEEZE_DATA_DIR": str(self.data_dir)}
            if self.use_pg:
                self.db_name = f"squeeze_bench_{uuid.uuid4().hex[:10]}"
                _OUR_DATABASES.add(self.db_name)
                self._pg("CREATE DATABASE", self.db_name)
                self._stack.callback(self._pg, "DROP DATABASE IF EXISTS", self.db_name, " WITH (FORCE)")
                url = self.pg_server.replace("postgresql://", "postgresql+psycopg://")
                env["SQUEEZE_DATABASE_URL"] = f"{url}/{self.db_name}"
            if self.use_redis:
                self.redis_url = self._claim_redis_db()
                self._stack.callback(self._flush_redis)
                env["SQUEEZE_BROKER_URL"] = self.redis_url
            self.env = env
            self.procs = Processes(self.logdir, env)
            self._stack.callback(self.procs.stop_all)  # runs first: processes before their database and files
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        failed = isinstance(exc_type, type) and issubclass(exc_type, Exception)  # not Ctrl-C or SIGTERM
        if failed and hasattr(self, "logdir"):
            for log in sorted(self.logdir.glob("*.log")):  # what the processes said, before it is deleted
                tail = log.read_text(errors="replace").splitlines()[-25:]
                print(f"--- last lines of {log.name}:\n" + "\n".join(tail), file=sys.stderr)
        self._stack.close()

    def _pg(self, verb: str, name: str, suffix: str = "") -> None:
        import psycopg

        with psycopg.connect(f"{self.pg_server}/postgres", autocommit=True) as conn:
            conn.execute(f'{verb} "{name}"{suffix}')  # type: ignore[arg-type]

    def _claim_redis_db(self) -> str:
        import random

        import redis

        owner = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        for db in random.sample(REDIS_DBS, len(REDIS_DBS)):
            url = f"{self.redis_server}/{db}"
            r = redis.Redis.from_url(url)
            if r.dbsize() == 0 and r.set(REDIS_MARKER, owner, nx=True):
                if r.dbsize() == 1:
                    return url
                r.delete(REDIS_MARKER)  # someone else's keys arrived meanwhile: not ours to use
        raise RuntimeError(f"no empty Redis database among {REDIS_DBS} at {self.redis_server}")

    def _flush_redis(self) -> None:
        import redis

        redis.Redis.from_url(self.redis_url).flushdb()

    # -- processes -------------------------------------------------------------------------------------
    def start_api(self, *, worker: bool = False) -> subprocess.Popen[bytes]:
        """``squeeze serve`` (uvicorn runs inside this very process: its pid is the API server's pid)."""
        port = free_port()
        self.base_url = f"http://127.0.0.1:{port}"
        args = ["serve", "--port", str(port)] + ([] if worker else ["--no-worker"])
        proc = self.procs.start("api", *args)
        try:
            wait_healthy(self.base_url, timeout=90)
        except TimeoutError:
            raise RuntimeError(f"the API did not come up; its log:\n{self.procs.log('api')[-3000:]}") from None
        return proc

    def start_worker(
        self, concurrency: int = 1, *, name: str = "worker", cpus: str | None = None, threads: int | None = None
    ) -> subprocess.Popen[bytes]:
        """``squeeze worker`` on the cpu queue; ``cpus``: pinned to those cores; ``threads``: its ``--threads``."""
        args = ["worker", "--queues", "cpu", "--concurrency", str(concurrency)]
        proc = self.procs.start(name, *args, *(["--threads", str(threads)] if threads else []), cpus=cpus)
        try:
            wait_for(lambda: "ready." in self.procs.log(name), timeout=90, what=f"{name} to be ready")
        except TimeoutError:
            raise RuntimeError(f"{name} did not start; its log:\n{self.procs.log(name)[-3000:]}") from None
        return proc

    def start_script(self, name: str, script: Path, *args: str) -> subprocess.Popen[bytes]:
        """Another Python process (same interpreter, same environment), stopped with the others."""
        log = open(self.logdir / f"{name}.log", "ab")  # noqa: SIM115 - lives as long as the process
        proc = subprocess.Popen(
            [sys.executable, str(script), *args],
            cwd=ROOT,
            env=self.procs.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.procs.procs[name] = proc
        return proc

    def new_key(self, name: str = "bench") -> str:
        try:
            return create_key(self.env, f"{name}-{uuid.uuid4().hex[:6]}")
        except subprocess.CalledProcessError as exc:
            raise RuntimeError(f"`squeeze users create` failed: {(exc.stderr or '').strip()[-2000:]}") from None

    def client(self, key: str, timeout: float = 600):  # -> httpx.Client
        import httpx

        return httpx.Client(base_url=self.base_url, headers={"Authorization": f"Bearer {key}"}, timeout=timeout)


# ------------------------------------------------------------------------------------------------------
# Output


def add_common_args(ap: Any) -> None:
    ap.add_argument("--no-check", action="store_true", help="exit 0 even if a target is missed")
    ap.add_argument(
        "--wait-quiet",
        type=float,
        default=0,
        metavar="S",
        help="first wait up to S seconds for other processes to leave the CPUs (under 0.3 cores busy)",
    )


def header(title: str, argv: Sequence[str] | None = None, wait_quiet_s: float = 0) -> None:
    """Title, the exact command, the machine and the date: what a reader needs to rerun and compare."""
    wait_quiet(wait_quiet_s)
    argv = list(sys.argv if argv is None else argv)
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True, check=False
        ).stdout.strip()
    except OSError:
        commit, dirty = "?", ""
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    print(f"== {title}")
    print(f"command : {' '.join(['.venv/bin/python', *argv])}")
    print(f"machine : {os.cpu_count()} cores ({cpu}), {mem_gib:.0f} GiB RAM, {platform.system()} {platform.release()}")
    print(f"python  : {platform.python_version()}   commit: {commit or '?'}{' (+ local changes)' if dirty else ''}")
    print(f"date    : {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M:%S UTC')}")
    print(load_line("other processes, before the start"))
    sys.stdout.flush()
    global _MONITOR
    _MONITOR = OtherLoad()
    _MONITOR.start()


_OUR_DATABASES: set[str] = set()


def _proc_table() -> dict[int, tuple[int, int, str]]:
    """pid -> (ppid, CPU ticks, command line) of every process."""
    out = {}
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            stat = (p / "stat").read_text()
            fields = stat.rsplit(")", 1)[1].split()
            cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            out[int(p.name)] = (int(fields[1]), int(fields[11]) + int(fields[12]), cmd or stat.split("(", 1)[1][:30])
        except (OSError, IndexError, ValueError):
            continue
    return out


class OtherLoad(threading.Thread):
    """Measures, once a second, the CPU used by processes that are not this benchmark's.

    Ours: this process and its descendants, and PostgreSQL backends serving this benchmark's databases.
    """

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.samples: list[float] = []
        self._halt = threading.Event()

    def _ours(self, table: dict[int, tuple[int, int, str]]) -> set[int]:
        me = os.getpid()
        ours = {me}
        changed = True
        while changed:
            changed = False
            for pid, (ppid, _, cmd) in table.items():
                if pid not in ours and (ppid in ours or any(db in cmd for db in _OUR_DATABASES)):
                    ours.add(pid)
                    changed = True
        return ours

    def run(self) -> None:
        tick = os.sysconf("SC_CLK_TCK")
        prev, t_prev = _proc_table(), time.monotonic()
        while not self._halt.wait(1.0):
            cur, t_cur = _proc_table(), time.monotonic()
            ours = self._ours(cur)
            used = sum(cur[p][1] - prev[p][1] for p in cur if p in prev and p not in ours)
            self.samples.append(used / tick / (t_cur - t_prev))
            prev, t_prev = cur, t_cur

    def stop(self) -> str:
        self._halt.set()
        self.join()
        if not self.samples:
            return "no sample"
        avg = sum(self.samples) / len(self.samples)
        busy = sum(1 for x in self.samples if x >= 0.3)
        return (
            f"{avg:.2f} cores on average, peak {max(self.samples):.2f}; "
            f"{busy} of {len(self.samples)} seconds with >= 0.3 cores busy"
        )


_MONITOR: OtherLoad | None = None


def busy_cores(seconds: float = 1.0) -> tuple[float, list[tuple[float, str]]]:
    """CPU in use on the machine over ``seconds`` (in cores), and the processes using the most of it."""
    tick = os.sysconf("SC_CLK_TCK")
    a = _proc_table()
    time.sleep(seconds)
    b = _proc_table()
    use = sorted(((b[p][1] - a[p][1]) / tick / seconds, b[p][2]) for p in b if p in a)[::-1]
    return sum(u for u, _ in use), [(u, c) for u, c in use[:3] if u >= 0.05]


def wait_quiet(max_wait_s: float, threshold_cores: float = 0.3) -> None:
    """Wait (at most ``max_wait_s``) until other processes use under ``threshold_cores`` for 3 s in a row."""
    if max_wait_s <= 0:
        return
    deadline = time.monotonic() + max_wait_s
    quiet = 0
    while time.monotonic() < deadline:
        busy, _ = busy_cores()
        quiet = quiet + 1 if busy < threshold_cores else 0
        if quiet >= 3:
            return
    print(f"note    : the machine was not quiet after {max_wait_s:.0f} s of waiting; running anyway")


def load_line(when: str) -> str:
    busy, top = busy_cores()
    tops = "; ".join(f"{u:.2f} {c[:70]}" for u, c in top)
    return f"load    : {when}: {busy:.2f} of {os.cpu_count()} cores busy" + (f" (top: {tops})" if tops else "")


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A plain-text table, first column left-aligned, the others right-aligned."""
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(r: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))

    print(line(cells[0]))
    print("  ".join("-" * w for w in widths))
    for r in cells[1:]:
        print(line(r))
    sys.stdout.flush()


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if v != v:  # NaN
            return "-"
        return f"{v:,.3f}" if abs(v) < 10 else f"{v:,.1f}"
    return "-" if v is None else str(v)


class Targets:
    """Collects target checks; ``finish()`` prints them and returns the exit status (1 if any missed)."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.rows: list[tuple[str, str, str, bool]] = []

    def check(self, what: str, value: str, target: str, ok: bool) -> None:
        self.rows.append((what, value, target, bool(ok)))

    def finish(self) -> int:
        print()
        if _MONITOR is not None:
            print(f"load    : other processes during the run: {_MONITOR.stop()}")
        print()
        print_table(
            ["target", "measured", "wanted", "verdict"],
            [(w, v, t, "PASS" if ok else "MISS") for w, v, t, ok in self.rows],
        )
        missed = [w for w, _, _, ok in self.rows if not ok]
        if not missed:
            print("\nall targets met")
            return 0
        print(f"\nmissed: {', '.join(missed)}" + ("" if self.enabled else "   (--no-check: exit status 0 anyway)"))
        return 1 if self.enabled else 0


# ------------------------------------------------------------------------------------------------------
# Scoring artifacts with the plain runtimes (what a user who downloads them has)


def ort_logits(model: bytes | str | Path, feeds: dict[str, Any], batch: int) -> Any:
    """The first output of a bare ONNX Runtime session over ``feeds``, in batches of ``batch`` (as a job measures:
    ORT's ``int8_dynamic`` quantizes activations per batch, so the batch size matters to the last digit)."""
    import numpy as np
    import onnxruntime as ort

    source = str(model) if isinstance(model, Path) else model
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    n = len(next(iter(feeds.values())))
    return np.concatenate(
        [session.run(None, {k: v[i : i + batch] for k, v in feeds.items()})[0] for i in range(0, n, batch)]
    )


def mean_pooled_cosine(reference: Any, output: Any, attention_mask: Any) -> float:
    """Mean cosine of sentence embeddings (token states mean-pooled over the attention mask, as sentence-transformers
    does) between a model's ``output`` and the original's ``reference`` ([sentences, tokens, hidden])."""
    import numpy as np

    mask = attention_mask[..., None].astype(np.float64)
    a, b = (reference * mask).sum(1) / mask.sum(1), (output * mask).sum(1) / mask.sum(1)
    return float(((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))).mean())


def hf_plain_accuracy(body: bytes, fmt: str, work: Path, batch: int) -> float:
    """An hf job's artifact scored on the held-out digits texts with the ordinary loaders only: transformers
    (``from_pretrained`` + the folder's tokenizer) for a zipped folder, ONNX Runtime in batches for ``.onnx``."""
    import io
    import zipfile

    import numpy as np

    from tests.support.hf_models import classifier_folder, digits_texts, held_out_accuracy

    if fmt == "hf":
        folder = work / f"artifact-{time.monotonic_ns()}"
        with zipfile.ZipFile(io.BytesIO(body)) as zf:
            zf.extractall(folder)
        return held_out_accuracy(folder)
    from transformers import AutoTokenizer

    _, _, texts, labels = digits_texts()
    tokenizer = AutoTokenizer.from_pretrained(str(classifier_folder()), local_files_only=True)
    feed = {k: np.asarray(v, dtype=np.int64) for k, v in tokenizer(texts, padding=True, return_tensors="np").items()}
    return float((ort_logits(body, feed, batch).argmax(1) == labels).mean())
