"""job train dataset: the dataset a job's training steps train on, protected from deletion like dataset_id

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-28 03:10:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("compression_jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("train_dataset_id", sa.String(length=64), nullable=True))
        batch_op.create_foreign_key(
            batch_op.f("fk_compression_jobs_train_dataset_id_dataset_uploads"),
            "dataset_uploads",
            ["train_dataset_id"],
            ["id"],
            ondelete="SET NULL",
        )
        batch_op.create_index(batch_op.f("ix_compression_jobs_train_dataset_id"), ["train_dataset_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("compression_jobs", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_compression_jobs_train_dataset_id"))
        batch_op.drop_constraint(batch_op.f("fk_compression_jobs_train_dataset_id_dataset_uploads"), type_="foreignkey")
        batch_op.drop_column("train_dataset_id")
