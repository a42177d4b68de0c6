"""Accuracy-aware search through the real API and a real Celery worker (PostgreSQL, Redis)."""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import uuid
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort

from squeeze.loader import load_onnx
from tests.e2e.conftest import Deployment
from tests.support.models import digits_npz_bytes, digits_onnx_bytes
from tests.support.service import wait_for, wait_job

# Trials of a search run in parallel across workers; each job computes with the threads its worker gives it.
WORKER_ARGS = ("--threads", "1")


def _upload(client: httpx.Client, path: str, data: bytes, filename: str) -> dict[str, Any]:
    r = client.post(path, files={"file": (filename, data)})
    assert r.status_code == 201, r.text
    return r.json()


def _accuracy_of_onnx(body: bytes) -> float:
    arrays = np.load(io.BytesIO(digits_npz_bytes()))
    session = ort.InferenceSession(body, providers=["CPUExecutionProvider"])
    logits = np.concatenate(
        [session.run(None, {"input": arrays["input"][i : i + 64]})[0] for i in range(0, len(arrays["input"]), 64)]
    )
    return float((logits.argmax(1) == arrays["labels"]).mean())


def _wait_search(client: httpx.Client, search_id: str, timeout: float = 600) -> dict[str, Any]:
    def finished() -> dict[str, Any] | None:
        body = client.get(f"/v1/searches/{search_id}").json()
        return body if body["job"]["status"] in ("succeeded", "failed", "cancelled") else None

    return wait_for(finished, timeout=timeout, interval=0.5, what=f"search {search_id} to finish")


def _digits_user(deployment: Deployment, *, labels: bool = True) -> tuple[httpx.Client, str, str]:
    """A new user with the digits CNN and its held-out digits uploaded: (client, model id, dataset id)."""
    client = deployment.client(deployment.new_key(f"search-{uuid.uuid4().hex[:6]}"))
    model = _upload(client, "/v1/models", digits_onnx_bytes(), "digits.onnx")
    dataset = _upload(client, "/v1/datasets", digits_npz_bytes(labels=labels), "digits.npz")
    return client, model["id"], dataset["id"]


def _run_search(client: httpx.Client, timeout: float = 600, **spec: Any) -> dict[str, Any]:
    """Submit a search (202 expected) and wait for its end."""
    r = client.post("/v1/searches", json=spec)
    assert r.status_code == 202, r.text
    return _wait_search(client, r.json()["job"]["id"], timeout=timeout)


def test_search_with_a_one_point_budget_beats_every_single_recipe_and_keeps_its_promise(
    deployment: Deployment, tmp_path: Path
) -> None:
    client, model_id, dataset_id = _digits_user(deployment)
    r = client.post(
        "/v1/searches",
        json={
            "model_id": model_id,
            "dataset_id": dataset_id,
            "constraint": {"max_accuracy_drop": 0.01},
            "objective": "size",
            "max_trials": 16,
        },
    )
    assert r.status_code == 202, r.text
    search_id = r.json()["job"]["id"]
    assert r.json()["job"]["kind"] == "search"
    search = _wait_search(client, search_id)
    assert search["job"]["status"] == "succeeded", search["job"]["error"]
    result = search["result"]
    best = result["best"]
    assert best is not None and best["meets_constraint"] and best["accuracy_drop"] <= 0.01
    assert result["closest"] is None and "Best meeting max_accuracy_drop 0.01" in result["statement"]

    # What a person would pick by hand: each quantization alone, as ordinary jobs.
    hand: dict[str, int] = {}
    for method in ("int8_dynamic", "int8_static", "fp16"):
        job = client.post(
            "/v1/jobs",
            json={"model_id": model_id, "dataset_id": dataset_id, "steps": [{"method": method}]},
        ).json()
        job = wait_job(client, job["id"])
        base, res = job["metrics"]["baseline"], job["metrics"]["result"]
        if base["accuracy"] - res["accuracy"] <= 0.01:
            hand[method] = res["size_bytes"]
    assert hand, "no single recipe met the budget"
    assert best["size_bytes"] <= min(hand.values()), (best, hand)

    # Every trial is an ordinary job of this user, pointing at its search; the front is non-dominated.
    trials = [t for t in search["trials"] if t["job_id"]]
    assert len(trials) <= 16 and search["trials_done"] == len(trials)
    for t in trials[:3]:
        job = client.get(f"/v1/jobs/{t['job_id']}").json()
        assert job["parent_id"] == search_id and job["kind"] == "compress"
        # Measured with the one thread `squeeze worker --threads 1` gave it, and the report says so.
        assert job["metrics"]["result"]["latency_ms"]["threads"] == 1
    front = result["pareto_front"]
    assert best["job_id"] in {p["job_id"] for p in front}
    for p in front:
        assert not any(
            q["size_bytes"] <= p["size_bytes"]
            and q["accuracy"] >= p["accuracy"]
            and q != p
            and (q["size_bytes"] < p["size_bytes"] or q["accuracy"] > p["accuracy"])
            for q in trials
            if q["status"] == "succeeded"
        )

    # The best model is the search job's artifact, and it keeps the promise on the evaluation data.
    job = client.get(f"/v1/jobs/{search_id}").json()
    art = next(a for a in job["artifacts"] if a["kind"] == "model")
    body = client.get(f"/v1/artifacts/{art['id']}/download").content
    assert hashlib.sha256(body).hexdigest() == art["sha256"] and len(body) == best["size_bytes"]
    if art["format"] == "squeeze":  # a pruned winner is stored sparsely: decode it as a user would
        path = tmp_path / "best.sqz"
        path.write_bytes(body)
        body = load_onnx(path).SerializeToString()
    assert art["format"] in ("onnx", "squeeze")
    assert _accuracy_of_onnx(body) >= result["baseline"]["accuracy"] - 0.01

    # Progress was visible while it ran: the events stream has the trials counted.
    events = client.get(f"/v1/jobs/{search_id}/events").text
    assert "trials_done" in events and "event: state" in events


