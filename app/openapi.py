"""The OpenAPI document: FastAPI's, plus what FastAPI cannot infer from these routes.

- The key. ``current_user`` reads ``Authorization`` by hand (to answer with this API's own error codes), so FastAPI
  does not know which routes need it: every operation that documents a 401 is marked with the bearer scheme, and
  generated clients then send the key.
- Operation ids are the route functions' names (``upload_model``, ``get_job``), so a generated client's methods
  read as the API does rather than ``upload_model_v1_models_post``.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.routing import APIRoute

SECURITY_SCHEME = "apiKey"


def operation_id(route: APIRoute) -> str:
    """The route function's name; names are unique across the app (tests/api/test_openapi.py checks)."""
    return route.name


def install_openapi(app: FastAPI) -> None:
    """Serve FastAPI's document with the API-key scheme declared and applied."""

    def openapi() -> dict[str, Any]:
        doc = FastAPI.openapi(app)  # built once and cached on the app; the additions below are idempotent
        schemes = doc.setdefault("components", {}).setdefault("securitySchemes", {})
        schemes[SECURITY_SCHEME] = {
            "type": "http",
            "scheme": "bearer",
            "description": "An API key (`squeeze users create NAME` prints one), as `Authorization: Bearer <key>`. "
            "Keys in query strings are refused.",
        }
        for operations in doc.get("paths", {}).values():
            for op in operations.values():
                if "401" in op.get("responses", {}):
                    op["security"] = [{SECURITY_SCHEME: []}]
        return doc

    app.openapi = openapi  # type: ignore[method-assign]
