"""The item ledger one row per chunk (issue 18): ``batch_chunks``, and ``batch_items`` a view.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-01

- ``batch_chunks``: one row per chunk of a batch, its keys once (JSON) and a ``0``/``1`` flag
  per position for done and dead; a flush is one update of one row, not one row per item.
- ``batch_items`` is renamed ``batch_item_rows``: the per-item rows of batches in flight during
  the upgrade stay readable, and the new ledger moves a chunk's old rows into its chunk row
  when the chunk is claimed again.
- ``batch_items`` becomes a view: those rows and one row per position of each chunk, with the
  same columns as the old table, so what read the table reads the view.

Downgrade expands every chunk back into item rows. Frozen like every migration.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_STATUS = (
    "CASE WHEN substr(c.dead, {n}, 1) = '1' THEN 'dead' "
    "WHEN substr(c.done, {n}, 1) = '1' THEN 'done' ELSE 'claimed' END"
)


def _chunk_items(dialect: str) -> str:
    """One row per position of each chunk: batch_id, item_key, status, claims, updated_at."""
    if dialect == "postgresql":
        return (
            f"SELECT c.batch_id, k.item_key, {_STATUS.format(n='k.n::int')} AS status, "
            "c.claims, c.updated_at FROM batch_chunks c CROSS JOIN LATERAL "
            "json_array_elements_text(c.keys::json) WITH ORDINALITY AS k(item_key, n)"
        )
    return (
        f"SELECT c.batch_id, k.value AS item_key, {_STATUS.format(n='k.key + 1')} AS status, "
        "c.claims, c.updated_at FROM batch_chunks c, json_each(c.keys) k"
    )


def upgrade() -> None:
    dialect = op.get_bind().dialect.name
    op.rename_table("batch_items", "batch_item_rows")
    if dialect == "postgresql":
        op.execute(
            "ALTER TABLE batch_item_rows RENAME CONSTRAINT pk_batch_items TO pk_batch_item_rows"
        )
    op.create_table(
        "batch_chunks",
        sa.Column("batch_id", sa.String(length=64), nullable=False),
        sa.Column("chunk", sa.String(length=64), nullable=False),
        sa.Column("keys", sa.Text(), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("done", sa.Text(), nullable=False),
        sa.Column("dead", sa.Text(), nullable=False),
        sa.Column("claims", sa.Integer(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("batch_id", "chunk", name=op.f("pk_batch_chunks")),
    )
    op.execute(
        "CREATE VIEW batch_items AS SELECT batch_id, item_key, status, claims, updated_at "
        f"FROM batch_item_rows UNION ALL {_chunk_items(dialect)}"
    )


def downgrade() -> None:
    dialect = op.get_bind().dialect.name
    op.execute("DROP VIEW batch_items")
    op.execute(
        "INSERT INTO batch_item_rows (batch_id, item_key, status, claims, updated_at) "
        f"SELECT * FROM ({_chunk_items(dialect)}) AS items WHERE NOT EXISTS (SELECT 1 FROM "
        "batch_item_rows r WHERE r.batch_id = items.batch_id AND r.item_key = items.item_key)"
    )
    op.drop_table("batch_chunks")
    if dialect == "postgresql":
        op.execute(
            "ALTER TABLE batch_item_rows RENAME CONSTRAINT pk_batch_item_rows TO pk_batch_items"
        )
    op.rename_table("batch_item_rows", "batch_items")
