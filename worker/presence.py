"""A worker process in the registry: registered when Celery is ready, kept live by heartbeats, marked stopped on
exit. Runs in the worker's parent process, so it must never import torch (GPUs are found with nvidia-smi).
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import threading
from importlib import metadata
from typing import Any

from sqlalchemy import Engine, create_engine
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

from app.config import Settings
from app.workers.service import heartbeat, mark_stopped, register_worker

log = logging.getLogger("squeeze.worker.presence")


def detect_gpus(timeout_s: float = 10.0) -> list[dict[str, Any]]:
    """NVIDIA GPUs as nvidia-smi lists them (name, memory in MiB); none when it is absent or fails."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    try:
        out = subprocess.run(
            [exe, "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("nvidia-smi failed (%s): no GPU reported", type(exc).__name__)
        return []
    gpus: list[dict[str, Any]] = []
    for line in out.splitlines():
        name, _, memory = line.rpartition(",")
        if name.strip():
            gpus.append({"name": name.strip(), "memory_mb": int(memory) if memory.strip().isdigit() else None})
    return gpus


def offered_devices(queues: list[str], gpus: list[dict[str, Any]], gpu_enabled: bool) -> list[str]:
    """What jobs may ask for because this worker runs: cpu on the cpu queue, cuda on the gpu queue with a GPU."""
    devices = ["cpu"] if "cpu" in queues else []
    if "gpu" in queues:
        if gpus or gpu_enabled:
            devices.append("cuda")
        else:
            log.error(
                "this worker consumes the gpu queue but found no GPU (nvidia-smi): it does not offer cuda. "
                "Set SQUEEZE_GPU_ENABLED=true if the GPU is there but nvidia-smi is not"
            )
    return devices


def _version() -> str:
    try:
        return metadata.version("squeeze")
    except metadata.PackageNotFoundError:
        return "unknown"


class WorkerPresence:
    """This process's registry row. ``start`` at Celery's ``worker_ready``, ``stop`` when the worker exits.

    Heartbeats come from a daemon thread, not from Celery's event loop, so a slow database never delays task
    dispatch. Its engine has no pool: prefork children are forked from this process, and a pooled connection
    would be inherited by every child, which would then share one socket with the parent.
    """

    def __init__(self, settings: Settings, *, queues: list[str], concurrency: int, gpus: list[dict[str, Any]]) -> None:
        self.settings = settings
        self.queues = queues
        self.concurrency = concurrency
        self.gpus = gpus
        self.devices = offered_devices(queues, gpus, settings.gpu_enabled)
        self.pid = os.getpid()
        self.node_name = f"pid-{self.pid}@{socket.gethostname()}"
        self.worker_id: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="worker-presence", daemon=True)
        self._engine: Engine | None = None

    def _session(self) -> Session:
        if self._engine is None:
            url = self.settings.resolved_database_url
            args = {"timeout": 30} if url.startswith("sqlite") else {"connect_timeout": 10}
            self._engine = create_engine(url, poolclass=NullPool, connect_args=args)
        return Session(self._engine, expire_on_commit=False)

    def _register(self) -> None:
        with self._session() as s:
            node = register_worker(
                s,
                name=self.node_name,
                hostname=socket.gethostname(),
                pid=self.pid,
                queues=self.queues,
                devices=self.devices,
                gpus=self.gpus,
                concurrency=self.concurrency,
                version=_version(),
                ttl_s=self.settings.worker_ttl_s,
            )
            self.worker_id = node.id
        log.info("registered as %s (devices %s, queues %s)", self.worker_id, self.devices, self.queues)

    def _beat(self) -> None:
        if self.worker_id is None:
            self._register()
            return
        with self._session() as s:
            renewed = heartbeat(s, worker_id=self.worker_id, ttl_s=self.settings.worker_ttl_s)
        if not renewed and not self._stop.is_set():  # the row was dropped (e.g. after a long outage)
            self._register()

    def _run(self) -> None:
        while not self._stop.wait(self.settings.worker_heartbeat_s):
            try:
                self._beat()
            except Exception:  # the database may be restarting: the next beat tries again
                log.warning("worker heartbeat failed", exc_info=True)

    def start(self, node_name: str | None = None) -> None:
        """Register (or leave it to the first heartbeat if the database is not reachable yet) and start beating."""
        if self._thread.is_alive():
            return
        if node_name:
            self.node_name = node_name
        try:
            self._register()
        except Exception:
            log.warning("could not register this worker yet; retrying with each heartbeat", exc_info=True)
        self._thread.start()

    def stop(self) -> None:
        """Mark the row stopped. Only in the process that registered (a forked child inherits this object)."""
        if os.getpid() != self.pid:
            return
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        if self.worker_id is not None:
            try:
                with self._session() as s:
                    mark_stopped(s, worker_id=self.worker_id)
                log.info("worker %s marked stopped", self.worker_id)
            except Exception:
                log.warning("could not mark this worker stopped; it turns stale after its TTL", exc_info=True)
        if self._engine is not None:
            self._engine.dispose()
