"""Idempotency-Key: a retrying pipeline never submits or uploads twice."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from tests.api.test_jobs import _queued_ids
from tests.support.models import digits_npz_bytes, digits_onnx_bytes


def _spec(client, headers) -> dict:
    m = client.post("/v1/models", headers=headers, files={"file": ("m.onnx", digits_onnx_bytes())}).json()
    d = client.post("/v1/datasets", headers=headers, files={"file": ("d.npz", digits_npz_bytes())}).json()
    return {"model_id": m["id"], "dataset_id": d["id"], "cache": False}


def test_retried_job_submission_returns_the_first_job(client, alice, bob) -> None:
    spec = _spec(client, alice)
    h = {**alice, "Idempotency-Key": "ci-run-1234"}
    first = client.post("/v1/jobs", headers=h, json=spec).json()
    again = client.post("/v1/jobs", headers=h, json=spec).json()
    assert again["id"] == first["id"]
    assert _queued_ids("cpu") == [first["id"]]
    r = client.post("/v1/jobs", headers=h, json={**spec, "evaluation": {"batch_size": 3}})
    assert r.status_code == 422 and r.json()["error"]["code"] == "idempotency_key_reused"
    # Keys are per user.
    other = client.post("/v1/jobs", headers={**bob, "Idempotency-Key": "ci-run-1234"}, json=_spec(client, bob))
    assert other.status_code == 202 and other.json()["id"] != first["id"]


def test_concurrent_retries_create_one_job(client, alice) -> None:
    spec = _spec(client, alice)
    h = {**alice, "Idempotency-Key": "race"}
    with ThreadPoolExecutor(4) as pool:
        ids = set(pool.map(lambda _: client.post("/v1/jobs", headers=h, json=spec).json()["id"], range(4)))
    assert len(ids) == 1
    assert _queued_ids("cpu") == list(ids)


def test_retried_upload_returns_the_first_model(client, alice) -> None:
    h = {**alice, "Idempotency-Key": "upload-7"}
    first = client.post("/v1/models", headers=h, files={"file": ("m.onnx", digits_onnx_bytes())}).json()
    again = client.post("/v1/models", headers=h, files={"file": ("m.onnx", digits_onnx_bytes())}).json()
    assert again["id"] == first["id"]
    assert len(client.get("/v1/models", headers=alice).json()["items"]) == 1
    r = client.post("/v1/models", headers={**alice, "Idempotency-Key": "bad key with spaces"}, content=b"x")
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_idempotency_key"
