"""Enumerate the app's API routes, descending into included routers."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any


def api_routes(routes: Iterable[Any]) -> Iterator[Any]:
    """Every APIRoute; FastAPI keeps included routers as separate route objects with ``original_router``."""
    from fastapi.routing import APIRoute

    for route in routes:
        if hasattr(route, "original_router"):
            yield from api_routes(route.original_router.routes)
        elif isinstance(route, APIRoute):
            yield route
