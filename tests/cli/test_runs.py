"""``taskkit runs list`` and ``taskkit runs show [--watch]``: the database, drawn."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable

import pytest
from sqlalchemy.exc import OperationalError
from typer.testing import CliRunner

from taskkit.cli import _runview, app
from taskkit.cli._runview import watch
from taskkit.db.runs import RunView
from tests.conftest import FakeClock


def test_runs_list_shows_the_newest_runs_first(
    runner: CliRunner, make_run: Callable[..., int], update_run: Callable[..., None]
):
    first = make_run("alpha", "completed", epoch=4, total=4, final_score=0.875)
    second = make_run("bravo", "running", epoch=2, total=4, metrics={"best_score": 0.5})
    third = make_run("charlie", "failed", error="KeyError: 'x'")

    result = runner.invoke(app, ["runs", "list"])

    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["ID", "NAME", "STATUS", "EPOCH", "PROGRESS", "BEST", "UPDATED"]
    rows = [line.split() for line in lines[1:]]
    assert [row[:6] for row in rows] == [
        [str(third), "charlie", "failed", "0/4", "0%", "-"],
        [str(second), "bravo", "running", "2/4", "50%", "0.5"],
        [str(first), "alpha", "completed", "4/4", "100%", "0.875"],
    ]


def test_runs_list_filters_by_status_and_limits(runner: CliRunner, make_run: Callable[..., int]):
    make_run("alpha", "failed")
    make_run("bravo", "completed")
    make_run("charlie", "failed")

    failed = runner.invoke(app, ["runs", "list", "--status", "failed"])
    newest = runner.invoke(app, ["runs", "list", "--limit", "1"])
    none = runner.invoke(app, ["runs", "list", "--status", "retrying"])

    assert failed.exit_code == 0, failed.output
    assert "charlie" in failed.stdout
    assert "alpha" in failed.stdout
    assert "bravo" not in failed.stdout
    assert "charlie" in newest.stdout
    assert "bravo" not in newest.stdout
    assert none.exit_code == 0
    assert "no runs with status 'retrying'" in none.stdout


def test_runs_list_with_an_unreachable_database_exits_1_without_the_password(runner: CliRunner):
    url = "postgresql+psycopg://app:hunter2@127.0.0.1:1/prod"

    result = runner.invoke(app, ["runs", "list", "--url", url])

    assert result.exit_code == 1
    assert result.stderr.startswith("error: could not use database postgresql://127.0.0.1:1/prod")
    assert "hunter2" not in result.output


def test_runs_show_prints_status_epoch_metrics_and_progress(
    runner: CliRunner, make_run: Callable[..., int]
):
    from tests.cli import cliapp

    run_id = make_run("bravo", "running", epoch=3, total=10, metrics={"loss": 0.123456, "acc": 1})

    result = runner.invoke(app, ["runs", "show", str(run_id)])

    assert result.exit_code == 0, result.output
    out = result.stdout
    assert f"run         {run_id} bravo" in out
    assert "status      running" in out
    assert f"task        {cliapp.TRAIN} [task-bravo]" in out
    assert "epoch       3/10" in out
    assert "━━━━━━━━━━━━" in out
    assert "30%" in out
    assert "metrics     acc=1  loss=0.1235" in out
    assert "completed   -" in out


def test_runs_show_prints_the_error_of_a_failed_run(
    runner: CliRunner, make_run: Callable[..., int]
):
    run_id = make_run("charlie", "failed", error="soft time limit exceeded")

    result = runner.invoke(app, ["runs", "show", str(run_id)])

    assert result.exit_code == 0
    assert "error       soft time limit exceeded" in result.stdout


def test_runs_show_of_an_unknown_run_exits_3(runner: CliRunner, database: str):
    result = runner.invoke(app, ["runs", "show", "4242"])

    assert result.exit_code == 3
    assert result.stderr.startswith("error: training run 4242 does not exist in ")


def test_watch_reads_once_per_interval_until_the_run_completes(
    runner: CliRunner,
    make_run: Callable[..., int],
    update_run: Callable[..., None],
    monkeypatch: pytest.MonkeyPatch,
):
    run_id = make_run("bravo", "running", epoch=1, total=4)
    sleeps: list[float] = []

    def worker_progresses(seconds: float) -> None:  # what the worker does between two reads
        sleeps.append(seconds)
        if len(sleeps) == 1:
            update_run(run_id, epoch=3)
        else:
            update_run(run_id, status="completed", epoch=4, final_score=0.75)

    monkeypatch.setattr(_runview, "_sleep", worker_progresses)

    result = runner.invoke(app, ["runs", "show", str(run_id), "--watch", "--interval", "0.5"])

    assert result.exit_code == 0, result.output
    assert len(sleeps) == 2
    assert all(0 < s <= 0.5 for s in sleeps)
    out = result.stdout
    assert out.index(f"run {run_id}: running, epoch 1/4, 25%") < out.index("epoch 3/4, 75%")
    assert f"run {run_id}: completed, epoch 4/4, 100%" in out
    assert "best score  0.75" in out


def test_watch_exits_1_when_the_run_fails(
    runner: CliRunner,
    make_run: Callable[..., int],
    update_run: Callable[..., None],
    monkeypatch: pytest.MonkeyPatch,
):
    run_id = make_run("bravo", "running", epoch=1, total=4)
    monkeypatch.setattr(
        _runview, "_sleep", lambda s: update_run(run_id, status="failed", error_message="boom")
    )

    result = runner.invoke(app, ["runs", "show", str(run_id), "--watch"])

    assert result.exit_code == 1
    assert f"run {run_id}: failed" in result.stdout
    assert result.stderr == f"error: run {run_id} failed: boom\n"


def test_watch_follows_a_run_updated_by_another_thread_in_real_time(
    runner: CliRunner,
    make_run: Callable[..., int],
    update_run: Callable[..., None],
    monkeypatch: pytest.MonkeyPatch,
):
    run_id = make_run("bravo", "queued")
    reads: list[float] = []
    read = _runview.read_run
    monkeypatch.setattr(
        "taskkit.cli._runview.read_run", lambda *a: reads.append(time.monotonic()) or read(*a)
    )
    finisher = threading.Timer(0.4, update_run, (run_id,), {"status": "completed"})
    finisher.start()
    try:
        result = runner.invoke(app, ["runs", "show", str(run_id), "--watch", "--interval", "0.1"])
    finally:
        finisher.join()

    assert result.exit_code == 0, result.output
    assert f"run {run_id}: completed" in result.stdout
    gaps = [b - a for a, b in itertools.pairwise(reads)]
    assert 2 <= len(reads) <= 8, reads  # no busy loop: one read per 0.1 s
    assert all(gap >= 0.09 for gap in gaps), gaps


def test_ctrl_c_while_watching_exits_130(
    runner: CliRunner, make_run: Callable[..., int], monkeypatch: pytest.MonkeyPatch
):
    run_id = make_run("bravo", "running", epoch=1, total=4)

    def interrupted(seconds: float) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(_runview, "_sleep", interrupted)

    result = runner.invoke(app, ["runs", "show", str(run_id), "--watch"])

    assert result.exit_code == 130
    assert result.stderr == f"error: interrupted; run {run_id} goes on without you watching it\n"


def _view(status: str, epoch: int) -> RunView:
    return RunView(
        id=1, name="r", status=status, task_id=None, task_name=None, error=None,
        created_at=None, started_at=None, completed_at=None, updated_at=None,
        final_score=None, epoch=epoch, total_epochs=3, percent=100 * epoch / 3,
    )  # fmt: skip


def test_watch_waits_what_is_left_of_the_interval_after_each_read(clock: FakeClock):
    from rich.console import Console

    views = iter([_view("running", 1), _view("running", 2), _view("completed", 3)])

    def slow_read() -> RunView:
        clock.advance(0.25)  # a read takes a quarter of a second
        return next(views)

    console = Console(file=__import__("io").StringIO(), width=100)
    final = watch(slow_read, console, 1.0, clock=clock, sleep=clock.sleep)

    assert final.status == "completed"
    assert clock.sleeps == [0.75, 0.75]


def test_watch_goes_on_through_a_database_blip_after_the_first_read(clock: FakeClock):
    import io

    from rich.console import Console

    blip = OperationalError("SELECT", {}, Exception("server closed the connection"))
    answers: list[RunView | Exception] = [_view("running", 1), blip, _view("completed", 3)]

    def read() -> RunView:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    text = io.StringIO()
    final = watch(read, Console(file=text, width=100), 0.5, clock=clock, sleep=clock.sleep)

    assert final.status == "completed"
    assert clock.sleeps == [0.5, 0.5]
    assert (
        "run 1: running, epoch 1/3, 33% (database did not answer (server closed" in text.getvalue()
    )

    answers[:] = [blip]
    with pytest.raises(OperationalError):  # the first read must work
        watch(read, Console(file=io.StringIO()), 0.5, clock=clock, sleep=clock.sleep)


def test_watch_on_a_terminal_redraws_one_live_view(clock: FakeClock):
    import io

    from rich.console import Console

    views = iter([_view("running", 1), _view("completed", 3)])
    text = io.StringIO()
    console = Console(file=text, width=100, force_terminal=True, color_system=None)

    final = watch(lambda: next(views), console, 0.5, clock=clock, sleep=clock.sleep)

    assert final.status == "completed"
    shown = text.getvalue()
    assert "status      running" in shown
    assert "status      completed" in shown
    assert "run 1: running" not in shown  # the line-per-change form is for logs and pipes
