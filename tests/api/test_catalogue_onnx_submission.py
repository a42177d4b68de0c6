"""Submission of the ONNX catalogue's steps: what ONNX cannot run is refused at the door with the capability
message, and a step that calibrates on data needs a dataset."""

from __future__ import annotations

from tests.support.models import digits_npz_bytes, digits_onnx_bytes


def test_onnx_catalogue_steps_at_submission(client, alice) -> None:
    model = client.post("/v1/models", headers=alice, files={"file": ("m.onnx", digits_onnx_bytes())}).json()["id"]
    data = client.post("/v1/datasets", headers=alice, files={"file": ("d.npz", digits_npz_bytes())}).json()["id"]
    caps = client.get("/v1/capabilities", headers=alice).json()["methods"]["onnx"]
    assert {"structured", "wanda"} <= set(caps["prune"]) and caps["prune"]["wanda"]["needs_dataset"] is True
    assert {"int8_weight_only", "int4_weight_only"} <= set(caps["quantize"]) and "bf16" not in caps["quantize"]

    # bfloat16: ONNX Runtime's CPU provider has no kernels for it, so it is not offered.
    r = client.post("/v1/jobs", headers=alice, json={"model_id": model, "steps": [{"method": "bf16"}]})
    assert r.status_code == 422 and r.json()["error"]["code"] == "method_not_supported"
    assert "GET /v1/capabilities" in r.json()["error"]["message"]

    r = client.post(
        "/v1/jobs", headers=alice, json={"model_id": model, "steps": [{"method": "wanda", "sparsity": 0.5}]}
    )
    assert r.status_code == 422 and r.json()["error"]["code"] == "dataset_required"

    for step in (
        {"op": "prune", "method": "structured", "sparsity": 0.5, "round_to": 8},
        {"op": "prune", "method": "wanda", "pattern": "2:4"},
        {"op": "quantize", "method": "int4_weight_only", "group_size": 64, "include": ["embedding"]},
        {"op": "quantize", "method": "int8_weight_only"},
    ):
        r = client.post("/v1/jobs", headers=alice, json={"model_id": model, "dataset_id": data, "steps": [step]})
        assert r.status_code == 202, r.text