def test_search_with_an_impossible_budget_returns_the_closest_miss_and_by_how_much(deployment: Deployment) -> None:
    client, model_id, dataset_id = _digits_user(deployment)
    search = _run_search(
        client,
        model_id=model_id,
        dataset_id=dataset_id,
        constraint={"min_cosine": 1.0},
        space={"quantize": ["int8_dynamic", "int8_static"], "sparsity": [0.5]},
    )
    assert search["job"]["status"] == "succeeded"
    result = search["result"]
    assert result["best"] is None
    closest = result["closest"]
    cosines = [t["cosine"] for t in search["trials"] if t["status"] == "succeeded"]
    assert closest["cosine"] == max(cosines) < 1.0
    assert "No trial met min_cosine 1" in result["statement"]
    assert f"missed it by {1.0 - closest['cosine']:.4f}" in result["statement"]


def test_search_refuses_what_cannot_be_searched(deployment: Deployment) -> None:
    client, model_id, unlabelled_id = _digits_user(deployment, labels=False)
    ids = {"model_id": model_id, "dataset_id": unlabelled_id}
    r = client.post("/v1/searches", json={**ids, "constraint": {"max_accuracy_drop": 0.01}})
    assert r.status_code == 422 and r.json()["error"]["code"] == "labels_required"
    r = client.post(
        "/v1/searches", json={**ids, "constraint": {"min_cosine": 0.99}, "space": {"quantize": ["int3_magic"]}}
    )
    assert r.status_code == 422 and r.json()["error"]["code"] == "method_not_supported"
    r = client.post("/v1/searches", json={**ids, "constraint": {}})
    assert r.status_code == 422


def test_a_spent_time_budget_stops_the_search_with_what_it_measured(deployment: Deployment) -> None:
    client, model_id, dataset_id = _digits_user(deployment)
    search = _run_search(
        client,
        timeout=300,
        model_id=model_id,
        dataset_id=dataset_id,
        constraint={"max_accuracy_drop": 0.01},
        time_budget_s=10,
        # One worker, a few seconds a trial: the 10 s budget runs out with trials still queued.
        space={"quantize": ["int8_dynamic", "int8_static", "fp16", "int8_weight_only"]},
    )
    assert search["job"]["status"] == "succeeded", search["job"]["error"]
    statuses = [t["status"] for t in search["trials"] if t["job_id"]]
    assert "cancelled" in statuses, statuses  # unfinished trials were stopped when the budget was spent
    finished = [t for t in search["trials"] if t["status"] == "succeeded"]
    started = dt.datetime.fromisoformat(search["job"]["started_at"])
    assert (dt.datetime.fromisoformat(search["job"]["finished_at"]) - started).total_seconds() < 120
    if finished:  # the result stands on what was measured before the budget ran out
        assert search["result"]["best"] is not None or search["result"]["closest"] is not None
