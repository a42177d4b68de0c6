"""The S3-compatible store, over HTTP against a real S3 server (moto_server in its own process): streamed and
multipart uploads, nothing visible before commit, fetches verified against the sha256, the workers' cache, and the
API's downloads from the bucket (Range, If-Range, missing bytes, presigned redirects)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from app.config import Settings, get_settings
from tests.support.models import digits_npz_bytes, digits_onnx_bytes
from tests.support.s3 import S3Server, moto_server
from tests.support.service import ROOT, free_port

MiB = 2**20


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    with moto_server(tmp_path_factory.mktemp("moto")) as server:
        yield server


def _store(s3: S3Server, tmp_path: Path, **settings: object):  # -> S3ArtifactStore
    from app.storage.s3 import S3ArtifactStore

    env = {k.removeprefix("SQUEEZE_").lower(): v for k, v in s3.env(s3.new_bucket()).items()}
    small_parts = {"s3_multipart_threshold_bytes": 5 * MiB, "s3_multipart_part_bytes": 5 * MiB}
    return S3ArtifactStore(Settings(**{**env, "work_dir": tmp_path / "work", **small_parts, **settings}))


def _keys(s3: S3Server, bucket: str) -> list[str]:
    return [o["Key"] for o in s3.client().list_objects_v2(Bucket=bucket).get("Contents", [])]


def _files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()]


def test_a_streamed_upload_is_stored_under_its_sha256_only_once_committed(s3: S3Server, tmp_path: Path) -> None:
    store = _store(s3, tmp_path)
    data = os.urandom(3 * MiB + 123)
    sha = hashlib.sha256(data).hexdigest()
    with store.writer() as w:
        for i in range(0, len(data), 256 * 1024):
            w.write(data[i : i + 256 * 1024])
        w.flush()
        assert w.temp_path.read_bytes() == data  # what the API inspects before committing
        assert _keys(s3, store.bucket) == [] and not store.exists(sha)
        assert w.commit() == sha
    assert _keys(s3, store.bucket) == [f"blobs/{sha[:2]}/{sha}"]
    assert store.exists(sha) and store.size(sha) == len(data) and store.verify(sha)
    assert _files(store.spool.tmp_dir) == []  # the spooled copy is gone
    # One PUT, carrying the sha256 for the server to check.
    head = s3.client().head_object(Bucket=store.bucket, Key=store.key_for(sha), ChecksumMode="ENABLED")
    assert "-" not in head["ETag"] and head["Metadata"]["sha256"] == sha

    blob = store.open_blob(sha, (10, 20))
    assert blob is not None and blob.total_size == len(data) and b"".join(blob.chunks) == data[10:20]


def test_large_blobs_go_up_in_parts(s3: S3Server, tmp_path: Path) -> None:
    store = _store(s3, tmp_path)
    data = os.urandom(11 * MiB)
    sha = hashlib.sha256(data).hexdigest()
    with store.writer() as w:
        for i in range(0, len(data), MiB):
            w.write(data[i : i + MiB])
        assert w.commit() == sha
    head = s3.client().head_object(Bucket=store.bucket, Key=store.key_for(sha))
    assert head["ETag"].strip('"').endswith("-3")  # a multipart upload of three 5 MiB parts
    assert head["ContentLength"] == len(data) and store.verify(sha)
    assert store.local_path(sha).read_bytes() == data

    # A worker's output file takes the same path; the same bytes again are not uploaded twice.
    other = os.urandom(6 * MiB)
    path = tmp_path / "artifact.bin"
    path.write_bytes(other)
    other_sha = hashlib.sha256(other).hexdigest()
    assert store.put_file(path) == (other_sha, len(other))
    assert s3.client().head_object(Bucket=store.bucket, Key=store.key_for(other_sha))["ETag"].endswith('-2"')
    assert store.put_file(path) == (other_sha, len(other))
    assert sorted(_keys(s3, store.bucket)) == sorted(store.key_for(s) for s in (sha, other_sha))


def test_an_aborted_upload_leaves_nothing(s3: S3Server, tmp_path: Path) -> None:
    store = _store(s3, tmp_path)
    with pytest.raises(RuntimeError), store.writer() as w:
        w.write(os.urandom(MiB))
        raise RuntimeError("client went away")
    assert _keys(s3, store.bucket) == [] and _files(store.spool.tmp_dir) == []


def test_a_fetch_refuses_bytes_that_do_not_match_their_name(s3: S3Server, tmp_path: Path) -> None:
    from app.storage.s3 import BlobCorrupted

    store = _store(s3, tmp_path)
    good = b"the bytes the name promises" * 1000
    sha = hashlib.sha256(good).hexdigest()
    # Damage in the bucket: other bytes under the name.
    s3.client().put_object(Bucket=store.bucket, Key=store.key_for(sha), Body=b"something else entirely")
    with pytest.raises(BlobCorrupted):
        store.local_path(sha)
    assert _files(store.cache_dir) == []  # nothing half-fetched or unverified stays in the cache
    assert store.verify(sha) is False
    with pytest.raises(FileNotFoundError):
        store.local_path(hashlib.sha256(b"never stored").hexdigest())
    with pytest.raises(ValueError):
        store.local_path("../../etc/passwd")


def test_workers_fetch_once_into_their_cache_and_delete_removes_both(s3: S3Server, tmp_path: Path) -> None:
    store = _store(s3, tmp_path)
    data = os.urandom(100_000)
    path = tmp_path / "model.onnx"
    path.write_bytes(data)
    sha, _ = store.put_file(path)
    cached = store.local_path(sha)
    assert cached.read_bytes() == data and cached.is_relative_to(tmp_path / "work")
    # The cache answers without the bucket (content-addressed: cached bytes cannot be stale).
    s3.client().delete_object(Bucket=store.bucket, Key=store.key_for(sha))
    assert store.local_path(sha) == cached and cached.read_bytes() == data

    store.put_file(path)
    store.delete(sha)
    assert not store.exists(sha) and not cached.exists()
    with pytest.raises(FileNotFoundError):
        store.local_path(sha)


def test_the_cache_drops_least_recently_used_blobs_but_never_one_in_use(s3: S3Server, tmp_path: Path) -> None:
    store = _store(s3, tmp_path, s3_cache_max_bytes=2_500_000, job_time_limit_s=600)
    shas = []
    for i in range(4):
        p = tmp_path / f"blob{i}"
        p.write_bytes(os.urandom(1_000_000))
        shas.append(store.put_file(p)[0])
    a, b = store.local_path(shas[0]), store.local_path(shas[1])
    # a and b were last used long ago, a before b (set their use times rather than wait).
    now = time.time()
    os.utime(a, (now - 7200, now - 7200))
    os.utime(b, (now - 3600, now - 3600))
    c = store.local_path(shas[2])  # 3 MB cached > 2.5 MB: the least recently used goes
    assert not a.exists() and b.exists() and c.exists()
    os.utime(b, None)  # b is in use again
    d = store.local_path(shas[3])  # over the budget, but every blob was used within a job's time limit
    assert b.exists() and c.exists() and d.exists()


def test_garbage_collection_lists_blobs_and_deletes_only_old_unused_ones(s3: S3Server, tmp_path: Path) -> None:
    store = _store(s3, tmp_path)
    shas = []
    for name in ("a", "b"):
        (tmp_path / name).write_bytes(os.urandom(1000))
        shas.append(store.put_file(tmp_path / name)[0])
    a, b = shas
    s3.client().put_object(Bucket=store.bucket, Key="blobs/zz/not-a-blob", Body=b"x")  # not of the layout
    listed = {blob.sha256: blob for blob in store.iter_blobs()}
    assert set(listed) == {a, b} and listed[a].size_bytes == 1000
    later = max(blob.modified_at for blob in listed.values()) + timedelta(seconds=1)

    assert not store.delete_unused(a, modified_before=later, unused=lambda: False) and store.exists(a)  # in use
    assert not store.delete_unused(a, modified_before=listed[a].modified_at, unused=lambda: True)  # too recent
    assert store.exists(a)
    cached = store.local_path(b)
    assert store.delete_unused(b, modified_before=later, unused=lambda: True)
    assert not store.exists(b) and not cached.exists()
    assert not store.delete_unused(b, modified_before=later, unused=lambda: True)  # already gone


def test_storing_the_same_bytes_again_keeps_them_from_garbage_collection(s3: S3Server, tmp_path: Path) -> None:
    store = _store(s3, tmp_path)
    path = tmp_path / "model.onnx"
    path.write_bytes(os.urandom(1000))
    sha, _ = store.put_file(path)
    (stored,) = store.iter_blobs()
    # S3 times have one-second resolution: cross into the next second so that a rewrite shows.
    time.sleep(1.05 - time.time() % 1)

    def unused() -> bool:
        store.put_file(path)  # a writer stores the same bytes, its row not committed yet
        return True

    cutoff = stored.modified_at + timedelta(milliseconds=500)  # the blob is stale when GC first looks
    assert not store.delete_unused(sha, modified_before=cutoff, unused=unused)
    assert store.exists(sha) and store.verify(sha)
    assert len(_keys(s3, store.bucket)) == 1


def test_readiness_checks_the_bucket(s3: S3Server, tmp_path: Path) -> None:
    store = _store(s3, tmp_path)
    store.check()
    store.bucket = "no-such-bucket-here"
    with pytest.raises(Exception, match=r"404|Not Found|NoSuchBucket"):
        store.check()
    # An unreachable server: /readyz answers at once (no retries with back-off), saying so.
    unreachable = _store(s3, tmp_path, s3_endpoint_url=f"http://127.0.0.1:{free_port()}")
    t0 = time.monotonic()
    with pytest.raises(Exception, match="Could not connect"):
        unreachable.check()
    assert time.monotonic() - t0 < 3


def test_the_backend_is_chosen_by_settings_and_boto3_loads_only_for_s3(s3: S3Server, tmp_path: Path) -> None:
    code = (
        "import sys, json; import app.main, app.cli, worker.runner, worker.tasks; from app.storage import get_store;"
        "s = get_store(); print(json.dumps([type(s).__name__, 'boto3' in sys.modules]))"
    )
    base = {k: v for k, v in os.environ.items() if not k.startswith("SQUEEZE_")}
    base["SQUEEZE_DATA_DIR"] = str(tmp_path)

    def run(env: dict[str, str]) -> list[object]:
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout.strip().splitlines()[-1])

    assert run(base) == ["LocalArtifactStore", False]
    assert run({**base, **s3.env(s3.new_bucket())}) == ["S3ArtifactStore", True]
    with pytest.raises(ValueError, match="S3_BUCKET"):
        Settings(storage_backend="s3")


# --- through the API ---------------------------------------------------------------------------------------------


@pytest.fixture
def s3_api(clean_db: None, s3: S3Server, tmp_path: Path) -> Iterator[tuple[TestClient, str]]:
    """The app with its blobs in a fresh bucket; yields the client and the bucket's name."""
    from app.main import create_app

    bucket = s3.new_bucket()
    with pytest.MonkeyPatch.context() as mp:
        for k, v in s3.env(bucket, SQUEEZE_WORK_DIR=str(tmp_path / "api-work")).items():
            mp.setenv(k, v)
        get_settings.cache_clear()
        with TestClient(create_app()) as c:
            yield c, bucket
    get_settings.cache_clear()


