"""A run whose trainer stopped beating is shown ``stale`` with its last heartbeat, and its
elapsed time stops at that heartbeat (``taskkit runs list``, ``runs show``, ``--watch``)."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from typer.testing import CliRunner

from taskkit.cli import app
from taskkit.db.runs import RunView

NOW = datetime(2026, 12, 1, 12, 0, 0, tzinfo=UTC)


def view(status: str = "running", **fields: object) -> RunView:
    base = RunView(
        id=7,
        name="r",
        status=status,
        task_id="t",
        task_name="train",
        error=None,
        created_at=NOW - timedelta(seconds=300),
        started_at=NOW - timedelta(seconds=200),
        completed_at=None,
        updated_at=NOW - timedelta(seconds=100),
        final_score=None,
        epoch=1,
        total_epochs=4,
        percent=25.0,
        lease_ttl=15.0,
    )
    return replace(base, **fields)  # type: ignore[arg-type]


def ago(seconds: float) -> datetime:
    return NOW - timedelta(seconds=seconds)


def test_a_running_run_is_stale_once_its_heartbeat_is_older_than_the_lease_ttl():
    assert not view(heartbeat_at=ago(14)).is_stale(NOW)
    assert not view(heartbeat_at=ago(15)).is_stale(NOW)
    assert view(heartbeat_at=ago(16)).is_stale(NOW)
    assert view(heartbeat_at=ago(16), lease_ttl=20.0).is_stale(NOW) is False
    assert view(heartbeat_at=ago(16)).heartbeat_age(NOW) == 16.0


def test_without_a_heartbeat_the_last_update_or_the_start_counts():
    assert view(heartbeat_at=None).is_stale(NOW)  # updated 100 s ago
    assert not view(heartbeat_at=None, updated_at=ago(5)).is_stale(NOW)
    assert not view(heartbeat_at=None, updated_at=None, started_at=ago(5)).is_stale(NOW)
    assert view(heartbeat_at=None, updated_at=None, started_at=ago(50)).is_stale(NOW)


@pytest.mark.parametrize("status", ["queued", "created", "completed", "failed", "retrying"])
def test_only_a_running_run_goes_stale(status: str):
    # retrying: the task waits out its retry countdown (up to outer_max_delay) without a lease
    assert not view(status, heartbeat_at=ago(1000)).is_stale(NOW)


def test_the_elapsed_time_of_a_stale_run_stops_at_its_last_heartbeat():
    from taskkit.cli._runview import _elapsed

    assert _elapsed(view(heartbeat_at=ago(60)), NOW) == "0:02:20"
    assert _elapsed(view(heartbeat_at=ago(5)), NOW) == "0:03:20"


@pytest.fixture
def beat(update_run: Callable[..., None]) -> Callable[[int, float], None]:
    def set_heartbeat(run_id: int, seconds_ago: float) -> None:
        moment = datetime.now(UTC) - timedelta(seconds=seconds_ago)
        update_run(run_id, heartbeat_at=moment, started_at=moment - timedelta(seconds=40))

    return set_heartbeat


def test_runs_show_marks_a_run_with_an_old_heartbeat_stale(
    runner: CliRunner, make_run: Callable[..., int], beat: Callable[[int, float], None]
):
    run_id = make_run("bravo", "running", epoch=2, total=4)
    beat(run_id, 60)

    result = runner.invoke(app, ["runs", "show", str(run_id)])

    assert result.exit_code == 0, result.output
    assert "status      running (stale)" in result.stdout
    assert re.search(
        r"heartbeat   last heartbeat 6\d s ago \(stale: lease ttl 15 s\)", result.stdout
    )
    assert "elapsed     0:00:40" in result.stdout


def test_runs_show_of_a_beating_run_is_not_stale(
    runner: CliRunner, make_run: Callable[..., int], beat: Callable[[int, float], None]
):
    run_id = make_run("bravo", "running", epoch=2, total=4)
    beat(run_id, 1)

    result = runner.invoke(app, ["runs", "show", str(run_id)])

    assert result.exit_code == 0, result.output
    assert "stale" not in result.stdout
    assert re.search(r"heartbeat   last heartbeat \d s ago", result.stdout)


def test_runs_list_marks_the_stale_run_and_gives_its_last_heartbeat(
    runner: CliRunner, make_run: Callable[..., int], beat: Callable[[int, float], None]
):
    stale = make_run("alpha", "running", epoch=1, total=4)
    beat(stale, 90)
    alive = make_run("bravo", "running", epoch=1, total=4)
    beat(alive, 2)
    done = make_run("charlie", "completed", epoch=4, total=4)

    result = runner.invoke(app, ["runs", "list"])

    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["ID", "NAME", "STATUS", "EPOCH", "PROGRESS", "BEST", "UPDATED"]
    rows = {line.split()[0]: line for line in lines[1:4]}
    assert rows[str(stale)].split()[1:4] == ["alpha", "running", "(stale)"]
    assert rows[str(alive)].split()[1:3] == ["bravo", "running"]
    assert "stale" not in rows[str(alive)] + rows[str(done)]
    notes = " ".join(lines[4:])
    assert re.fullmatch(
        rf"run {stale} is stale: last heartbeat 9\d s ago \(lease ttl 15 s\); its worker is gone"
        rf" or cut off; resume it: taskkit resume {stale}",
        notes,
    )


def test_the_lease_ttl_setting_decides_when_a_run_is_stale(
    runner: CliRunner,
    make_run: Callable[..., int],
    beat: Callable[[int, float], None],
    monkeypatch: pytest.MonkeyPatch,
):
    from taskkit.config import reset_settings

    run_id = make_run("bravo", "running", epoch=2, total=4)
    beat(run_id, 60)
    monkeypatch.setenv("TASKKIT_LEASE_TTL", "120")
    reset_settings()
    try:
        result = runner.invoke(app, ["runs", "show", str(run_id)])
    finally:
        monkeypatch.delenv("TASKKIT_LEASE_TTL")
        reset_settings()

    assert result.exit_code == 0, result.output
    assert "stale" not in result.stdout


def test_watch_shows_a_stale_run_as_stale(
    runner: CliRunner,
    make_run: Callable[..., int],
    beat: Callable[[int, float], None],
    update_run: Callable[..., None],
    monkeypatch: pytest.MonkeyPatch,
):
    from taskkit.cli import _runview

    run_id = make_run("bravo", "running", epoch=2, total=4)
    beat(run_id, 60)
    reads = []

    def then_fail(seconds: float) -> None:  # the run is resumed elsewhere and fails
        reads.append(seconds)
        update_run(run_id, status="failed", error_message="gone")

    monkeypatch.setattr(_runview, "_sleep", then_fail)

    result = runner.invoke(app, ["runs", "show", str(run_id), "--watch", "--interval", "0.1"])

    assert result.exit_code == 1, result.output
    assert f"run {run_id}: running (stale), epoch 2/4, 50%" in result.stdout
