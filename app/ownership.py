"""Rows owned by users: another user's row is indistinguishable from a missing one (404); admins see all."""

from __future__ import annotations

from typing import Any, TypeVar

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.errors import NotFound
from app.pagination import next_cursor, paginate
from app.tables import User, could_be_id

R = TypeVar("R")


def get_owned(session: Session, table: type[R], row_id: str, user: User, what: str) -> R:
    """The row, if ``user`` may see it; 404 ``<what>_not_found`` otherwise (unknown, malformed, or not theirs)."""
    row: Any = session.get(table, row_id) if could_be_id(row_id) else None
    if row is None or (row.owner_id != user.id and not user.is_admin):
        raise NotFound(f"{what} {row_id!r} not found", code=f"{what}_not_found")
    return row


def list_owned(
    session: Session, table: Any, *, user: User, limit: int, cursor: str | None, where: tuple[Any, ...] = ()
) -> tuple[list[Any], str | None]:
    """A page of the rows ``user`` may see, newest first, and the cursor of the next page."""
    stmt = select(table).where(*where)
    if not user.is_admin:
        stmt = stmt.where(table.owner_id == user.id)
    return next_cursor(list(session.scalars(paginate(stmt, table, limit=limit, cursor=cursor))), limit)
