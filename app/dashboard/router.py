"""The dashboard: one HTML page, one script, one stylesheet, served by the API itself (no build chain).

The page holds no data and no key of its own: it calls the ``/v1`` API with the key the user pastes (kept in
``sessionStorage``, sent as ``Authorization: Bearer``), so it can show and do exactly what that key can. The
routes are plain Starlette routes, outside the OpenAPI document: they are not part of the API.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

from fastapi import APIRouter
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

STATIC = Path(__file__).with_name("static")

# A fixed list: the requested name is a key into it, never a path.
ASSETS = {
    "app.js": "text/javascript; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
}

# Nothing inline and nothing from elsewhere: a model name that smuggled markup past the escaping still could not
# run. Charts are SVG built with DOM calls; downloads are blob: URLs made by the script.
CSP = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data: blob:",
        "connect-src 'self'",
        "form-action 'none'",
        "base-uri 'none'",
        "frame-ancestors 'none'",
    ]
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}

router = APIRouter()


@cache
def _read(name: str) -> bytes:
    return (STATIC / name).read_bytes()


async def page(request: Request) -> Response:
    """The dashboard page."""
    return Response(_read("index.html"), media_type="text/html; charset=utf-8", headers=HEADERS)


async def asset(request: Request) -> Response:
    """The page's script or stylesheet."""
    name = request.path_params["name"]
    if name not in ASSETS:
        raise HTTPException(404, "no such dashboard file")
    return Response(_read(name), media_type=ASSETS[name], headers=HEADERS)


async def root(request: Request) -> Response:
    return RedirectResponse("/dashboard", status_code=307)


router.add_route("/", root, methods=["GET"], include_in_schema=False)
router.add_route("/dashboard", page, methods=["GET"], include_in_schema=False)
router.add_route("/dashboard/{name}", asset, methods=["GET"], include_in_schema=False)
