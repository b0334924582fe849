"""Every command that touches the database, on a database without the taskkit tables, prints
one line naming the database and the fix, and exits 2: on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url
from typer.testing import CliRunner

from taskkit.cli import app
from taskkit.db.classify import describe_database
from taskkit.db.migrate import head_revision, upgrade
from tests.cli import cliapp
from tests.conftest import pg_schema

pytestmark = pytest.mark.redis


@pytest.fixture(params=["sqlite", "postgresql"])
def unmigrated(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[str]:
    """An empty database (no table at all) as TASKKIT_DATABASE_URL; the test apps' settings."""
    from taskkit.config import reset_settings

    def use(url: str) -> Iterator[str]:
        monkeypatch.setenv("TASKKIT_DATABASE_URL", url)
        monkeypatch.setenv("TASKKIT_APP", "tests.cli.cliapp")
        monkeypatch.setenv("TASKKIT_CHECKPOINT_DIR", str(tmp_path / "checkpoints"))
        monkeypatch.setenv("TASKKIT_SECRET_KEY", "tkcli-test-key-16b")
        reset_settings()
        yield url
        monkeypatch.undo()
        reset_settings()

    if request.param == "sqlite":
        yield from use(f"sqlite:///{tmp_path / 'empty.db'}")
        return
    with pg_schema(request.getfixturevalue("postgres_url"), "taskkit_cli") as url:
        yield from use(url)


def _name(url: str) -> str:
    return describe_database(make_url(url))


COMMANDS = [
    ["runs", "list"],
    ["runs", "show", "1"],
    ["runs", "show", "1", "--watch"],
    ["resume", "1"],
    ["dlq", "list"],
    ["dlq", "show", "1"],
    ["dlq", "depth"],
    ["dlq", "discard", "1"],
    ["dlq", "purge", "1", "--yes"],
    ["dlq", "purge", "--older-than", "1d", "--yes"],
    ["dlq", "replay", "--all", "--app", "tests.cli.dlqapp"],
    ["dlq", "replay", "1", "--app", "tests.cli.dlqapp"],
]


@pytest.mark.parametrize("args", COMMANDS, ids=" ".join)
def test_a_command_on_an_unmigrated_database_says_which_and_how_to_fix_it(
    unmigrated: str, args: list[str]
):
    result = CliRunner().invoke(app, args)

    assert result.exit_code == 2, result.output
    assert result.stderr == (
        f"error: the database {_name(unmigrated)} has no taskkit tables; run: taskkit db upgrade\n"
    )
    assert result.stdout == ""


def test_train_on_an_unmigrated_database_says_so_and_sends_nothing(unmigrated: str, tmp_path: Path):
    config = tmp_path / "run.json"
    config.write_text('{"epochs": 2}')

    result = CliRunner().invoke(app, ["train", str(config), "--task", cliapp.TRAIN])

    assert result.exit_code == 2, result.output
    assert result.stderr == (
        f"error: the database {_name(unmigrated)} has no taskkit tables; run: taskkit db upgrade\n"
    )
    assert cliapp.queued() == []


def test_with_url_the_fix_names_the_url_option(unmigrated: str, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("TASKKIT_DATABASE_URL")

    result = CliRunner().invoke(app, ["runs", "list", "--url", unmigrated])

    assert result.exit_code == 2, result.output
    assert result.stderr == (
        f"error: the database {_name(unmigrated)} has no taskkit tables; "
        "run: taskkit db upgrade --url URL\n"
    )


def test_a_database_migrated_by_an_older_taskkit_names_its_revision(unmigrated: str):
    upgrade(unmigrated, "0003")  # before the dead-letter table

    result = CliRunner().invoke(app, ["dlq", "list"])

    assert result.exit_code == 2, result.output
    assert result.stderr == (
        f"error: the database {_name(unmigrated)} is at revision 0003, older than this taskkit "
        f"(head {head_revision()}); run: taskkit db upgrade\n"
    )


def test_after_db_upgrade_the_same_command_works(unmigrated: str):
    assert CliRunner().invoke(app, ["db", "upgrade"]).exit_code == 0

    result = CliRunner().invoke(app, ["runs", "list"])

    assert result.exit_code == 0, result.output
    assert result.stdout == f"no runs in {_name(unmigrated)}\n"
