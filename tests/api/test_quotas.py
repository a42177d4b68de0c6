"""Per-user quotas and deployment-wide format switches, through the real app."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from app.config import Settings, get_settings
from tests.support.models import digits_npz_bytes, digits_onnx_bytes, digits_pt2_bytes


@pytest.fixture
def configure(client) -> Iterator:
    def _set(**values: object) -> None:
        client.app.dependency_overrides[get_settings] = lambda: Settings(**values)

    yield _set
    client.app.dependency_overrides.clear()


def test_storage_quota_refuses_what_does_not_fit(client, alice, bob, configure) -> None:
    size = len(digits_onnx_bytes())
    configure(quota_storage_bytes=int(size * 1.5))
    assert client.post("/v1/models", headers=alice, files={"file": ("a.onnx", digits_onnx_bytes())}).status_code == 201
    r = client.post("/v1/models", headers=alice, files={"file": ("b.onnx", digits_onnx_bytes())})
    assert r.status_code == 403 and r.json()["error"]["code"] == "storage_quota_exceeded"
    # The quota is per user: bob still has room.
    assert client.post("/v1/models", headers=bob, files={"file": ("a.onnx", digits_onnx_bytes())}).status_code == 201
    # Deleting frees alice's room again.
    mid = client.get("/v1/models", headers=alice).json()["items"][0]["id"]
    assert client.delete(f"/v1/models/{mid}", headers=alice).status_code == 204
    assert client.post("/v1/models", headers=alice, files={"file": ("b.onnx", digits_onnx_bytes())}).status_code == 201


def test_concurrent_job_quota_answers_429(client, alice, configure) -> None:
    configure(quota_concurrent_jobs=2)
    m = client.post("/v1/models", headers=alice, files={"file": ("m.onnx", digits_onnx_bytes())}).json()
    d = client.post("/v1/datasets", headers=alice, files={"file": ("d.npz", digits_npz_bytes())}).json()
    spec = {"model_id": m["id"], "dataset_id": d["id"], "cache": False}
    ids = [client.post("/v1/jobs", headers=alice, json=spec).json()["id"] for _ in range(2)]
    r = client.post("/v1/jobs", headers=alice, json=spec)
    assert r.status_code == 429 and r.json()["error"]["code"] == "too_many_jobs"
    client.post(f"/v1/jobs/{ids[0]}/cancel", headers=alice)
    assert client.post("/v1/jobs", headers=alice, json=spec).status_code == 202


def test_pt2_can_be_switched_off(client, alice, configure) -> None:
    configure(allowed_formats=["onnx"])
    r = client.post("/v1/models", headers=alice, files={"file": ("m.pt2", digits_pt2_bytes())})
    assert r.status_code == 422 and r.json()["error"]["code"] == "format_disabled"
    assert client.post("/v1/models", headers=alice, files={"file": ("m.onnx", digits_onnx_bytes())}).status_code == 201
