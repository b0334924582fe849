"""Initial schema: model_runs, training_progress, predictions, datasets.

Revision ID: 0001
Revises:
Create Date: 2026-11-29

Migrations are frozen: they spell out their types instead of importing the models, so a later
change to a model cannot change what an old migration does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def json() -> sa.types.TypeEngine[Any]:
    return sa.JSON(none_as_null=True).with_variant(
        postgresql.JSONB(none_as_null=True), "postgresql"
    )


def timestamp() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "model_runs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("model_type", sa.String(length=100), nullable=False),
        sa.Column("config", json(), nullable=False),
        sa.Column("status", sa.String(length=32), nullable=False),
        sa.Column("task_id", sa.String(length=255), nullable=True),
        sa.Column("usage_count", sa.Integer(), nullable=False),
        sa.Column("final_score", sa.Float(), nullable=True),
        sa.Column("accuracy", sa.Float(), nullable=True),
        sa.Column("model_state", json(), nullable=True),
        sa.Column("model_object", sa.LargeBinary(), nullable=True),
        sa.Column("error_message", sa.Text(), nullable=True),
        sa.Column("created_at", timestamp(), nullable=False),
        sa.Column("updated_at", timestamp(), nullable=False),
        sa.Column("started_at", timestamp(), nullable=True),
        sa.Column("completed_at", timestamp(), nullable=True),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_model_runs")),
    )
    op.create_index(op.f("ix_model_runs_status_created_at"), "model_runs", ["status", "created_at"])

    op.create_table(
        "datasets",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("model_run_id", sa.Integer(), nullable=True),
        sa.Column("source", sa.String(length=1024), nullable=True),
        sa.Column("format", sa.String(length=32), nullable=True),
        sa.Column("num_rows", sa.Integer(), nullable=True),
        sa.Column("num_features", sa.Integer(), nullable=True),
        sa.Column("columns", json(), nullable=True),
        sa.Column("description", sa.Text(), nullable=True),
        sa.Column("created_at", timestamp(), nullable=False),
        sa.Column("updated_at", timestamp(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["model_run_id"],
            ["model_runs.id"],
            name=op.f("fk_datasets_model_run_id_model_runs"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_datasets")),
        sa.UniqueConstraint("name", name=op.f("uq_datasets_name")),
    )
    op.create_index(op.f("ix_datasets_model_run_id"), "datasets", ["model_run_id"])

    op.create_table(
        "predictions",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("model_run_id", sa.Integer(), nullable=False),
        sa.Column("item_key", sa.String(length=255), nullable=True),
        sa.Column("input_data", json(), nullable=False),
        sa.Column("prediction", json(), nullable=False),
        sa.Column("confidence", sa.Float(), nullable=True),
        sa.Column("created_at", timestamp(), nullable=False),
        sa.ForeignKeyConstraint(
            ["model_run_id"],
            ["model_runs.id"],
            name=op.f("fk_predictions_model_run_id_model_runs"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_predictions")),
        sa.UniqueConstraint(
            "model_run_id", "item_key", name=op.f("uq_predictions_model_run_id_item_key")
        ),
    )
    op.create_index(op.f("ix_predictions_model_run_id"), "predictions", ["model_run_id"])

    op.create_table(
        "training_progress",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("model_run_id", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=32), nullable=False),
        sa.Column("current_epoch", sa.Integer(), nullable=False),
        sa.Column("total_epochs", sa.Integer(), nullable=True),
        sa.Column("progress_percentage", sa.Float(), nullable=False),
        sa.Column("metrics", json(), nullable=False),
        sa.Column("message", sa.Text(), nullable=True),
        sa.Column("created_at", timestamp(), nullable=False),
        sa.Column("updated_at", timestamp(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["model_run_id"],
            ["model_runs.id"],
            name=op.f("fk_training_progress_model_run_id_model_runs"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_training_progress")),
        sa.UniqueConstraint("model_run_id", name=op.f("uq_training_progress_model_run_id")),
    )


def downgrade() -> None:
    op.drop_table("training_progress")
    op.drop_index(op.f("ix_predictions_model_run_id"), table_name="predictions")
    op.drop_table("predictions")
    op.drop_index(op.f("ix_datasets_model_run_id"), table_name="datasets")
    op.drop_table("datasets")
    op.drop_index(op.f("ix_model_runs_status_created_at"), table_name="model_runs")
    op.drop_table("model_runs")
