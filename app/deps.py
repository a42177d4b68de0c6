"""FastAPI dependencies as ``Annotated`` aliases: ``SessionDep``, ``CurrentUser``, ``StoreDep``, ``SettingsDep``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from app.auth.service import authenticate, recently_authenticated
from app.config import Settings, get_settings
from app.db import SESSION_SLOTS, get_sessionmaker
from app.errors import Unauthorized
from app.storage import ArtifactStore, get_store
from app.tables import User


async def get_session() -> AsyncIterator[Session]:
    # Made on the event loop: a Session connects only when first used (in the route's thread), so a request
    # that never touches the database (a cached key, a 404 for a malformed id) costs no thread hop for it.
    session = get_sessionmaker()()
    try:
        yield session
    finally:
        if session.in_transaction():  # it holds a connection: closing rolls back over the network
            await run_in_threadpool(session.close)
        else:
            session.close()


# A request used to check a connection out in one thread-pool step (the key check) and hold it until its session
# closed, waiting for a thread between steps. Once more requests held connections than the pool had, every thread
# could be blocked in the pool's checkout while the holders waited for a thread: nothing moved until the pool
# timeout (30 s), then 500s (200 clients polling jobs were enough). So at most SESSION_SLOTS requests have a
# session at once (the others wait in the event loop, holding neither a thread nor a connection), and the session
# closes when the route function returns, not after a download or an event stream has been sent. Code that takes
# a connection and gives it back within one thread step (the key check below, GET /v1/jobs/{id}, event streams)
# needs no slot: it never holds a connection while waiting for a thread, so it only queues for the connections
# the slots leave free.
SessionDep = Annotated[Session, Depends(get_session, scope="function", max_concurrency=SESSION_SLOTS)]
SettingsDep = Annotated[Settings, Depends(get_settings)]


def _store() -> ArtifactStore:
    return get_store()


StoreDep = Annotated[ArtifactStore, Depends(_store)]


def _check_key(token: str) -> User:
    with get_sessionmaker()() as session:  # checked out and given back in this one thread step
        return authenticate(session, token)


async def current_user(request: Request) -> User:
    """The caller, from ``Authorization: Bearer <key>``. Keys in query strings are not accepted.

    A key that passed the database check less than ``auth_cache_s`` ago is accepted without a database read
    (see app.auth.service); otherwise it is checked on a thread, in a session of its own.
    """
    header = request.headers.get("authorization")
    if not header:
        raise Unauthorized("send an API key as 'Authorization: Bearer <key>'", code="missing_api_key")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized("send an API key as 'Authorization: Bearer <key>'", code="invalid_api_key")
    user = recently_authenticated(token) or await run_in_threadpool(_check_key, token)
    request.state.user_id = user.id
    return user


CurrentUser = Annotated[User, Depends(current_user)]
