"""model_runs.uid: a run's unique identity, which its checkpoints are keyed and signed by.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01

The integer id is not an identity: SQLite hands a deleted highest id out again, and a second or
recreated database numbers its runs from 1 over the same checkpoint folder. Existing runs get a
random identity each. Frozen like every migration: types are spelled out.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("model_runs") as batch:
        batch.add_column(sa.Column("uid", sa.String(length=32), nullable=True))
    runs = sa.table("model_runs", sa.column("id", sa.Integer()), sa.column("uid", sa.String(32)))
    connection = op.get_bind()
    ids = connection.execute(sa.select(runs.c.id).where(runs.c.uid.is_(None))).scalars().all()
    for run_id in ids:
        connection.execute(runs.update().where(runs.c.id == run_id).values(uid=uuid.uuid4().hex))
    with op.batch_alter_table("model_runs") as batch:
        batch.alter_column("uid", existing_type=sa.String(length=32), nullable=False)
        batch.create_unique_constraint("uq_model_runs_uid", ["uid"])


def downgrade() -> None:
    with op.batch_alter_table("model_runs") as batch:
        batch.drop_constraint("uq_model_runs_uid", type_="unique")
        batch.drop_column("uid")
