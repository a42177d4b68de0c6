"""One error hierarchy, one error body: ``{"error": {"code", "message", "details"}}`` for every failure.

Services raise these; ``app.main`` turns them (and FastAPI's validation errors) into that body.
"""

from __future__ import annotations

from typing import Any


class SqueezeError(Exception):
    """Base of every error the API answers with. ``code`` is machine-readable and stable."""

    status_code: int = 400
    code: str = "bad_request"

    def __init__(self, message: str, *, code: str | None = None, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.details = details or {}


class BadRequest(SqueezeError):
    status_code = 400
    code = "bad_request"


class Unauthorized(SqueezeError):
    status_code = 401
    code = "unauthorized"


class Forbidden(SqueezeError):
    status_code = 403
    code = "forbidden"


class NotFound(SqueezeError):
    status_code = 404
    code = "not_found"


class Conflict(SqueezeError):
    status_code = 409
    code = "conflict"


class PayloadTooLarge(SqueezeError):
    status_code = 413
    code = "payload_too_large"


class InvalidUpload(SqueezeError):
    """An uploaded file is not what it claims to be, or is unsafe. Nothing of it is kept."""

    status_code = 422
    code = "invalid_upload"


class InvalidSpec(SqueezeError):
    """A job spec is well-formed JSON but cannot run: the message says what to change."""

    status_code = 422
    code = "invalid_spec"


class RangeNotSatisfiable(SqueezeError):
    status_code = 416
    code = "range_not_satisfiable"


class TooManyRequests(SqueezeError):
    status_code = 429
    code = "too_many_requests"


class InsufficientStorage(SqueezeError):
    status_code = 507
    code = "storage_full"


class ServiceUnavailable(SqueezeError):
    status_code = 503
    code = "service_unavailable"


def error_body(code: str, message: str, details: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "details": details or {}}}
