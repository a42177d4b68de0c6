"""searches: a job of kind "search" and its trials (jobs with parent_id)

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-27 23:55:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("compression_jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("kind", sa.String(length=16), nullable=False, server_default="compress"))
        batch_op.add_column(sa.Column("parent_id", sa.String(length=64), nullable=True))
        batch_op.create_foreign_key(
            batch_op.f("fk_compression_jobs_parent_id_compression_jobs"),
            "compression_jobs",
            ["parent_id"],
            ["id"],
            ondelete="SET NULL",
        )
        batch_op.create_index(batch_op.f("ix_compression_jobs_parent_id"), ["parent_id"], unique=False)
        # A search plans each recipe once, even when two of its advances race (NULL parents never collide).
        batch_op.create_unique_constraint("uq_compression_jobs_parent_recipe", ["parent_id", "cache_key"])


def downgrade() -> None:
    with op.batch_alter_table("compression_jobs", schema=None) as batch_op:
        batch_op.drop_constraint("uq_compression_jobs_parent_recipe", type_="unique")
        batch_op.drop_index(batch_op.f("ix_compression_jobs_parent_id"))
        batch_op.drop_constraint(batch_op.f("fk_compression_jobs_parent_id_compression_jobs"), type_="foreignkey")
        batch_op.drop_column("parent_id")
        batch_op.drop_column("kind")
