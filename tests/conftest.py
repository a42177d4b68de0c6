"""Fixtures on real infrastructure: a fresh PostgreSQL database per test session, Redis as the broker,
local-disk storage in a temporary folder. Tables are emptied between tests; nothing is mocked.

Override the servers with SQUEEZE_TEST_PG (a server URL without database) and SQUEEZE_TEST_REDIS.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import redis
from fastapi.testclient import TestClient

PG_SERVER = os.environ.get("SQUEEZE_TEST_PG", "postgresql://postgres@127.0.0.1:5432")
REDIS_URL = os.environ.get("SQUEEZE_TEST_REDIS", "redis://127.0.0.1:6379/14")
# Queues of this test session only: several sessions (or a developer's server) may share the Redis database.
QUEUE_PREFIX = f"test-{uuid.uuid4().hex[:8]}."


def queue_key(logical: str) -> str:
    """The Redis list holding a logical queue's messages in this test session."""
    return QUEUE_PREFIX + logical


TABLES = ("artifacts", "compression_jobs", "model_uploads", "dataset_uploads", "blobs", "api_keys", "users")


def _reset_caches() -> None:
    from app.config import get_settings
    from app.db import get_engine, get_sessionmaker
    from app.queue import get_celery

    if get_engine.cache_info().currsize:
        get_engine().dispose()
    for f in (get_settings, get_engine, get_sessionmaker, get_celery):
        f.cache_clear()


def _drop_queues() -> None:
    r = redis.Redis.from_url(REDIS_URL)
    keys = list(r.scan_iter(f"{QUEUE_PREFIX}*"))
    if keys:
        r.delete(*keys)


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    """A new, empty PostgreSQL database for this test session; dropped at the end."""
    name = f"squeeze_test_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(f"{PG_SERVER}/postgres", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield f"{PG_SERVER.replace('postgresql://', 'postgresql+psycopg://')}/{name}"
    with psycopg.connect(f"{PG_SERVER}/postgres", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def service_env(pg_database: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """Environment of a production-shaped deployment: PostgreSQL, Redis, local storage; migrated once."""
    data_dir = tmp_path_factory.mktemp("squeeze-data")
    env = {
        "SQUEEZE_DATABASE_URL": pg_database,
        "SQUEEZE_BROKER_URL": REDIS_URL,
        "SQUEEZE_DATA_DIR": str(data_dir),
        "SQUEEZE_QUEUE_PREFIX": QUEUE_PREFIX,
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    _reset_caches()
    from app.migrate import upgrade_database

    upgrade_database()
    yield env
    _reset_caches()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def clean_db(service_env: dict[str, str]) -> Iterator[None]:
    from sqlalchemy import text

    from app.db import get_engine

    yield
    with get_engine().begin() as conn:
        conn.execute(text(f"TRUNCATE {', '.join(TABLES)} CASCADE"))
    _drop_queues()
    # The blob store goes with the rows that referenced it.
    blobs = Path(service_env["SQUEEZE_DATA_DIR"]) / "blobs"
    for child in blobs.iterdir() if blobs.exists() else []:
        if child.name != "tmp":
            shutil.rmtree(child)


@pytest.fixture
def client(clean_db: None) -> Iterator[TestClient]:
    from app.main import create_app

    with TestClient(create_app()) as c:
        yield c


def make_user(name: str, *, admin: bool = False) -> str:
    from app.auth.service import create_key, create_user
    from app.db import session_scope

    with session_scope() as s:
        return create_key(s, user=create_user(s, name=name, is_admin=admin))


@pytest.fixture
def alice(clean_db: None) -> dict[str, str]:
    """Authorization headers of a fresh user."""
    return {"Authorization": f"Bearer {make_user('alice-' + uuid.uuid4().hex[:6])}"}


@pytest.fixture
def bob(clean_db: None) -> dict[str, str]:
    return {"Authorization": f"Bearer {make_user('bob-' + uuid.uuid4().hex[:6])}"}


@pytest.fixture(scope="session")
def data_dir(service_env: dict[str, str]) -> Path:
    return Path(service_env["SQUEEZE_DATA_DIR"])
