"""batch_chunks.keys compressed with lz4 on PostgreSQL (issue 18).

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-01

A chunk's keys (~6 KB of JSON for 1,000 keys) are written once per delivery, by the claim.
PostgreSQL compresses a value that large before storing it; its default, pglz, took ~0.3 ms of
the claim's ~0.45 ms on the benchmark machine, lz4 ~0.06 ms. A server built without lz4 keeps
pglz, as does PostgreSQL before 14 (the statement's error is caught; nothing depends on it);
other databases have no such setting. Frozen like every migration.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_SET = """
DO $$
BEGIN
    EXECUTE 'ALTER TABLE batch_chunks ALTER COLUMN keys SET COMPRESSION {method}';
EXCEPTION WHEN feature_not_supported OR invalid_parameter_value OR syntax_error THEN
    RAISE NOTICE 'batch_chunks.keys keeps its compression: %', SQLERRM;
END $$;
"""


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(_SET.format(method="lz4"))


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(_SET.format(method="pglz"))
