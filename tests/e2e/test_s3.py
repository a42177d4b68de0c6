"""API and worker processes that share no disk, only an S3 bucket (plus PostgreSQL and Redis): the deployment
shape of docker-compose.yml, with moto_server standing in for MinIO."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.support.models import digits_npz_bytes, digits_onnx_bytes
from tests.support.s3 import S3Server, moto_server
from tests.support.service import Processes, create_key, free_port, wait_healthy, wait_job


@dataclass
class SplitDeployment:
    api_url: str  # streams downloads through the API
    presigned_url: str  # a second API process answering downloads with presigned redirects
    api_dir: Path
    worker_dir: Path
    env: dict[str, str]
    s3: S3Server
    bucket: str

    def client(self, key: str, base_url: str | None = None) -> httpx.Client:
        return httpx.Client(base_url=base_url or self.api_url, headers={"Authorization": f"Bearer {key}"}, timeout=60)


@pytest.fixture(scope="module")
def split(service_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[SplitDeployment]:
    logs = tmp_path_factory.mktemp("s3-e2e-logs")
    api_dir, worker_dir = tmp_path_factory.mktemp("api-data"), tmp_path_factory.mktemp("worker-data")
    with moto_server(logs) as s3:
        bucket = s3.new_bucket()
        shared = {**service_env, **s3.env(bucket)}
        api_env = {**shared, "SQUEEZE_DATA_DIR": str(api_dir)}
        api = Processes(logs, api_env)
        presigned = Processes(logs, {**api_env, "SQUEEZE_S3_PRESIGNED_DOWNLOADS": "true"})
        worker = Processes(logs, {**shared, "SQUEEZE_DATA_DIR": str(worker_dir)})
        port, presigned_port = free_port(), free_port()
        try:
            api.start("api", "serve", "--no-worker", "--port", str(port))
            worker.start("worker", "worker", "--queues", "cpu", "--concurrency", "1")
            wait_healthy(f"http://127.0.0.1:{port}")  # migrated by now
            presigned.start("api-presigned", "serve", "--no-worker", "--port", str(presigned_port))
            wait_healthy(f"http://127.0.0.1:{presigned_port}")
            yield SplitDeployment(
                f"http://127.0.0.1:{port}",
                f"http://127.0.0.1:{presigned_port}",
                api_dir,
                worker_dir,
                api_env,
                s3,
                bucket,
            )
        finally:
            for procs in (presigned, worker, api):
                procs.stop_all()


def _files(folder: Path) -> set[str]:
    return {p.name for p in folder.rglob("*") if p.is_file()}


def test_a_job_runs_on_a_worker_that_shares_only_the_bucket(split: SplitDeployment, tmp_path: Path) -> None:
    key = create_key(split.env, f"s3-{uuid.uuid4().hex[:6]}")
    with split.client(key) as client:
        model = client.post("/v1/models", files={"file": ("digits.onnx", digits_onnx_bytes())}).raise_for_status()
        dataset = client.post("/v1/datasets", files={"file": ("digits.npz", digits_npz_bytes())}).raise_for_status()
        m, d = model.json(), dataset.json()
        stored = {o["Key"] for o in split.s3.client().list_objects_v2(Bucket=split.bucket)["Contents"]}
        assert stored == {f"blobs/{x['sha256'][:2]}/{x['sha256']}" for x in (m, d)}

        spec = {"model_id": m["id"], "dataset_id": d["id"], "steps": [{"op": "quantize", "method": "int8_dynamic"}]}
        job = wait_job(client, client.post("/v1/jobs", json=spec).raise_for_status().json()["id"], timeout=180)
        assert job["status"] == "succeeded", job["error"]
        assert job["metrics"]["result"]["accuracy"] > 0.9
        art = next(a for a in job["artifacts"] if a["kind"] == "model")

        # The worker fetched its inputs from the bucket into its own cache; the API's disk never held a blob.
        assert {m["sha256"], d["sha256"]} <= _files(split.worker_dir / "work" / "blob-cache")
        assert not {m["sha256"], d["sha256"], art["sha256"]} & _files(split.api_dir)
        split.s3.client().head_object(Bucket=split.bucket, Key=f"blobs/{art['sha256'][:2]}/{art['sha256']}")

        # Downloaded through the API, streamed from the bucket.
        r = client.get(art["download_url"])
        assert r.status_code == 200 and r.headers["etag"] == f'"{art["sha256"]}"'
        assert hashlib.sha256(r.content).hexdigest() == art["sha256"] and len(r.content) == art["size_bytes"]
        body = r.content
        r = client.get(art["download_url"], headers={"Range": "bytes=10-19"})
        assert r.status_code == 206 and r.content == body[10:20]

    # With presigned downloads the API answers with a redirect to the bucket.
    with split.client(key, split.presigned_url) as client:
        r = client.get(art["download_url"])
        assert r.status_code == 307 and r.headers["location"].startswith(split.s3.endpoint_url)
        got = httpx.get(r.headers["location"])
        assert got.status_code == 200 and got.content == body

    # The Python client follows the redirect, resumes with Range, and verifies the sha256.
    from squeeze.client import Squeeze

    with Squeeze(url=split.presigned_url, key=key) as sq:
        dest = tmp_path / "int8.onnx"
        dest.with_name("int8.onnx.part").write_bytes(body[: len(body) // 2])
        assert sq.download_artifact(art["id"], dest) == dest
        assert dest.read_bytes() == body
