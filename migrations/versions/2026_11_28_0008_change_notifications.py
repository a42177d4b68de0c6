"""change notifications: PostgreSQL triggers that NOTIFY squeeze_changes when a row the API caches is written

The API's job view and API key caches (app.changes) are exact only because every write to what they hold is
announced, whoever writes it: a worker on another machine, another API process, psql. SQLite has no NOTIFY (the
caches stay off there), so this migration does nothing on it.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-28 09:10:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# table -> (kind, column): the payload is '<kind>:<the row's column>', e.g. 'job:job_...' for an artifact.
TRIGGERS = {
    "compression_jobs": ("job", "id"),
    "artifacts": ("job", "job_id"),
    "webhook_deliveries": ("job", "job_id"),
    "api_keys": ("key", "prefix"),
    "users": ("user", "id"),
}

FUNCTION = """
CREATE OR REPLACE FUNCTION squeeze_notify_change() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    row_json jsonb;
BEGIN
    IF TG_OP = 'DELETE' THEN
        row_json := to_jsonb(OLD);
    ELSE
        row_json := to_jsonb(NEW);
    END IF;
    PERFORM pg_notify('squeeze_changes', TG_ARGV[0] || ':' || (row_json ->> TG_ARGV[1]));
    IF TG_OP = 'UPDATE' AND (to_jsonb(OLD) ->> TG_ARGV[1]) IS DISTINCT FROM (row_json ->> TG_ARGV[1]) THEN
        PERFORM pg_notify('squeeze_changes', TG_ARGV[0] || ':' || (to_jsonb(OLD) ->> TG_ARGV[1]));
    END IF;
    RETURN NULL;
END
$$
"""


# TRUNCATE fires no row trigger: one statement trigger says "everything changed".
TRUNCATE_FUNCTION = """
CREATE OR REPLACE FUNCTION squeeze_notify_truncate() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('squeeze_changes', 'all:' || TG_TABLE_NAME);
    RETURN NULL;
END
$$
"""


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(FUNCTION)
    op.execute(TRUNCATE_FUNCTION)
    for table, (kind, column) in TRIGGERS.items():
        op.execute(
            f"CREATE TRIGGER squeeze_notify_{table} AFTER INSERT OR UPDATE OR DELETE ON {table} "
            f"FOR EACH ROW EXECUTE FUNCTION squeeze_notify_change('{kind}', '{column}')"
        )
        op.execute(
            f"CREATE TRIGGER squeeze_notify_truncate_{table} AFTER TRUNCATE ON {table} "
            "FOR EACH STATEMENT EXECUTE FUNCTION squeeze_notify_truncate()"
        )


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for table in TRIGGERS:
        op.execute(f"DROP TRIGGER IF EXISTS squeeze_notify_truncate_{table} ON {table}")
        op.execute(f"DROP TRIGGER IF EXISTS squeeze_notify_{table} ON {table}")
    op.execute("DROP FUNCTION IF EXISTS squeeze_notify_truncate()")
    op.execute("DROP FUNCTION IF EXISTS squeeze_notify_change()")
