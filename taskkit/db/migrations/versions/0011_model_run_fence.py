"""model_runs.fence: the fencing token of the trainer that holds the run (issue 19).

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-01

A trainer that takes a run's lease raises ``fence`` to its lease's fencing token (only
upwards), and every write it makes for the run is applied only while ``fence`` still equals
its token, in the same transaction: a trainer cut off from the fleet, whose lease a newer one
took over, writes nothing when it comes back. Nullable: a run no trainer has held yet (or one
trained before this revision) has none. Frozen like every migration: types are spelled out.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("model_runs") as batch:
        batch.add_column(sa.Column("fence", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("model_runs") as batch:
        batch.drop_column("fence")
