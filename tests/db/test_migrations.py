"""Migrations bring any database to head, agree with the models, and `taskkit db` drives them."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from typer.testing import CliRunner

from taskkit.cli import app
from taskkit.db.migrate import current_revision, head_revision, upgrade
from taskkit.db.models import Base
from taskkit.db.session import create_engine_for
from tests.conftest import pg_schema


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_database(request, tmp_path: Path) -> Iterator[str]:
    """A database with no tables at all."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'empty.db'}"
        return
    with pg_schema(request.getfixturevalue("postgres_url"), "taskkit_mig") as url:
        yield url


def differences(url: str) -> list:
    engine = create_engine_for(url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            return list(compare_metadata(context, Base.metadata))
    finally:
        engine.dispose()


def test_upgrade_from_empty_matches_the_models(empty_database: str):
    engine = create_engine_for(empty_database)
    try:
        assert current_revision(engine) is None
        assert upgrade(engine) == head_revision()
        assert upgrade(engine) == head_revision()  # idempotent
        tables = set(sqlalchemy.inspect(engine).get_table_names())
    finally:
        engine.dispose()
    assert set(Base.metadata.tables) | {"alembic_version"} == tables
    assert differences(empty_database) == []


def test_downgrade_to_base_and_back(empty_database: str):
    engine = create_engine_for(empty_database)
    try:
        upgrade(engine)
        from alembic import command

        from taskkit.db.migrate import _alembic_config

        with engine.begin() as connection:
            command.downgrade(_alembic_config(connection), "base")
        assert set(sqlalchemy.inspect(engine).get_table_names()) <= {"alembic_version"}
        assert upgrade(engine) == head_revision()
    finally:
        engine.dispose()
    assert differences(empty_database) == []


runner = CliRunner()


def test_cli_db_upgrade_and_current(empty_database: str):
    before = runner.invoke(app, ["db", "current", "--url", empty_database])
    assert before.exit_code == 0, before.output
    assert "no taskkit schema" in before.output
    result = runner.invoke(app, ["db", "upgrade", "--url", empty_database])
    assert result.exit_code == 0, result.output
    assert f"at revision {head_revision()} (head)" in result.output
    after = runner.invoke(app, ["db", "current", "--url", empty_database])
    assert f"{head_revision()} (head)" in after.output


def test_cli_unreachable_database_exits_1_without_the_password():
    url = "postgresql+psycopg://app:hunter2@127.0.0.1:1/prod"
    result = runner.invoke(app, ["db", "upgrade", "--url", url])
    assert result.exit_code == 1
    assert "could not upgrade postgresql://127.0.0.1:1/prod" in result.output
    assert "hunter2" not in result.output


def test_cli_bad_settings_and_revisions_exit_2(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("TASKKIT_DATABASE_URL", "not-a-url")
    from taskkit.config import reset_settings

    reset_settings()
    try:
        result = runner.invoke(app, ["db", "upgrade"])
    finally:
        monkeypatch.delenv("TASKKIT_DATABASE_URL")
        reset_settings()
    assert result.exit_code == 2
    assert "TASKKIT_DATABASE_URL" in result.output
    result = runner.invoke(
        app, ["db", "upgrade", "--url", f"sqlite:///{tmp_path / 'x.db'}", "--revision", "nope"]
    )
    assert result.exit_code == 2
    assert "nope" in result.output


def test_console_script_migrates_the_embedded_default(tmp_path: Path):
    """The installed `taskkit` command, in a fresh directory, with nothing configured."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKKIT_")}
    script = Path(sys.executable).with_name("taskkit")
    result = subprocess.run(
        [str(script), "db", "upgrade"],
        check=False,
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    database = tmp_path / ".taskkit" / "taskkit.db"
    assert database.exists()
    assert f"sqlite:///{database}" in result.stdout
    assert differences(f"sqlite:///{database}") == []


def test_0005_gives_every_existing_run_an_identity_of_its_own(empty_database: str):
    from alembic import command

    from taskkit.db.migrate import _alembic_config

    engine = create_engine_for(empty_database)
    try:
        with engine.begin() as connection:
            command.upgrade(_alembic_config(connection), "0004")
        with engine.begin() as connection:
            for name in ("a", "b"):
                connection.execute(
                    sqlalchemy.text(
                        "INSERT INTO model_runs (name, model_type, config, status, usage_count,"
                        " created_at, updated_at, version) VALUES (:name, 'sgd', '{}', 'failed',"
                        " 0, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP, 1)"
                    ),
                    {"name": name},
                )
        assert upgrade(engine) == head_revision()
        with engine.connect() as connection:
            uids = connection.execute(sqlalchemy.text("SELECT uid FROM model_runs")).scalars()
            uids = list(uids)
    finally:
        engine.dispose()
    assert len(uids) == 2
    assert len(set(uids)) == 2
    assert all(isinstance(u, str) and len(u) == 32 for u in uids)


def test_0010_keeps_a_batch_in_flight_readable_and_downgrade_expands_the_chunks(
    empty_database: str,
):
    """Rows of the per-item ledger written before 0010 are read through the view; a chunk
    claimed after it takes them over; a downgrade turns every chunk back into item rows."""
    from alembic import command

    from taskkit.db.migrate import _alembic_config
    from taskkit.deadletter import ItemLedger

    engine = create_engine_for(empty_database)
    select_items = sqlalchemy.text(
        "SELECT item_key, status FROM batch_items WHERE batch_id = 'b' ORDER BY item_key"
    )
    try:
        with engine.begin() as connection:
            command.upgrade(_alembic_config(connection), "0009")
        with engine.begin() as connection:
            connection.execute(
                sqlalchemy.text(
                    "INSERT INTO batch_items (batch_id, item_key, status, claims, updated_at) "
                    "VALUES ('b', 'x', 'done', 1, CURRENT_TIMESTAMP), "
                    "('b', 'y', 'claimed', 1, CURRENT_TIMESTAMP)"
                )
            )
        assert upgrade(engine) == head_revision()
        with engine.connect() as connection:
            assert list(connection.execute(select_items)) == [("x", "done"), ("y", "claimed")]

        ledger = ItemLedger("b", engine)
        assert ledger.claim(["x", "y", "z"]) == {"x": "done"}
        ledger.finish(done=["y"])
        with engine.connect() as connection:
            assert connection.scalar(sqlalchemy.text("SELECT count(*) FROM batch_item_rows")) == 0

        with engine.begin() as connection:
            command.downgrade(_alembic_config(connection), "0009")
        with engine.connect() as connection:
            assert list(connection.execute(select_items)) == [
                ("x", "done"),
                ("y", "done"),
                ("z", "claimed"),
            ]
    finally:
        engine.dispose()
