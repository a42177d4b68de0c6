"""Webhooks to a real local receiver: signed, retried with backoff, recorded; other URLs refused (no SSRF)."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from tests.support.models import digits_npz_bytes, digits_onnx_bytes
from tests.support.service import Processes, create_key, free_port, wait_for, wait_healthy, wait_job

SECRET = "test-webhook-secret"


class Receiver:
    def __init__(self, fail_first: int) -> None:
        self.calls: list[dict] = []
        self.fail_first = fail_first
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.calls.append({"headers": dict(self.headers), "body": body})
                self.send_response(500 if len(receiver.calls) <= receiver.fail_first else 204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/squeeze"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver(fail_first=2)
    yield r
    r.server.shutdown()


@pytest.fixture
def client(service_env: dict[str, str], tmp_path: Path, receiver: Receiver) -> Iterator[httpx.Client]:
    port = free_port()
    allowed = receiver.url.rsplit("/", 1)[0] + "/"  # http://127.0.0.1:<port>/hooks/
    procs = Processes(
        tmp_path,
        {**service_env, "SQUEEZE_WEBHOOK_SECRET": SECRET, "SQUEEZE_WEBHOOK_ALLOWED_URLS": json.dumps([allowed])},
    )
    procs.start("api", "serve", "--no-worker", "--port", str(port))
    procs.start("worker", "worker", "--queues", "cpu")
    try:
        wait_healthy(f"http://127.0.0.1:{port}")
        key = create_key(procs.env, f"hooks-{uuid.uuid4().hex[:6]}")
        with httpx.Client(
            base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {key}"}, timeout=30
        ) as c:
            yield c
    finally:
        procs.stop_all()


def test_final_state_is_posted_signed_and_retried(client: httpx.Client, receiver: Receiver) -> None:
    m = client.post("/v1/models", files={"file": ("m.onnx", digits_onnx_bytes())}).json()
    d = client.post("/v1/datasets", files={"file": ("d.npz", digits_npz_bytes(n=32))}).json()
    r = client.post("/v1/jobs", json={"model_id": m["id"], "dataset_id": d["id"], "notify_url": receiver.url})
    assert r.status_code == 202, r.text
    job = wait_job(client, r.json()["id"], timeout=120)
    assert job["status"] == "succeeded"
    # Two 500s, then success: delivered on the third attempt (backoff 1 s, 2 s).
    hook = wait_for(
        lambda: (
            (j := client.get(f"/v1/jobs/{job['id']}").json())["webhooks"]
            and j["webhooks"][0]["status"] == "delivered"
            and j["webhooks"][0]
        ),
        timeout=30,
        what="webhook delivered",
    )
    assert hook["attempts"] == 3 and len(receiver.calls) == 3
    call = receiver.calls[-1]
    ts, body = call["headers"]["X-Squeeze-Timestamp"], call["body"]
    expected = "sha256=" + hmac.new(SECRET.encode(), ts.encode() + b"." + body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(call["headers"]["X-Squeeze-Signature"], expected)
    payload = json.loads(body)
    assert payload["event"] == "job.succeeded" and payload["job"]["id"] == job["id"]
    assert payload["job"]["metrics"]["baseline"]["accuracy"] == job["metrics"]["baseline"]["accuracy"]


BAD_URLS = [
    "http://169.254.169.254/latest/meta-data/",
    "http://127.0.0.1:1/hooks/x",  # right host, wrong port
    "http://127.0.0.1:{port}/other/x",  # outside the allowed path
    "http://127.0.0.1:{port}/hooks/../admin",
    "http://127.0.0.1:{port}/hooks/%2e%2e/admin",
    "http://127.0.0.1:{port}.evil.example/hooks/x",
    "http://user:pw@127.0.0.1:{port}/hooks/x",
    "file:///etc/passwd",
    "gopher://127.0.0.1:{port}/hooks/x",
]


def test_urls_outside_the_allow_list_are_refused(client: httpx.Client, receiver: Receiver) -> None:
    port = receiver.server.server_address[1]
    m = client.post("/v1/models", files={"file": ("m.onnx", digits_onnx_bytes())}).json()
    for url in BAD_URLS:
        r = client.post(
            "/v1/jobs",
            json={
                "model_id": m["id"],
                "steps": [{"op": "quantize", "method": "fp16"}],
                "notify_url": url.format(port=port),
            },
        )
        assert r.status_code == 422 and r.json()["error"]["code"] == "notify_url_not_allowed", url
    assert receiver.calls == []
