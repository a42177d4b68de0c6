"""Job submission: everything invalid is refused at the door with a code that says what to change."""

from __future__ import annotations

import io

import numpy as np
import pytest
import redis

from tests.conftest import REDIS_URL, queue_key
from tests.support.models import digits_npz_bytes, digits_onnx_bytes, digits_pt2_bytes


@pytest.fixture
def uploaded(client, alice) -> dict[str, str]:
    m = client.post("/v1/models", headers=alice, files={"file": ("m.onnx", digits_onnx_bytes())}).json()
    d = client.post("/v1/datasets", headers=alice, files={"file": ("d.npz", digits_npz_bytes())}).json()
    return {"model_id": m["id"], "dataset_id": d["id"]}


def _queued_ids(queue: str) -> list[str]:
    import json

    r = redis.Redis.from_url(REDIS_URL)
    return [json.loads(m)["headers"]["id"] for m in r.lrange(queue_key(queue), 0, -1)]


def test_submit_records_and_enqueues_the_id_only(client, alice, uploaded) -> None:
    spec = {**uploaded, "steps": [{"op": "prune", "method": "magnitude", "sparsity": 0.5}]}
    r = client.post("/v1/jobs", headers=alice, json=spec)
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["status"] == "queued" and job["progress"] == 0 and job["attempts"] == 0
    assert job["spec"]["steps"][0] == {
        "op": "prune",
        "method": "magnitude",
        "sparsity": 0.5,
        "scope": "global",
        "pattern": None,
        "overrides": {},
    }
    assert job["metrics"] is None and job["artifacts"] == [] and job["error"] is None
    assert _queued_ids("cpu") == [job["id"]]
    assert client.get(f"/v1/jobs/{job['id']}", headers=alice).json()["status"] == "queued"


@pytest.mark.parametrize(
    ("steps", "code"),
    [
        ([{"op": "prune", "method": "magnitude", "sparsity": 1.0}], "validation_error"),
        ([{"op": "prune", "method": "magnitude", "sparsity": -0.1}], "validation_error"),
        ([{"op": "prune", "method": "magnitude", "sparsity": 0.5, "extra": 1}], "validation_error"),
        ([{"op": "prune", "method": "wishful"}], "validation_error"),
        ([{"op": "teleport"}], "validation_error"),
        ([{"op": "quantize", "method": "int8_static", "calibration_samples": 0}], "validation_error"),
    ],
)
def test_invalid_specs_are_422(client, alice, uploaded, steps, code) -> None:
    r = client.post("/v1/jobs", headers=alice, json={**uploaded, "steps": steps})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == code
    assert r.json()["error"]["message"]
    assert _queued_ids("cpu") == []


def test_unknown_top_level_field_and_bad_device(client, alice, uploaded) -> None:
    r = client.post("/v1/jobs", headers=alice, json={**uploaded, "command": "rm -rf /"})
    assert r.status_code == 422 and "command" in r.json()["error"]["message"]
    r = client.post("/v1/jobs", headers=alice, json={**uploaded, "device": "tpu"})
    assert r.status_code == 422
    r = client.post("/v1/jobs", headers=alice, json={**uploaded, "device": "cuda"})
    assert r.status_code == 409 and r.json()["error"]["code"] == "device_unavailable"


def test_static_quantization_needs_a_dataset(client, alice, uploaded) -> None:
    r = client.post(
        "/v1/jobs",
        headers=alice,
        json={"model_id": uploaded["model_id"], "steps": [{"op": "quantize", "method": "int8_static"}]},
    )
    assert r.status_code == 422 and r.json()["error"]["code"] == "dataset_required"
    r = client.post("/v1/jobs", headers=alice, json={"model_id": uploaded["model_id"]})
    assert r.status_code == 422 and r.json()["error"]["code"] == "dataset_required"


