"""A job's train_dataset_id: refused at the door unless a training step uses it, owned like dataset_id, checked
against the model's inputs, and protected from deletion while a job (or search) trains on it."""

from __future__ import annotations

import io

import numpy as np
import pytest

from tests.support.models import digits_arrays, digits_npz_bytes, digits_onnx_bytes, digits_pt2_bytes

FINETUNE = [{"op": "prune", "method": "magnitude", "sparsity": 0.9}, {"op": "finetune", "method": "distill"}]


def _train_npz(labels: bool = True, input_name: str = "input") -> bytes:
    x_train, y_train, _, _ = digits_arrays()
    buf = io.BytesIO()
    np.savez(buf, **{input_name: x_train[:64]}, **({"labels": y_train[:64]} if labels else {}))
    return buf.getvalue()


def _upload(client, headers: dict[str, str], path: str, name: str, body: bytes) -> str:
    r = client.post(path, headers=headers, files={"file": (name, body)})
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


@pytest.fixture
def pt2(client, alice) -> dict[str, str]:
    return {
        "model_id": _upload(client, alice, "/v1/models", "m.pt2", digits_pt2_bytes()),
        "dataset_id": _upload(client, alice, "/v1/datasets", "held-out.npz", digits_npz_bytes()),
        "train_dataset_id": _upload(client, alice, "/v1/datasets", "train.npz", _train_npz()),
    }


def _refusal(r, status: int, code: str) -> dict:
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code
    return r.json()["error"]


def test_a_job_that_trains_accepts_a_train_dataset_and_shows_it(client, alice, pt2) -> None:
    r = client.post("/v1/jobs", headers=alice, json={**pt2, "steps": FINETUNE})
    assert r.status_code == 202, r.text
    assert r.json()["spec"]["train_dataset_id"] == pt2["train_dataset_id"]
    assert r.json()["spec"]["dataset_id"] == pt2["dataset_id"]
    # Labels are needed in the data that trains: finetune/labels with labelled train data and an unlabelled
    # evaluation set is accepted.
    unlabelled = _upload(client, alice, "/v1/datasets", "u.npz", digits_npz_bytes(labels=False))
    labels = [FINETUNE[0], {"op": "finetune", "method": "labels"}]
    r = client.post("/v1/jobs", headers=alice, json={**pt2, "dataset_id": unlabelled, "steps": labels})
    assert r.status_code == 202, r.text


def test_refusals_say_what_to_change(client, alice, pt2) -> None:
    alone = {k: v for k, v in pt2.items() if k != "dataset_id"}
    err = _refusal(client.post("/v1/jobs", headers=alice, json={**alone, "steps": FINETUNE}), 422, "dataset_required")
    assert "dataset_id" in err["message"] and err["details"]["field"] == "train_dataset_id"

    no_training = [{"op": "prune", "method": "magnitude", "sparsity": 0.5}, {"op": "quantize", "method": "int8_static"}]
    err = _refusal(
        client.post("/v1/jobs", headers=alice, json={**pt2, "steps": no_training}), 422, "train_dataset_unused"
    )
    assert "finetune/distill" in err["message"] and "prune/gradient" in err["message"]
    assert err["details"]["training_steps"] == [
        "prune/gradient",
        "prune/regularized",
        "finetune/distill",
        "finetune/labels",
    ]

    err = _refusal(
        client.post("/v1/jobs", headers=alice, json={**pt2, "train_dataset_id": "dst_nope", "steps": FINETUNE}),
        404,
        "dataset_not_found",
    )
    assert "train dataset" in err["message"] and err["details"]["field"] == "train_dataset_id"

    unlabelled = _upload(client, alice, "/v1/datasets", "u.npz", _train_npz(labels=False))
    labels = [FINETUNE[0], {"op": "finetune", "method": "labels"}]
    err = _refusal(
        client.post("/v1/jobs", headers=alice, json={**pt2, "train_dataset_id": unlabelled, "steps": labels}),
        422,
        "labels_required",
    )
    assert "train dataset" in err["message"] and err["details"] == {"step": 1, "field": "train_dataset_id"}

    misnamed = _upload(client, alice, "/v1/datasets", "x.npz", _train_npz(input_name="pixels"))
    err = _refusal(
        client.post("/v1/jobs", headers=alice, json={**pt2, "train_dataset_id": misnamed, "steps": FINETUNE}),
        422,
        "dataset_mismatch",
    )
    assert err["details"]["field"] == "train_dataset_id"

    # Training on the evaluation data (the same id, or the same bytes uploaded again) would make "after" a
    # measurement on the training samples.
    again = _upload(client, alice, "/v1/datasets", "copy.npz", digits_npz_bytes())
    for same in (pt2["dataset_id"], again):
        err = _refusal(
            client.post("/v1/jobs", headers=alice, json={**pt2, "train_dataset_id": same, "steps": FINETUNE}),
            422,
            "train_dataset_is_eval_dataset",
        )
        assert "held-out" in err["message"] and err["details"]["field"] == "train_dataset_id"


def test_another_users_dataset_is_not_found(client, alice, bob, pt2) -> None:
    bobs = _upload(client, bob, "/v1/datasets", "train.npz", _train_npz())
    err = _refusal(
        client.post("/v1/jobs", headers=alice, json={**pt2, "train_dataset_id": bobs, "steps": FINETUNE}),
        404,
        "dataset_not_found",
    )
    assert err["details"]["field"] == "train_dataset_id"


def test_a_dataset_a_queued_job_trains_on_cannot_be_deleted(client, alice, pt2) -> None:
    job = client.post("/v1/jobs", headers=alice, json={**pt2, "steps": FINETUNE}).json()
    _refusal(client.delete(f"/v1/datasets/{pt2['train_dataset_id']}", headers=alice), 409, "dataset_in_use")
    client.post(f"/v1/jobs/{job['id']}/cancel", headers=alice)
    assert client.delete(f"/v1/datasets/{pt2['train_dataset_id']}", headers=alice).status_code == 204
    assert client.get(f"/v1/jobs/{job['id']}", headers=alice).json()["spec"]["train_dataset_id"]


def test_searches_take_a_train_dataset_for_their_finetune_trials(client, alice, pt2) -> None:
    search = {**pt2, "constraint": {"max_accuracy_drop": 0.01}}
    r = client.post("/v1/searches", headers=alice, json=search)
    assert r.status_code == 202, r.text
    assert r.json()["spec"]["train_dataset_id"] == pt2["train_dataset_id"]
    _refusal(client.delete(f"/v1/datasets/{pt2['train_dataset_id']}", headers=alice), 409, "dataset_in_use")

    no_finetune = {**search, "space": {"finetune": False}}
    _refusal(client.post("/v1/searches", headers=alice, json=no_finetune), 422, "train_dataset_unused")
    onnx = _upload(client, alice, "/v1/models", "m.onnx", digits_onnx_bytes())
    err = _refusal(
        client.post("/v1/searches", headers=alice, json={**search, "model_id": onnx}), 422, "train_dataset_unused"
    )
    assert "onnx" in err["message"]
    _refusal(
        client.post("/v1/searches", headers=alice, json={**search, "train_dataset_id": "dst_nope"}),
        404,
        "dataset_not_found",
    )
