"""A real S3-compatible server for tests: moto's standalone server in its own process, spoken to over HTTP."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from tests.support.service import free_port, wait_for

ACCESS_KEY = "squeeze-test"
SECRET_KEY = "squeeze-test-secret"
REGION = "us-east-1"


@dataclass
class S3Server:
    endpoint_url: str

    def client(self) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=REGION,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            config=Config(s3={"addressing_style": "path"}),
        )

    def new_bucket(self) -> str:
        name = f"squeeze-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def env(self, bucket: str, **extra: str) -> dict[str, str]:
        """The SQUEEZE_* settings of a deployment storing its blobs in ``bucket`` on this server."""
        return {
            "SQUEEZE_STORAGE_BACKEND": "s3",
            "SQUEEZE_S3_ENDPOINT_URL": self.endpoint_url,
            "SQUEEZE_S3_BUCKET": bucket,
            "SQUEEZE_S3_REGION": REGION,
            "SQUEEZE_S3_ACCESS_KEY_ID": ACCESS_KEY,
            "SQUEEZE_S3_SECRET_ACCESS_KEY": SECRET_KEY,
            **extra,
        }


@contextmanager
def moto_server(logdir: Path) -> Iterator[S3Server]:
    """``moto_server`` on a free loopback port, until the block ends."""
    port = free_port()
    with open(logdir / "moto.log", "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"moto_server exited with {proc.returncode}: {(logdir / 'moto.log').read_text()}")
        try:
            return httpx.get(f"{url}/moto-api/", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(up, timeout=30, interval=0.1, what="moto_server")
        yield S3Server(url)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
