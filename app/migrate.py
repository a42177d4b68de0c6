"""Schema migrations through Alembic; the server upgrades to head on start."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"


def alembic_config(database_url: str | None = None) -> Config:
    cfg = Config(str(MIGRATIONS / "alembic.ini"))
    cfg.set_main_option("script_location", str(MIGRATIONS))
    if database_url:
        cfg.set_main_option("sqlalchemy.url", database_url)
    return cfg


def upgrade_database(revision: str = "head") -> None:
    from app.db import get_engine

    engine = get_engine()
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            # Several API processes may start at once: one migrates, the others wait for it.
            from sqlalchemy import text

            conn.execute(text("SELECT pg_advisory_xact_lock(7214093)"))
        cfg = alembic_config()
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)


def downgrade_database(revision: str = "base") -> None:
    from app.db import get_engine

    with get_engine().begin() as conn:
        cfg = alembic_config()
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, revision)
