"""The OpenAPI document is complete enough to build on: every operation is described, names its errors with the
one error envelope, says which need the key, and shows examples of the JSON it takes and returns."""

from __future__ import annotations

import re
from typing import Any

METHODS = {"get", "post", "put", "patch", "delete"}
OPEN = {"/healthz", "/readyz"}


def _operations(doc: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [(m.upper(), path, op) for path, ops in doc["paths"].items() for m, op in ops.items() if m in METHODS]


def _resolve(doc: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        schema = doc["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    return schema


def _has_example(doc: dict[str, Any], media: dict[str, Any]) -> bool:
    if media.get("example") is not None or media.get("examples"):
        return True
    schema = media.get("schema") or {}
    return bool(schema.get("examples") or _resolve(doc, schema).get("examples"))


def test_every_operation_is_described_and_has_a_readable_unique_id(client) -> None:
    doc = client.get("/openapi.json").json()
    ids = []
    for method, path, op in _operations(doc):
        assert op.get("summary") and op.get("description"), (method, path)
        assert re.fullmatch(r"[a-z][a-z0-9_]*", op["operationId"]), (method, path, op["operationId"])
        ids.append(op["operationId"])
    assert len(ids) == len(set(ids)) >= 20, sorted(ids)
    assert {"upload_model", "submit_job", "get_job", "list_models"} <= set(ids)


def test_every_error_response_is_the_error_envelope(client) -> None:
    doc = client.get("/openapi.json").json()
    envelope = doc["components"]["schemas"]["ErrorResponse"]
    assert envelope["examples"] and set(envelope["examples"][0]["error"]) == {"code", "message", "details"}
    checked = 0
    for method, path, op in _operations(doc):
        errors = {code: r for code, r in op["responses"].items() if code.isdigit() and int(code) >= 400}
        assert errors or path in OPEN, (method, path)
        for code, response in errors.items():
            schema = response["content"]["application/json"]["schema"]
            assert schema["$ref"] == "#/components/schemas/ErrorResponse", (method, path, code)
            assert response["description"], (method, path, code)
            checked += 1
        if "{" in path:
            assert "404" in errors, (method, path)  # an id that is unknown or another user's
    assert checked >= 70


def test_operations_that_need_the_key_declare_it(client) -> None:
    doc = client.get("/openapi.json").json()
    scheme = doc["components"]["securitySchemes"]["apiKey"]
    assert scheme["type"] == "http" and scheme["scheme"] == "bearer"
    for method, path, op in _operations(doc):
        if path in OPEN:
            assert "security" not in op and "401" not in op["responses"], (method, path)
        else:
            assert op["security"] == [{"apiKey": []}] and "401" in op["responses"], (method, path)
    # The key is really required where declared, and really optional where not.
    assert client.get("/v1/models").status_code == 401
    assert client.get("/readyz").status_code == 200


def test_json_bodies_and_results_have_examples(client) -> None:
    doc = client.get("/openapi.json").json()
    missing = []
    for method, path, op in _operations(doc):
        body = op.get("requestBody", {}).get("content", {}).get("application/json")
        if body is not None and not _has_example(doc, body):
            missing.append(f"{method} {path} request")
        for code, response in op["responses"].items():
            media = response.get("content", {}).get("application/json")
            if code.startswith("2") and media is not None and not _has_example(doc, media):
                missing.append(f"{method} {path} {code}")
    # Fix: `model_config = ConfigDict(json_schema_extra={"examples": [...]})` on the schema (as in
    # app/jobs/schemas.py), or `responses={200: {"content": {"application/json": {"example": ...}}}}` on the route.
    assert not missing, f"JSON without an example: {missing}"
    # Examples are real instances of their schemas (a client built from them would parse them).
    from app.datasets.schemas import DatasetsPublic
    from app.jobs.schemas import JobsPublic
    from app.models.schemas import ModelsPublic
    from app.responses import ErrorResponse
    from app.workers.schemas import WorkersPublic

    for model in (ModelsPublic, DatasetsPublic, JobsPublic, WorkersPublic, ErrorResponse):
        for example in model.model_json_schema()["examples"]:
            model.model_validate(example)
