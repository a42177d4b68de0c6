"""worker nodes and artifact expiry

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-27 23:32:28.274632
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "worker_nodes",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=256), nullable=False),
        sa.Column("hostname", sa.String(length=256), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("queues", sa.JSON(), nullable=False),
        sa.Column("devices", sa.JSON(), nullable=False),
        sa.Column("gpus", sa.JSON(), nullable=False),
        sa.Column("concurrency", sa.Integer(), nullable=False),
        sa.Column("version", sa.String(length=64), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("stopped_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_worker_nodes")),
    )
    with op.batch_alter_table("worker_nodes", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_worker_nodes_expires_at"), ["expires_at"], unique=False)

    with op.batch_alter_table("compression_jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("artifacts_expired_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("compression_jobs", schema=None) as batch_op:
        batch_op.drop_column("artifacts_expired_at")

    with op.batch_alter_table("worker_nodes", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_worker_nodes_expires_at"))

    op.drop_table("worker_nodes")
