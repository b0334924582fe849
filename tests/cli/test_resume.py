"""``taskkit resume``: a failed or interrupted run goes back on the queue, or a clear refusal."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from typer.testing import CliRunner

from taskkit.cli import app
from taskkit.db.models import ModelRun
from taskkit.tasks import LeaseOwner
from tests.cli import cliapp

pytestmark = pytest.mark.redis


def _save_checkpoint(run_id: int, epoch: int) -> None:
    # Where the run's task keeps it: under the run's identity (from TASKKIT_DATABASE_URL).
    from taskkit.db.session import session_scope

    with session_scope() as session:
        run_uid = session.get(ModelRun, run_id).uid  # type: ignore[union-attr]
    with cliapp.app.tasks[cliapp.TRAIN].checkpoint_store(run_id, run_uid=run_uid) as store:
        store.save({"seen": epoch + 1}, step=epoch, metrics={"score": 0.5})


def test_resume_of_an_unknown_run_exits_3(runner: CliRunner, database: str):
    result = runner.invoke(app, ["resume", "4242"])

    assert result.exit_code == 3, result.output
    assert result.stderr.startswith("error: training run 4242 does not exist in ")
    assert cliapp.queued() == []


def test_resume_of_a_completed_run_exits_4(runner: CliRunner, make_run: Callable[..., int]):
    run_id = make_run("done", "completed", final_score=0.9)
    _save_checkpoint(run_id, 3)

    result = runner.invoke(app, ["resume", str(run_id)])

    assert result.exit_code == 4, result.output
    assert result.stderr == f"error: training run {run_id} is already completed\n"
    assert cliapp.queued() == []


def test_resume_of_a_run_whose_worker_holds_its_lease_exits_5(
    runner: CliRunner, make_run: Callable[..., int]
):
    run_id = make_run("busy", "running", epoch=2, total=4)
    _save_checkpoint(run_id, 1)
    task = cliapp.app.tasks[cliapp.TRAIN]
    lease = task.lease_store().acquire(
        task.lease_name((), {"model_run_id": run_id}), LeaseOwner.here("other"), 30
    )
    assert lease is not None
    try:
        result = runner.invoke(app, ["resume", str(run_id)])
    finally:
        lease.release()

    assert result.exit_code == 5, result.output
    assert f"error: training run {run_id} is still running on a live worker" in result.stderr
    assert cliapp.queued() == []


def test_resume_of_a_run_without_a_checkpoint_exits_6(
    runner: CliRunner, make_run: Callable[..., int], read_row: Callable[[int], ModelRun]
):
    run_id = make_run("early", "failed", error="KeyError: 'x'")

    result = runner.invoke(app, ["resume", str(run_id)])

    assert result.exit_code == 6, result.output
    assert f"training run {run_id} has no checkpoint to resume from" in result.stderr
    assert read_row(run_id).status == "failed"


def test_resume_of_a_run_whose_task_the_app_lacks_exits_2(
    runner: CliRunner, make_run: Callable[..., int]
):
    run_id = make_run("orphan", "failed", task_name="gone.train")
    _save_checkpoint(run_id, 0)

    result = runner.invoke(app, ["resume", str(run_id)])

    assert result.exit_code == 2, result.output
    assert "names task 'gone.train', which this app does not register" in result.stderr


@pytest.mark.parametrize("status", ["failed", "running"])
def test_resume_of_an_interrupted_run_with_a_checkpoint_requeues_it_with_a_new_task_id(
    runner: CliRunner,
    make_run: Callable[..., int],
    read_row: Callable[[int], ModelRun],
    status: str,
):
    # "running" with nobody holding the lease: its worker died
    run_id = make_run("broken", status, epoch=2, total=4, error="WorkerLost")
    _save_checkpoint(run_id, 1)

    result = runner.invoke(app, ["resume", str(run_id)])

    assert result.exit_code == 0, result.output
    run = read_row(run_id)
    assert (run.status, run.error_message) == ("queued", None)
    assert run.task_id != "task-broken"
    assert result.stdout.startswith(f"resumed run {run_id} as task {run.task_id}\n")
    [message] = cliapp.queued()
    assert message["headers"]["id"] == run.task_id
    assert message["headers"]["task"] == cliapp.TRAIN
