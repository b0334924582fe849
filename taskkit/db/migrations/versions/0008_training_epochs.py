"""training_epochs: every epoch of a run, not only the latest.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01

One row per (run, epoch), written in the same transaction as the run's ``training_progress``
row: the event stream sends each epoch once and the dashboard draws the whole curve. ``epoch``
counts epochs done (1-based, as ``training_progress.current_epoch``). Deleting a run deletes
its epochs. Frozen like every migration: types are spelled out.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "training_epochs",
        sa.Column("model_run_id", sa.Integer(), nullable=False),
        sa.Column("epoch", sa.Integer(), nullable=False),
        sa.Column(
            "metrics",
            sa.JSON(none_as_null=True).with_variant(
                postgresql.JSONB(none_as_null=True), "postgresql"
            ),
            nullable=False,
        ),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["model_run_id"],
            ["model_runs.id"],
            name="fk_training_epochs_model_run_id_model_runs",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("model_run_id", "epoch", name="pk_training_epochs"),
    )


def downgrade() -> None:
    op.drop_table("training_epochs")
