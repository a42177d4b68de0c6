"""``Idempotency-Key`` on POST /v1/jobs and uploads, as payment APIs do: a retried request gets the resource the
first one created instead of creating another. Keys are per user and per kind of resource."""

from __future__ import annotations

import re
from typing import Any

from fastapi import Header
from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.blobs import release_blob
from app.errors import BadRequest, InvalidSpec
from app.storage import ArtifactStore
from app.tables import IdempotencyKey, User

_KEY = re.compile(r"^[\x21-\x7e]{1,200}$")


def idempotency_key(
    key: str | None = Header(
        None,
        alias="Idempotency-Key",
        description="Any unique string (a UUID): a retry with the same key returns the first request's resource.",
        max_length=200,
        # Documented (so clients and schema-driven tests know it) but checked below, to answer with our own code.
        json_schema_extra={"pattern": _KEY.pattern},
    ),
) -> str | None:
    if key is not None and not _KEY.match(key):
        raise BadRequest("Idempotency-Key must be 1-200 printable ASCII characters", code="invalid_idempotency_key")
    return key


def find(session: Session, *, user: User, scope: str, key: str, request_sha256: str | None) -> str | None:
    """The resource id an earlier request with this key created; 422 if that request was a different one."""
    row = session.scalar(
        select(IdempotencyKey).where(
            IdempotencyKey.owner_id == user.id, IdempotencyKey.scope == scope, IdempotencyKey.key == key
        )
    )
    if row is None:
        return None
    if request_sha256 is not None and row.request_sha256 not in (None, request_sha256):
        raise InvalidSpec(
            "this Idempotency-Key was already used for a different request; use a new key",
            code="idempotency_key_reused",
        )
    return row.resource_id


def remember(
    session: Session, *, user: User, scope: str, key: str, request_sha256: str | None, resource_id: str
) -> str:
    """Record the key in the caller's transaction. If a concurrent request won the race, return its resource."""
    try:
        with session.begin_nested():
            session.add(
                IdempotencyKey(
                    owner_id=user.id, scope=scope, key=key, request_sha256=request_sha256, resource_id=resource_id
                )
            )
    except IntegrityError:
        earlier = find(session, user=user, scope=scope, key=key, request_sha256=request_sha256)
        assert earlier is not None
        return earlier
    return resource_id


def forget_resource(session: Session, *, owner_id: str, scope: str, resource_id: str) -> None:
    """Drop the keys that created a resource being deleted: a retry with one of them then uploads anew.

    Kept, such a key would name a row that no longer exists, and the retry would fail with a 500.
    """
    session.execute(
        delete(IdempotencyKey).where(
            IdempotencyKey.owner_id == owner_id,
            IdempotencyKey.scope == scope,
            IdempotencyKey.resource_id == resource_id,
        )
    )


def replay_upload(session: Session, *, user: User, scope: str, key: str | None, table: Any) -> Any | None:
    """The row an earlier upload with this key created (a retry), or None."""
    if not key:
        return None
    earlier = find(session, user=user, scope=scope, key=key, request_sha256=None)
    return session.get(table, earlier) if earlier is not None else None


def commit_upload(
    session: Session, store: ArtifactStore, *, user: User, scope: str, key: str | None, row: Any, sha256: str
) -> Any:
    """Commit a new upload's row; if a concurrent retry with the same key won, drop ours and return its row."""
    session.add(row)
    session.flush()
    if key:
        winner = remember(session, user=user, scope=scope, key=key, request_sha256=None, resource_id=row.id)
        if winner != row.id:
            session.rollback()
            release_blob(session, store, sha256)
            return session.get(type(row), winner)
    session.commit()
    return row
