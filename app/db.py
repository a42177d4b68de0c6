"""Engine, sessions and the declarative base (with a naming convention Alembic can rely on)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import Any

from sqlalchemy import Connection, Engine, MetaData, create_engine, event, exc
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker

from app.config import get_settings

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


# Connections per process, for both databases: the API admits at most SESSION_SLOTS requests to a session at
# once (app.deps), a few under this, so that each admitted request finds a connection. All of them stay pooled:
# with overflow connections (10 kept + 20 overflow, as before), a busy API closed a connection at every checkin
# beyond the tenth and opened a new one at the next checkout (a PostgreSQL backend started per request). A
# process opens only the connections it uses at once (a worker one or two).
POOL_SIZE, MAX_OVERFLOW = 30, 0
SESSION_SLOTS = POOL_SIZE + MAX_OVERFLOW - 4  # 4 for the reconciler, event streams, /readyz and /metrics


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": 30},
            pool_size=POOL_SIZE,
            max_overflow=MAX_OVERFLOW,
        )

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record) -> None:  # type: ignore[no-untyped-def]
            # WAL lets the API read while a worker writes; busy_timeout waits instead of "database is locked".
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

        return engine
    engine = create_engine(url, pool_size=POOL_SIZE, max_overflow=MAX_OVERFLOW)
    _ping_after_idle(engine)
    return engine


# A pooled connection idle this long is pinged before use. pool_pre_ping pinged on every checkout: one more round
# trip per request, as much as the query of a status poll. A connection in use a moment ago is as good as a ping;
# a database restart takes longer than this, so every connection that lived through one is pinged (and replaced).
PING_AFTER_IDLE_S = 1.0


def _ping_after_idle(engine: Engine) -> None:
    @event.listens_for(engine, "checkin")
    def _idle_from_now(_dbapi_conn: Any, record: Any) -> None:
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _ping_if_idle(dbapi_conn: Any, record: Any, _proxy: Any) -> None:
        idle_since = record.info.get("idle_since")
        if idle_since is None or time.monotonic() - idle_since < PING_AFTER_IDLE_S:
            return  # new, or in use a moment ago
        try:
            engine.dialect.do_ping(dbapi_conn)
        except Exception as e:
            # SQLAlchemy's documented way to say "dead": the pool drops it and checks out a fresh connection.
            raise exc.DisconnectionError(f"pooled connection failed its ping: {type(e).__name__}") from e


@lru_cache
def get_engine() -> Engine:
    return make_engine(get_settings().resolved_database_url)


@lru_cache
def get_sessionmaker() -> sessionmaker[Session]:
    return sessionmaker(bind=get_engine(), expire_on_commit=False)


@contextmanager
def read_connection() -> Iterator[Connection]:
    """A pooled connection in autocommit mode, for a read that is one statement (atomic by itself): no BEGIN and
    ROLLBACK round trips around it, as a session would send."""
    with get_engine().connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        yield conn


@contextmanager
def session_scope() -> Iterator[Session]:
    """One transaction: commit on success, roll back on error."""
    session = get_sessionmaker()()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
