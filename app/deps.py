"""FastAPI dependencies as ``Annotated`` aliases: ``SessionDep``, ``CurrentUser``, ``StoreDep``, ``SettingsDep``."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from app.auth.service import authenticate
from app.config import Settings, get_settings
from app.db import SESSION_SLOTS, get_sessionmaker
from app.errors import Unauthorized
from app.storage import ArtifactStore, get_store
from app.tables import User


def get_session() -> Iterator[Session]:
    session = get_sessionmaker()()
    try:
        yield session
    finally:
        session.close()


# A request checks a connection out in one thread-pool step (the key check) and holds it until its session
# closes, waiting for a thread between steps. Once more requests held connections than the pool had, every thread
# could be blocked in the pool's checkout while the holders waited for a thread: nothing moved until the pool
# timeout (30 s), then 500s (200 clients polling jobs were enough). So at most SESSION_SLOTS requests have a
# session at once (the others wait in the event loop, holding neither a thread nor a connection), and the session
# closes when the route function returns, not after a download or an event stream has been sent.
SessionDep = Annotated[Session, Depends(get_session, scope="function", max_concurrency=SESSION_SLOTS)]
SettingsDep = Annotated[Settings, Depends(get_settings)]


def _store() -> ArtifactStore:
    return get_store()


StoreDep = Annotated[ArtifactStore, Depends(_store)]


def current_user(request: Request, session: SessionDep) -> User:
    """The caller, from ``Authorization: Bearer <key>``. Keys in query strings are not accepted."""
    header = request.headers.get("authorization")
    if not header:
        raise Unauthorized("send an API key as 'Authorization: Bearer <key>'", code="missing_api_key")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("send an API key as 'Authorization: Bearer <key>'", code="invalid_api_key")
    user = authenticate(session, token.strip())
    request.state.user_id = user.id
    return user


CurrentUser = Annotated[User, Depends(current_user)]
