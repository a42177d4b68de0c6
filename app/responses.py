"""OpenAPI descriptions of the error envelope, shared by every router."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict


class ErrorDetail(BaseModel):
    code: str
    message: str
    details: dict[str, Any]


class ErrorResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"error": {"code": "model_not_found", "message": "model 'mdl_x' not found", "details": {}}},
            ]
        }
    )

    error: ErrorDetail


# One typical body per status, shown beside each documented error (the code says what to change).
ERROR_EXAMPLES: dict[int, tuple[str, str, dict[str, Any]]] = {
    400: ("invalid_cursor", "invalid cursor", {}),
    401: ("missing_api_key", "send an API key as 'Authorization: Bearer <key>'", {}),
    403: (
        "storage_quota_exceeded",
        "your storage quota of 10737418240 bytes is used up; delete models, datasets or jobs to make room",
        {"quota_bytes": 10737418240},
    ),
    404: ("model_not_found", "model 'mdl_x' not found", {}),
    409: ("model_in_use", "a queued or running job uses this model; cancel it first", {}),
    413: ("payload_too_large", "the upload is larger than the configured limit", {}),
    416: ("range_not_satisfiable", "the range is outside the file", {}),
    422: (
        "validation_error",
        "invalid request: body.steps.0.sparsity: Input should be less than 1",
        {
            "errors": [
                {"loc": ["body", "steps", 0, "sparsity"], "msg": "Input should be less than 1", "type": "less_than"}
            ]
        },
    ),
    429: (
        "too_many_jobs",
        "you have 8 jobs queued or running, the most allowed at once; wait for one to finish",
        {"limit": 8},
    ),
    503: ("service_unavailable", "a dependency is unreachable", {}),
    507: ("storage_full", "the server's storage is full", {}),
}


def errors(*codes: int, auth: bool = True) -> dict[int | str, dict[str, Any]]:
    """``responses=`` entries documenting the error body for each status code (401 and 422 too with ``auth``)."""
    text = {
        400: "Malformed request",
        401: "Missing, malformed or revoked API key",
        404: "Not found (or owned by another user)",
        409: "Conflict with the resource's state",
        403: "Forbidden (e.g. storage quota used up)",
        413: "Upload larger than the configured limit",
        416: "Range not satisfiable",
        422: "Invalid input: the error code says what to change",
        429: "Too many jobs in flight for this user",
        503: "A dependency is unreachable",
        507: "The server's storage is full",
    }
    documented = sorted({401, 422, *codes} if auth else set(codes))
    return {c: {"model": ErrorResponse, "description": text.get(c, "Error"), **_example(c)} for c in documented}


def _example(status: int) -> dict[str, Any]:
    if status not in ERROR_EXAMPLES:
        return {}
    code, message, details = ERROR_EXAMPLES[status]
    return {
        "content": {"application/json": {"example": {"error": {"code": code, "message": message, "details": details}}}}
    }
