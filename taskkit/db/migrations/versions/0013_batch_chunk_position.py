"""batch_chunks.position: where a chunk starts in its batch, for a claim sent unanswered (issue 18).

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-02

A ``BatchTask`` chunk looks up the chunks of its batch at its position (the position of its
first item, the ``offset`` of its message) before its keys are computed, and when none of them
holds its keys, sends its claim without waiting for the answer: the chunk's first items run
during the claim's round trip (``ItemLedger.probe``). ``position`` is NULL for rows claimed
before this migration, or by a caller that named no position; the lookup reads those too.
The index serves that lookup: ``(batch_id, position)``. Frozen like every migration: names
spelled out.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("batch_chunks", sa.Column("position", sa.BigInteger(), nullable=True))
    op.create_index("ix_batch_chunks_batch_id_position", "batch_chunks", ["batch_id", "position"])


def downgrade() -> None:
    op.drop_index("ix_batch_chunks_batch_id_position", table_name="batch_chunks")
    # Not a batch (copy and move) on SQLite: the batch_items view reads the table, and SQLite
    # drops a column in place since 3.35.
    op.drop_column("batch_chunks", "position")
