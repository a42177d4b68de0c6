"""OpenAPI descriptions of the error envelope, shared by every router."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel


class ErrorDetail(BaseModel):
    code: str
    message: str
    details: dict[str, Any]


class ErrorResponse(BaseModel):
    error: ErrorDetail


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` entries documenting the error body for each status code."""
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
    return {c: {"model": ErrorResponse, "description": text.get(c, "Error")} for c in sorted({401, 422, *codes})}