def test_unknown_ids_are_404(client, alice, uploaded) -> None:
    r = client.post("/v1/jobs", headers=alice, json={"model_id": "mdl_nope"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = client.post("/v1/jobs", headers=alice, json={**uploaded, "dataset_id": "dst_nope"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "dataset_not_found"


def test_dataset_that_does_not_fit_the_model_is_refused(client, alice, uploaded) -> None:
    buf = io.BytesIO()
    np.savez(buf, pixels=np.zeros((4, 1, 8, 8), np.float32))
    d = client.post("/v1/datasets", headers=alice, files={"file": ("d.npz", buf.getvalue())}).json()
    r = client.post("/v1/jobs", headers=alice, json={"model_id": uploaded["model_id"], "dataset_id": d["id"]})
    assert r.status_code == 422 and r.json()["error"]["code"] == "dataset_mismatch"
    assert "input" in r.json()["error"]["message"]
    buf = io.BytesIO()
    np.savez(buf, input=np.zeros((4, 3, 8, 8), np.float32))
    d = client.post("/v1/datasets", headers=alice, files={"file": ("d.npz", buf.getvalue())}).json()
    r = client.post("/v1/jobs", headers=alice, json={"model_id": uploaded["model_id"], "dataset_id": d["id"]})
    assert r.status_code == 422 and r.json()["error"]["code"] == "dataset_mismatch"


def test_capabilities_list_formats_and_methods(client, alice) -> None:
    caps = client.get("/v1/capabilities", headers=alice).json()
    assert set(caps["formats"]) == {"onnx", "pt2", "torchscript", "hf", "squeeze"}
    assert caps["formats"]["squeeze"]["output_only"] is True  # produced by encode/squeeze, never uploaded
    assert caps["methods"]["onnx"]["quantize"]["int8_static"]["needs_dataset"] is True
    assert caps["methods"]["onnx"]["encode"]["squeeze"]["produces"] == "squeeze"
    assert caps["methods"]["pt2"]["prune"]["magnitude"]["needs_dataset"] is False


def test_cancel_and_listing_by_status(client, alice, uploaded) -> None:
    ids = [
        client.post("/v1/jobs", headers=alice, json={**uploaded, "evaluation": {"batch_size": 8 + i}}).json()["id"]
        for i in range(3)
    ]
    r = client.post(f"/v1/jobs/{ids[0]}/cancel", headers=alice)
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    assert r.json()["error"]["code"] == "cancelled"
    queued = client.get("/v1/jobs", headers=alice, params={"status": "queued"}).json()["items"]
    assert [j["id"] for j in queued] == ids[:0:-1]
    r = client.get("/v1/jobs", headers=alice, params={"status": "exploded"})
    assert r.status_code == 422


def test_model_in_use_cannot_be_deleted(client, alice, uploaded) -> None:
    job = client.post("/v1/jobs", headers=alice, json=uploaded).json()
    r = client.delete(f"/v1/models/{uploaded['model_id']}", headers=alice)
    assert r.status_code == 409 and r.json()["error"]["code"] == "model_in_use"
    client.post(f"/v1/jobs/{job['id']}/cancel", headers=alice)
    assert client.delete(f"/v1/models/{uploaded['model_id']}", headers=alice).status_code == 204
    # The finished job keeps its record.
    assert client.get(f"/v1/jobs/{job['id']}", headers=alice).json()["status"] == "cancelled"


def test_pt2_model_accepts_its_methods(client, alice) -> None:
    m = client.post("/v1/models", headers=alice, files={"file": ("m.pt2", digits_pt2_bytes())}).json()
    r = client.post(
        "/v1/jobs",
        headers=alice,
        json={"model_id": m["id"], "steps": [{"op": "quantize", "method": "int8_dynamic"}]},
    )
    assert r.status_code == 202, r.text


def test_webhooks_are_refused_while_not_configured(client, alice, uploaded) -> None:
    r = client.post("/v1/jobs", headers=alice, json={**uploaded, "notify_url": "https://ci.example.com/hook"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "webhooks_disabled"
