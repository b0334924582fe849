"""``--json`` on the listing and show commands: one JSON document each, no rich markup, the
same data the tables show, URL passwords masked."""

from __future__ import annotations

import json
from collections.abc import Callable

from typer.testing import CliRunner

from taskkit.cli import app
from taskkit.db.migrate import head_revision


def test_runs_list_and_show_json(runner: CliRunner, make_run: Callable[..., int]):
    first = make_run("baseline", "running", epoch=2, total=4, metrics={"loss": 0.25})
    second = make_run("[bold]lr=1e-3[/]", "failed", error="boom: redis://:hunter2@cache/0")

    listed = runner.invoke(app, ["runs", "list", "--json"], env={"COLUMNS": "40"})
    shown = runner.invoke(app, ["runs", "show", str(first), "--json"])

    assert listed.exit_code == 0, listed.output
    runs = json.loads(listed.stdout)["runs"]
    assert [run["id"] for run in runs] == [second, first]
    assert runs[0]["name"] == "[bold]lr=1e-3[/]"  # data, not markup
    assert runs[0]["status"] == "failed"
    assert shown.exit_code == 0, shown.output
    record = json.loads(shown.stdout)
    assert (record["id"], record["status"], record["epoch"], record["total_epochs"]) == (
        first,
        "running",
        2,
        4,
    )
    assert record["percent"] == 50.0
    assert record["metrics"] == {"loss": 0.25}
    assert record["stale"] is False
    assert record["started_at"].endswith("+00:00")


def test_runs_list_json_without_runs(runner: CliRunner, database: str):
    result = runner.invoke(app, ["runs", "list", "--json"])

    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"runs": []}


def test_runs_show_watch_json_prints_the_run_when_it_ends(
    runner: CliRunner, make_run: Callable[..., int]
):
    run_id = make_run("done", "completed", epoch=4, total=4)

    result = runner.invoke(app, ["runs", "show", str(run_id), "--watch", "--json"])

    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["status"] == "completed"


def test_db_current_json(runner: CliRunner, database: str):
    result = runner.invoke(app, ["db", "current", "--json"])

    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["revision"] == record["head"] == head_revision()
    assert record["state"] == "head"
    assert "://" in record["database"]


def test_db_current_json_of_an_unmigrated_file(runner: CliRunner, tmp_path):
    url = f"sqlite:///{tmp_path / 'new.db'}"

    result = runner.invoke(app, ["db", "current", "--json", "--url", url])

    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["state"] == "unmigrated"
    assert not (tmp_path / "new.db").exists()
