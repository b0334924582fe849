"""Migration 0006: ``model_runs.heartbeat_at``, on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy

from taskkit.db.migrate import _alembic_config, head_revision, upgrade
from taskkit.db.session import create_engine_for
from tests.conftest import pg_schema


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'empty.db'}"
        return
    with pg_schema(request.getfixturevalue("postgres_url"), "taskkit_hb") as url:
        yield url


def columns(engine: sqlalchemy.Engine) -> set[str]:
    return {c["name"] for c in sqlalchemy.inspect(engine).get_columns("model_runs")}


def test_0006_adds_a_nullable_heartbeat_to_existing_runs_and_drops_it_on_downgrade(
    empty_database: str,
):
    from alembic import command

    engine = create_engine_for(empty_database)
    try:
        with engine.begin() as connection:
            command.upgrade(_alembic_config(connection), "0005")
        with engine.begin() as connection:
            connection.execute(
                sqlalchemy.text(
                    "INSERT INTO model_runs (uid, name, model_type, config, status, usage_count,"
                    " created_at, updated_at, version) VALUES ('u1', 'a', 'sgd', '{}', 'running',"
                    " 0, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP, 1)"
                )
            )
        assert "heartbeat_at" not in columns(engine)

        assert upgrade(engine, "0006") == "0006"
        with engine.connect() as connection:
            beats = connection.execute(sqlalchemy.text("SELECT heartbeat_at FROM model_runs"))
            assert list(beats.scalars()) == [None]
        assert "heartbeat_at" in columns(engine)

        with engine.begin() as connection:
            command.downgrade(_alembic_config(connection), "0005")
        assert "heartbeat_at" not in columns(engine)
        with engine.connect() as connection:
            names = connection.execute(sqlalchemy.text("SELECT name FROM model_runs"))
            assert list(names.scalars()) == ["a"]
        assert upgrade(engine) == head_revision()
    finally:
        engine.dispose()
