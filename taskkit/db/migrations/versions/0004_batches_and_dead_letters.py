"""Batches, their item ledger, and the dead-letter queue.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29

Used by ``taskkit.tasks.BatchTask``, ``submit_batch`` and ``taskkit.deadletter``. Frozen like
every migration: types are spelled out, not imported from the models.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def big_id() -> sa.types.TypeEngine[int]:
    # 64-bit on PostgreSQL; SQLite only auto-increments INTEGER PRIMARY KEY.
    return sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def json() -> sa.types.TypeEngine[Any]:
    return sa.JSON(none_as_null=True).with_variant(
        postgresql.JSONB(none_as_null=True), "postgresql"
    )


def upgrade() -> None:
    timestamp = sa.DateTime(timezone=True)
    op.create_table(
        "batches",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("task_name", sa.String(length=255), nullable=False),
        sa.Column("total", sa.Integer(), nullable=False),
        sa.Column("chunks", sa.Integer(), nullable=False),
        sa.Column("group_id", sa.String(length=255), nullable=True),
        sa.Column("created_at", timestamp, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_batches")),
    )
    op.create_table(
        "batch_items",
        sa.Column("batch_id", sa.String(length=64), nullable=False),
        sa.Column("item_key", sa.String(length=255), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("claims", sa.Integer(), nullable=False),
        sa.Column("updated_at", timestamp, nullable=False),
        sa.PrimaryKeyConstraint("batch_id", "item_key", name=op.f("pk_batch_items")),
        postgresql_with={"fillfactor": 70},
    )
    op.create_table(
        "dead_letters",
        sa.Column("id", big_id(), nullable=False),
        sa.Column("task_name", sa.String(length=255), nullable=False),
        sa.Column("batch_id", sa.String(length=64), nullable=True),
        sa.Column("item_key", sa.String(length=255), nullable=True),
        sa.Column("task_id", sa.String(length=255), nullable=True),
        sa.Column("payload", json(), nullable=False),
        sa.Column("error_type", sa.String(length=255), nullable=False),
        sa.Column("error_message", sa.Text(), nullable=False),
        sa.Column("traceback", sa.Text(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("first_failed_at", timestamp, nullable=False),
        sa.Column("last_failed_at", timestamp, nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("replayed_at", timestamp, nullable=True),
        sa.Column("replayed_into", sa.String(length=255), nullable=True),
        sa.Column("replay_task_id", sa.String(length=255), nullable=True),
        sa.Column("replays", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_dead_letters")),
        sa.UniqueConstraint(
            "task_name",
            "batch_id",
            "item_key",
            name=op.f("uq_dead_letters_task_name_batch_id_item_key"),
        ),
    )
    op.create_index(
        op.f("ix_dead_letters_status_task_name"), "dead_letters", ["status", "task_name"]
    )
    op.create_index(op.f("ix_dead_letters_last_failed_at"), "dead_letters", ["last_failed_at"])


def downgrade() -> None:
    op.drop_index(op.f("ix_dead_letters_last_failed_at"), table_name="dead_letters")
    op.drop_index(op.f("ix_dead_letters_status_task_name"), table_name="dead_letters")
    op.drop_table("dead_letters")
    op.drop_table("batch_items")
    op.drop_table("batches")
