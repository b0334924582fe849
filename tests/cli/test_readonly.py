"""Read-only commands leave a missing database alone; a missing driver is one line; an id too
large for the database is "no such run"."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from taskkit.cli import app


@pytest.mark.parametrize(
    "args",
    [["runs", "list"], ["runs", "show", "1"], ["db", "current"], ["dlq", "list"]],
    ids=" ".join,
)
def test_read_only_commands_create_no_database_file_or_folder(tmp_path: Path, args: list[str]):
    missing = tmp_path / "nonexistent" / "dir"
    url = f"sqlite:///{missing / 'x.db'}"

    result = CliRunner().invoke(app, [*args, "--url", url])

    assert not (tmp_path / "nonexistent").exists()
    assert "Traceback" not in result.output
    if args[0] == "db":
        assert result.exit_code == 0, result.output
        assert result.stdout == f"database {url} has no taskkit schema; run: taskkit db upgrade\n"
    else:
        assert result.exit_code == 2, result.output
        assert result.stderr == (
            f"error: the database {url} has no taskkit tables; run: taskkit db upgrade --url URL\n"
        )


def test_db_upgrade_still_creates_the_file(tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'new' / 'x.db'}"
    result = CliRunner().invoke(app, ["db", "upgrade", "--url", url])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "new" / "x.db").exists()


@pytest.mark.parametrize(
    "command",
    [
        ["db", "current"],
        ["db", "upgrade"],
        ["runs", "list"],
        ["runs", "show", "1"],
        ["dlq", "list"],
        ["dlq", "depth"],
    ],
    ids=" ".join,
)
def test_a_missing_database_driver_is_one_line(command: list[str]):
    url = "mysql://app:hunter2@127.0.0.1:1/prod"

    result = CliRunner().invoke(app, [*command, "--url", url])

    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: could not ")
    assert "MySQLdb" in lines[0]
    assert "hunter2" not in result.output


@pytest.mark.parametrize("run_id", [str(2**63), str(2**64 + 5)])
def test_an_id_past_the_databases_integers_is_no_such_run(
    runner: CliRunner, database: str, run_id: str
):
    result = runner.invoke(app, ["runs", "show", run_id])

    assert result.exit_code == 3, result.output
    assert f"training run {run_id} does not exist" in result.stderr.replace("\n", " ")


@pytest.mark.parametrize(
    "command",
    [["dlq", "show"], ["dlq", "discard"], ["dlq", "replay", "--app", "tests.cli.dlqapp"]],
    ids=["show", "discard", "replay"],
)
@pytest.mark.parametrize("letter_id", [str(2**63), str(2**64 + 5)])
def test_a_letter_id_past_the_databases_integers_is_no_such_letter(
    runner: CliRunner, database: str, command: list[str], letter_id: str
):
    result = runner.invoke(app, [*command[:2], letter_id, *command[2:]])

    assert result.exit_code == 3, result.output
    assert letter_id in result.stderr
