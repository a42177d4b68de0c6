"""Keyset pagination, newest first: the cursor is the (created_at, id) of the last row seen, opaque to clients."""

from __future__ import annotations

import base64
import json
from datetime import datetime
from typing import Any

from sqlalchemy import Select, tuple_

from app.errors import BadRequest
from app.tables import could_be_id


def encode_cursor(created_at: datetime, row_id: str) -> str:
    raw = json.dumps([created_at.isoformat(), row_id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        ts, row_id = json.loads(raw)
        decoded = datetime.fromisoformat(ts), str(row_id)
    except Exception as exc:
        raise BadRequest("invalid cursor", code="invalid_cursor") from exc
    if not could_be_id(decoded[1]):  # e.g. NUL, which PostgreSQL refuses with an error (a 500, not a 400)
        raise BadRequest("invalid cursor", code="invalid_cursor")
    return decoded


def paginate(stmt: Select[Any], table: Any, *, limit: int, cursor: str | None) -> Select[Any]:
    """Order ``stmt`` newest first and start after ``cursor``; fetch ``limit + 1`` to know if more exist."""
    if cursor:
        ts, row_id = decode_cursor(cursor)
        stmt = stmt.where(tuple_(table.created_at, table.id) < tuple_(ts, row_id))
    return stmt.order_by(table.created_at.desc(), table.id.desc()).limit(limit + 1)


def next_cursor(rows: list[Any], limit: int) -> tuple[list[Any], str | None]:
    if len(rows) > limit:
        rows = rows[:limit]
        return rows, encode_cursor(rows[-1].created_at, rows[-1].id)
    return rows, None
