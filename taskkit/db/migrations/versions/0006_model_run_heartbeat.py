"""model_runs.heartbeat_at: when the trainer holding the run's lease last renewed it.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01

Nullable: a run that no trainer has held yet (queued, or trained before this revision) has no
heartbeat, and the CLI falls back to its other timestamps. Frozen like every migration: types
are spelled out.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("model_runs") as batch:
        batch.add_column(sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("model_runs") as batch:
        batch.drop_column("heartbeat_at")
