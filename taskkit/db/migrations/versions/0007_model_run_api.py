"""model_runs: what the HTTP service needs (idempotent submission, stop, fork, paging).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01

- ``idempotency_key``: the client's ``Idempotency-Key`` (``POST /train``); unique, so a second
  submission with the same key finds the first run instead of making another.
- ``stop_requested_at``: an operator asked the run to checkpoint and stop; the trainer looks at
  it at each epoch end.
- ``parent_run_id`` / ``parent_step``: a fork's origin (the run and checkpoint step it started
  from).
- an index on (name, id) for ``GET /runs?name=`` with cursor paging (status has one).

Frozen like every migration: types are spelled out.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("model_runs") as batch:
        batch.add_column(sa.Column("idempotency_key", sa.String(255), nullable=True))
        batch.add_column(sa.Column("stop_requested_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("parent_run_id", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("parent_step", sa.Integer(), nullable=True))
        batch.create_unique_constraint("uq_model_runs_idempotency_key", ["idempotency_key"])
    op.create_index("ix_model_runs_name_id", "model_runs", ["name", "id"])


def downgrade() -> None:
    op.drop_index("ix_model_runs_name_id", table_name="model_runs")
    with op.batch_alter_table("model_runs") as batch:
        batch.drop_constraint("uq_model_runs_idempotency_key", type_="unique")
        batch.drop_column("parent_step")
        batch.drop_column("parent_run_id")
        batch.drop_column("stop_requested_at")
        batch.drop_column("idempotency_key")
