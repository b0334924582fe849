"""Indexes for the read paths at 1M dead letters and 100k runs (issue 18).

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-01

- ``dead_letters (status, last_failed_at, id)``: ``taskkit dlq list``'s first page (the letters
  of a status, newest failure first) reads the index backwards and stops at the limit instead
  of sorting every waiting letter.
- ``dead_letters (batch_id, status, id)``: a batch's letters (``dlq replay --batch``,
  ``dlq list --batch``) without reading the others; the unique key leads with the task name.
- ``model_runs (status, id)``: ``taskkit runs list --status S`` (newest id first) reads the
  index backwards to its limit.

Frozen like every migration: names spelled out.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(
        "ix_dead_letters_status_last_failed_at_id",
        "dead_letters",
        ["status", "last_failed_at", "id"],
    )
    op.create_index(
        "ix_dead_letters_batch_id_status_id", "dead_letters", ["batch_id", "status", "id"]
    )
    op.create_index("ix_model_runs_status_id", "model_runs", ["status", "id"])


def downgrade() -> None:
    op.drop_index("ix_model_runs_status_id", table_name="model_runs")
    op.drop_index("ix_dead_letters_batch_id_status_id", table_name="dead_letters")
    op.drop_index("ix_dead_letters_status_last_failed_at_id", table_name="dead_letters")
