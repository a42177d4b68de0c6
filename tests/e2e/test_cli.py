"""The client side as a user drives it: the installed ``squeeze`` CLI (as subprocesses, with their own HOME) and
the Python client, against a real API and Celery worker on PostgreSQL and Redis.

Exit codes are part of the contract: 0 success, 1 job failed/cancelled, 2 usage/4xx, 3 unreachable/5xx, 4 timeout.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest

from squeeze.client import Squeeze
from squeeze.errors import ChecksumMismatch, JobFailed, JobTimeout
from tests.e2e.conftest import Deployment
from tests.support.models import digits_arrays, digits_npz_bytes, digits_onnx_bytes
from tests.support.service import free_port

_INSTALLED = Path(sys.executable).with_name("squeeze")
SQUEEZE_CLI = [str(_INSTALLED)] if _INSTALLED.exists() else [sys.executable, "-m", "app.cli"]
PRUNE_INT8 = [
    {"op": "prune", "method": "magnitude", "sparsity": 0.5, "scope": "global"},
    {"op": "quantize", "method": "int8_dynamic"},
]
FAST_EVAL = {"latency_runs": 3, "warmup_runs": 1}


@dataclass
class User:
    """A user of the CLI: a key, a home folder of their own, the digits model and data on disk."""

    base_url: str
    key: str
    home: Path
    model_file: Path
    data_file: Path

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("SQUEEZE_URL", "SQUEEZE_API_KEY")}
        env.update(HOME=str(self.home), XDG_CONFIG_HOME=str(self.home / ".config"), **extra)
        return env

    def run(self, *args: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*SQUEEZE_CLI, *args],
            cwd=self.home,
            env=self.env(**env),
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def ok(self, *args: str, timeout: float = 120) -> str:
        r = self.run(*args, timeout=timeout)
        assert r.returncode == 0, (args, r.returncode, r.stdout, r.stderr)
        return r.stdout

    def client(self, **kwargs: object) -> Squeeze:
        return Squeeze(self.base_url, self.key, **kwargs)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def user(deployment: Deployment, tmp_path_factory: pytest.TempPathFactory) -> User:
    home = tmp_path_factory.mktemp("cli-home")
    (home / "digits.onnx").write_bytes(digits_onnx_bytes())
    (home / "digits.npz").write_bytes(digits_npz_bytes())
    u = User(
        deployment.base_url,
        deployment.new_key(f"cli-{uuid.uuid4().hex[:6]}"),
        home,
        home / "digits.onnx",
        home / "digits.npz",
    )
    u.ok("login", "--url", u.base_url, "--key", u.key)
    return u


@pytest.fixture(scope="module")
def uploaded(user: User) -> tuple[str, str]:
    """(model id, dataset id), uploaded with the CLI."""
    model_id = user.ok("models", "upload", "digits.onnx", "-q").strip()
    dataset_id = user.ok("datasets", "upload", "digits.npz", "--name", "digits test set", "-q").strip()
    assert model_id.startswith("mdl_") and dataset_id.startswith("dst_")
    return model_id, dataset_id


def test_login_stores_url_and_key_privately(user: User, tmp_path: Path) -> None:
    u = User(user.base_url, user.key, tmp_path, user.model_file, user.data_file)  # a fresh home, nothing saved
    nothing_saved = u.run("models", "list")
    assert nothing_saved.returncode == 2 and "squeeze login" in nothing_saved.stderr, nothing_saved.stderr
    refused = u.run("login", "--url", u.base_url, "--key", "sqz_not_a_key")
    assert refused.returncode == 2, refused.stderr
    config = tmp_path / ".config" / "squeeze" / "config.json"
    assert not config.exists()

    u.ok("login", "--url", u.base_url, "--key", u.key)
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    assert stat.S_IMODE(config.parent.stat().st_mode) == 0o700
    assert json.loads(config.read_text()) == {"url": u.base_url, "api_key": u.key}
    assert "next_cursor" in json.loads(u.ok("models", "list", "--json"))  # the saved key is used


def test_unreachable_server_exits_3(user: User) -> None:
    r = user.run("jobs", "list", SQUEEZE_URL=f"http://127.0.0.1:{free_port()}")
    assert r.returncode == 3, (r.stdout, r.stderr)
    assert "cannot reach" in r.stderr


def test_bad_specs_exit_2_with_the_servers_message(user: User, uploaded: tuple[str, str]) -> None:
    model_id, _ = uploaded
    # Refused by the schema (422 validation_error) ...
    bad_value = json.dumps([{"op": "prune", "method": "magnitude", "sparsity": 1.5}])
    r = user.run("jobs", "submit", "--model", model_id, "--steps-json", bad_value)
    assert r.returncode == 2 and "sparsity: Input should be less than 1" in r.stderr, r.stderr
    # ... by the service's checks (422 dataset_required), from a spec file ...
    spec = user.home / "static.json"
    spec.write_text(json.dumps({"model_id": model_id, "steps": [{"op": "quantize", "method": "int8_static"}]}))
    r = user.run("jobs", "submit", str(spec))
    assert r.returncode == 2 and "calibrates on data: add a dataset_id" in r.stderr, r.stderr
    # ... and for an unknown model (404).
    r = user.run("jobs", "submit", "--model", "mdl_missing", "--recipe", "int8")
    assert r.returncode == 2 and "model 'mdl_missing' not found" in r.stderr, r.stderr
    # A usage mistake the CLI sees itself.
    r = user.run("compress", "digits.onnx", "--recipe", "int8-static")
    assert r.returncode == 2 and "--data" in r.stderr, r.stderr


def test_watch_exits_4_on_timeout_and_1_when_cancelled(user: User, uploaded: tuple[str, str]) -> None:
    model_id, _ = uploaded
    with user.client() as client:
        job = client.submit_job({"model_id": model_id, "steps": [{"op": "quantize", "method": "fp16"}], "cache": False})
        try:
            r = user.run("jobs", "watch", job.id, "--timeout", "0")
            assert r.returncode == 4 and "keeps running" in r.stderr, (r.stdout, r.stderr)
        finally:
            assert job.id in user.ok("jobs", "cancel", job.id)
    r = user.run("jobs", "watch", job.id)
    assert r.returncode == 1 and f"job {job.id} cancelled" in r.stderr, (r.stdout, r.stderr)


def test_client_upload_progress_and_wait_timeout(user: User, tmp_path: Path) -> None:
    # A dataset bigger than one upload chunk (1 MiB): progress comes in several steps, up to the file's size.
    data = tmp_path / "big.npz"
    buf = io.BytesIO()
    np.savez(buf, input=np.random.default_rng(0).random((12000, 1, 8, 8), dtype=np.float32))
    data.write_bytes(buf.getvalue())
    size = data.stat().st_size
    calls: list[tuple[int, int]] = []
    with user.client() as client:
        dataset = client.upload_dataset(data, progress=lambda sent, total: calls.append((sent, total)))
        assert dataset.num_samples == 12000 and dataset.size_bytes == size
        assert calls[0] == (0, size) and calls[-1] == (size, size) and len(calls) >= 4
        assert [c[0] for c in calls] == sorted(c[0] for c in calls)

        model_calls: list[tuple[int, int]] = []
        model = client.upload_model(user.model_file, name="digits", progress=lambda *c: model_calls.append(c))
        assert model.name == "digits" and model_calls[-1] == (model.size_bytes, model.size_bytes)

        job = client.submit_job({"model_id": model.id, "steps": [{"op": "quantize", "method": "fp16"}], "cache": False})
        with pytest.raises(JobTimeout, match=job.id):
            job.wait(timeout=0.05, poll=0.01)
        job.cancel()
        assert job.wait(timeout=30).status == "cancelled"
        with pytest.raises(JobFailed):
            job.raise_for_status()


def test_upload_submit_watch_ends_with_the_table(user: User, uploaded: tuple[str, str]) -> None:
    model_id, dataset_id = uploaded
    assert model_id in user.ok("models", "list")
    assert "digits test set" in user.ok("datasets", "show", dataset_id)
    spec = user.home / "spec.yaml"
    spec.write_text(f"model_id: {model_id}\ndataset_id: {dataset_id}\nevaluation: {json.dumps(FAST_EVAL)}\n")
    job_id = user.ok("jobs", "submit", str(spec), "--recipe", "prune50-int8", "-q").strip()
    assert job_id.startswith("job_")

    r = user.run("jobs", "watch", job_id, "--poll", "0.2", "--timeout", "90")
    assert r.returncode == 0, (r.stdout, r.stderr)
    for row in ("size", "parameters", "sparsity", "accuracy", "agreement", "cosine", "latency p50", "ratio"):
        assert row in r.stdout
    assert "succeeded" in r.stderr and "done" in r.stderr  # the stages, one line each outside a terminal
    listed = json.loads(user.ok("jobs", "list", "--status", "succeeded", "--json"))
    assert job_id in [j["id"] for j in listed["items"]]


def test_compress_one_liner_downloads_a_verified_model(user: User) -> None:
    out = user.home / "digits-int8.onnx"
    r = user.run("compress", "digits.onnx", "--data", "digits.npz", "--recipe", "int8", "-o", str(out), "--timeout=90")
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert "accuracy" in r.stdout and f"saved {out}" in r.stdout
    assert not out.with_name(out.name + ".part").exists()

    with user.client() as client:
        job = client.list_jobs(status="succeeded", limit=1).items[0]
        art = job.artifact("model")
        assert art is not None and art.sha256 == hashlib.sha256(out.read_bytes()).hexdigest()
        table = job.table()
        assert "accuracy" in str(table) and "<table" in table._repr_html_()
        accuracy = next(row for row in table.rows if row.metric == "accuracy")
        assert accuracy.ratio is not None and accuracy.ratio > 0.97
    _, _, x_test, y_test = digits_arrays()
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    logits = np.concatenate([sess.run(None, {"input": x_test[i : i + 32]})[0] for i in range(0, len(x_test), 32)])
    assert float((logits.argmax(1) == y_test).mean()) == pytest.approx(accuracy.result, abs=1e-9)


class RecordingTransport(httpx.HTTPTransport):
    def __init__(self) -> None:
        super().__init__()
        self.downloads: list[tuple[str | None, int, str | None]] = []  # (Range, status, Content-Length)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        if request.url.path.endswith("/download"):
            self.downloads.append(
                (request.headers.get("range"), response.status_code, response.headers.get("content-length"))
            )
        return response


def test_download_resumes_with_range_and_verifies(user: User, uploaded: tuple[str, str], tmp_path: Path) -> None:
    model_id, dataset_id = uploaded
    transport = RecordingTransport()
    with user.client(transport=transport) as client:
        spec = {"model_id": model_id, "dataset_id": dataset_id, "steps": PRUNE_INT8, "evaluation": FAST_EVAL}
        job = client.submit_job(spec).wait(timeout=120, poll=0.2).raise_for_status()
        art = job.artifact("model")
        assert art is not None
        auth = {"Authorization": f"Bearer {user.key}"}
        whole = httpx.get(user.base_url + art.download_url, headers=auth).raise_for_status().content
        transport.downloads.clear()

        dest = tmp_path / "resumed.onnx"
        half = len(whole) // 2
        dest.with_name("resumed.onnx.part").write_bytes(whole[:half])
        seen: list[tuple[int, int]] = []
        assert client.download_artifact(art.id, dest, progress=lambda done, total: seen.append((done, total))) == dest
        assert transport.downloads == [(f"bytes={half}-", 206, str(len(whole) - half))]
        assert seen[0] == (half, len(whole)) and seen[-1] == (len(whole), len(whole))
        assert dest.read_bytes() == whole and hashlib.sha256(whole).hexdigest() == art.sha256
        assert not dest.with_name("resumed.onnx.part").exists()

        # Bytes that do not match the announced sha256 are never kept.
        forged = art.model_copy(update={"sha256": "0" * 64})
        bad = tmp_path / "bad.onnx"
        with pytest.raises(ChecksumMismatch):
            client.download_artifact(forged, bad)
        assert list(tmp_path.glob("bad.onnx*")) == []
