"""Every command that touches the database, on a database without the taskkit tables, prints
one line naming the database and the fix, and exits 2: on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url
from typer.testing import CliRunner

from taskkit.cli import app
from taskkit.db.classify import describe_database
from taskkit.db.migrate import head_revision, upgrade
from taskkit.db.session import get_engine
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
    ["runs", "stop", "1"],
    ["runs", "fork", "1", "--from-step", "1"],
    ["batches", "show", "b1"],
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


@pytest.mark.parametrize("args", [["runs", "list"], ["dlq", "list"]], ids=" ".join)
def test_a_database_at_an_older_revision_with_its_tables_names_its_revision(
    unmigrated: str, args: list[str]
):
    upgrade(unmigrated, "0004")  # every table but model_runs.uid (0005) and what came after

    result = CliRunner().invoke(app, args)

    assert result.exit_code == 2, result.output
    assert result.stderr == (
        f"error: the database {_name(unmigrated)} is at revision 0004, older than this taskkit "
        f"(head {head_revision()}); run: taskkit db upgrade\n"
    )


def _from_a_newer_taskkit(url: str) -> None:
    upgrade(url)
    with get_engine(url).begin() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = 'f00dfeed'"))


@pytest.mark.parametrize(
    "args",
    [*COMMANDS, ["train", "run.json", "--task", cliapp.TRAIN]],
    # The train task's name is random per process: an id without it is the same in every
    # pytest-xdist worker, which must collect the same tests.
    ids=lambda args: " ".join(args).replace(cliapp.TRAIN, "TASK"),
)
def test_a_database_migrated_by_a_newer_taskkit_is_one_line_in_every_command(
    unmigrated: str, args: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    _from_a_newer_taskkit(unmigrated)
    (tmp_path / "run.json").write_text('{"epochs": 2}')
    monkeypatch.chdir(tmp_path)

    result = CliRunner().invoke(app, args)

    assert result.exit_code == 2, result.output
    assert result.stderr == (
        f"error: the database {_name(unmigrated)} is at revision f00dfeed, which this taskkit "
        f"(head {head_revision()}) does not know: a newer taskkit migrated it; upgrade taskkit, "
        "or use a database of this version\n"
    )
    assert result.stdout == ""
    assert cliapp.queued() == []


def test_db_current_and_db_upgrade_on_a_database_from_a_newer_taskkit(unmigrated: str):
    _from_a_newer_taskkit(unmigrated)
    newer = (
        f"the database {_name(unmigrated)} is at revision f00dfeed, which this taskkit "
        f"(head {head_revision()}) does not know: a newer taskkit migrated it"
    )

    current = CliRunner().invoke(app, ["db", "current"])
    upgraded = CliRunner().invoke(app, ["db", "upgrade"])

    assert current.exit_code == 0, current.output
    assert current.stdout == newer.replace("the database", "database", 1) + "\n"
    assert upgraded.exit_code == 2, upgraded.output
    assert upgraded.stderr == (
        f"error: {newer}; upgrade taskkit, or use a database of this version\n"
    )