def test_api_uploads_land_in_the_bucket_and_download_with_range(
    s3_api: tuple[TestClient, str], s3: S3Server, alice: dict[str, str], data_dir: Path
) -> None:
    client, bucket = s3_api
    onnx = digits_onnx_bytes()
    m = client.post("/v1/models", headers=alice, files={"file": ("m.onnx", onnx)}).json()
    d = client.post("/v1/datasets", headers=alice, files={"file": ("d.npz", digits_npz_bytes())}).json()
    assert sorted(_keys(s3, bucket)) == sorted(f"blobs/{x['sha256'][:2]}/{x['sha256']}" for x in (m, d))
    assert _files(data_dir / "blobs") == []  # nothing on the API's disk
    assert client.get("/readyz").json()["checks"]["storage"] == "ok"

    url = f"/v1/models/{m['id']}/download"
    r = client.get(url, headers=alice)
    assert r.status_code == 200 and r.content == onnx and r.headers["etag"] == f'"{m["sha256"]}"'
    assert r.headers["content-length"] == str(len(onnx)) and r.headers["accept-ranges"] == "bytes"
    assert r.headers["content-disposition"] == f'attachment; filename="{m["id"]}.onnx"'
    r = client.get(url, headers={**alice, "Range": "bytes=0-99"})
    assert r.status_code == 206 and r.content == onnx[:100]
    assert r.headers["content-range"] == f"bytes 0-99/{len(onnx)}"
    r = client.get(url, headers={**alice, "Range": "bytes=-7"})
    assert r.status_code == 206 and r.content == onnx[-7:]
    r = client.get(url, headers={**alice, "Range": "bytes=100-", "If-Range": f'"{m["sha256"]}"'})
    assert r.status_code == 206 and r.content == onnx[100:]
    # If-Range naming other bytes, or several ranges: the whole file.
    for headers in ({"Range": "bytes=100-", "If-Range": '"other"'}, {"Range": "bytes=0-1,5-9"}):
        r = client.get(url, headers={**alice, **headers})
        assert r.status_code == 200 and r.content == onnx
    r = client.get(url, headers={**alice, "Range": "bytes=99999999-"})
    assert r.status_code == 416 and r.json()["error"]["code"] == "range_not_satisfiable"
    r = client.get(url, headers={**alice, "Range": "pages=1-2"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_range"
    r = client.get(f"/v1/datasets/{d['id']}/download", headers=alice)
    assert r.status_code == 200 and r.content == digits_npz_bytes()

    # Bytes gone from the bucket behind the API's back: a clear 503, never a truncated 200.
    s3.client().delete_object(Bucket=bucket, Key=f"blobs/{m['sha256'][:2]}/{m['sha256']}")
    r = client.get(url, headers=alice)
    assert r.status_code == 503 and r.json()["error"]["code"] == "model_missing"

    # Deleting the dataset deletes its object.
    assert client.delete(f"/v1/datasets/{d['id']}", headers=alice).status_code == 204
    assert _keys(s3, bucket) == []


def test_presigned_downloads_redirect_to_the_bucket(
    s3_api: tuple[TestClient, str], s3: S3Server, alice: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    client, _ = s3_api
    onnx = digits_onnx_bytes()
    m = client.post("/v1/models", headers=alice, files={"file": ("m.onnx", onnx)}).json()
    monkeypatch.setenv("SQUEEZE_S3_PRESIGNED_DOWNLOADS", "true")
    get_settings.cache_clear()
    r = client.get(f"/v1/models/{m['id']}/download", headers=alice, follow_redirects=False)
    assert r.status_code == 307
    location = r.headers["location"]
    assert location.startswith(s3.endpoint_url) and "X-Amz-Signature=" in location
    got = httpx.get(location)  # no API key: the URL itself is the permission
    assert got.status_code == 200 and hashlib.sha256(got.content).hexdigest() == m["sha256"]
    assert got.headers["content-disposition"] == f'attachment; filename="{m["id"]}.onnx"'
    part = httpx.get(location, headers={"Range": "bytes=10-19"})
    assert part.status_code == 206 and part.content == onnx[10:20]
