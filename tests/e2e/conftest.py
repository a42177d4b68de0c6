from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from tests.support.service import Processes, create_key, free_port, wait_healthy


@dataclass
class Deployment:
    base_url: str
    env: dict[str, str]
    procs: Processes

    def client(self, key: str) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, headers={"Authorization": f"Bearer {key}"}, timeout=60)

    def new_key(self, name: str) -> str:
        return create_key(self.env, name)


@pytest.fixture(scope="module")
def deployment(
    service_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Deployment]:
    """API (uvicorn) and one Celery worker as separate processes, on PostgreSQL and Redis. A test module may add
    worker options with a ``WORKER_ARGS`` tuple."""
    port = free_port()
    procs = Processes(tmp_path_factory.mktemp("e2e-logs"), dict(service_env))
    procs.start("api", "serve", "--no-worker", "--port", str(port))
    extra = getattr(request.module, "WORKER_ARGS", ())
    procs.start("worker", "worker", "--queues", "cpu", "--concurrency", "1", *extra)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base)
        yield Deployment(base, dict(service_env), procs)
    finally:
        procs.stop_all()
