"""Issue 16, steering runs: stop, resume and fork through a real worker subprocess on the
embedded defaults (taskkit+sqlite broker, SQLite database, checkpoints under TASKKIT_HOME).

- a running run asked to stop checkpoints the epoch it finished and ends ``stopped``;
  ``resume_run`` continues it to the same model as an uninterrupted run, no epoch lost or twice;
- a run stopped while queued never trains;
- a fork from step N trains from epoch N+1 with the overridden config, and leaves its parent
  as it was; a fork from a checkpoint that does not verify is refused and makes no run.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from celery import Celery
from celery.result import AsyncResult

from taskkit.checkpoint import CheckpointStore
from taskkit.db.models import ModelRun
from taskkit.db.runs import read_epochs
from taskkit.db.session import session_scope
from taskkit.errors import CheckpointTampered, RunNotResumable, RunNotStoppable
from taskkit.tasks import fork_run, load_model, resume_run, stop_run, submit_run
from tests._support.workers import wait_for
from tests.training import steerapp

KEY = "steering-tests-key-0123456789"


@pytest.fixture(scope="module")
def steering(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Celery]:
    """A worker subprocess on a home of this module's own, and the same app in this process."""
    with steerapp.steering_worker(tmp_path_factory.mktemp("steer"), KEY) as app:
        yield app


def row(run_id: int) -> ModelRun:
    with session_scope() as db:
        run = db.get(ModelRun, run_id)
        assert run is not None
        db.expunge(run)
        return run


def wait_status(run_id: int, wanted: str, timeout: float = 90) -> None:
    def reached() -> bool:
        status = row(run_id).status
        assert status != "failed" or wanted == "failed", row(run_id).error_message
        return status == wanted

    wait_for(reached, timeout, f"run {run_id} to be {wanted}", step=0.1)


def store(app: Celery, run_id: int) -> CheckpointStore:
    return app.tasks[steerapp.TASK].checkpoint_store(run_id)  # type: ignore[no-any-return]


def epochs(run_id: int) -> list[int]:
    return [epoch for epoch, _ in steerapp.epochs_trained(run_id)]


def history(run_id: int) -> list[int]:
    """The epochs (1-based) of the run's ``training_epochs`` rows."""
    return [epoch for epoch, _ in read_epochs(run_id, limit=None)]


def start_and_stop(app: Celery, config: dict[str, Any], after: int) -> int:
    """Submit a run, stop it once ``after`` epochs started; returns its id, stopped."""
    run_id, _ = submit_run(app.tasks[steerapp.TASK], config, name="steered")
    wait_for(lambda: len(epochs(run_id)) >= after, 90, f"{after} epochs of run {run_id}")
    assert stop_run(run_id) == "stopping"
    assert stop_run(run_id) == "stopping"  # a second stop changes nothing
    wait_status(run_id, "stopped")
    return run_id


def test_a_stopped_run_ends_stopped_with_a_checkpoint_and_resume_completes_it(
    steering: Celery,
) -> None:
    config = {"epochs": 10, "seed": 4, "epoch_pause": 0.3}
    run_id = start_and_stop(steering, config, after=2)

    stopped = row(run_id)
    trained = epochs(run_id)
    assert len(trained) < 10
    assert trained == list(range(len(trained)))
    with store(steering, run_id) as checkpoints:
        latest = checkpoints.latest()
    assert latest is not None
    assert latest.step == trained[-1]  # the epoch it finished when it stopped: checkpointed
    assert stopped.stop_requested_at is not None
    assert "stopped on request" not in (stopped.error_message or "")
    # Every epoch it finished is in the history, those the progress throttle held back too
    # (0.3 s epochs, one progress write a second): written before the stopped status.
    assert history(run_id) == [epoch + 1 for epoch in trained]
    with pytest.raises(RunNotStoppable, match="is stopped"):
        stop_run(run_id)

    resume_run(steering, run_id)
    wait_status(run_id, "completed")

    assert epochs(run_id) == list(range(10))  # each epoch once: none lost, none repeated
    assert history(run_id) == list(range(1, 11))
    assert row(run_id).stop_requested_at is None
    reference_id, _ = submit_run(
        steering.tasks[steerapp.TASK], {**config, "epoch_pause": 0}, name="reference"
    )
    wait_status(reference_id, "completed")
    resumed, uninterrupted = load_model(run_id), load_model(reference_id)
    assert np.array_equal(resumed.coef_, uninterrupted.coef_)
    assert np.array_equal(resumed.intercept_, uninterrupted.intercept_)


def test_a_run_stopped_while_queued_never_trains(steering: Celery) -> None:
    run_id, task_id = submit_run(
        steering.tasks[steerapp.TASK], {"epochs": 3, "seed": 1}, name="early", countdown=3
    )

    assert stop_run(run_id) == "stopped"

    result = AsyncResult(task_id, app=steering).get(timeout=60)
    assert result == {"status": "stopped", "model_run_id": run_id, "epoch": None}
    assert row(run_id).status == "stopped"
    assert epochs(run_id) == []
    resume_run(steering, run_id)  # no checkpoint needed: it starts from the beginning
    wait_status(run_id, "completed")
    assert epochs(run_id) == [0, 1, 2]


def test_a_fork_trains_from_the_step_after_with_its_overrides_and_leaves_the_parent(
    steering: Celery,
) -> None:
    parent_id = start_and_stop(steering, {"epochs": 8, "seed": 2, "epoch_pause": 0.3}, after=3)
    parent = row(parent_id)
    with store(steering, parent_id) as checkpoints:
        parent_steps = [info.step for info in checkpoints.list()]
    assert 1 in parent_steps

    fork_id, _ = fork_run(
        steering, parent_id, from_step=1, config={"alpha": 0.01, "epoch_pause": 0}, name="lower"
    )
    wait_status(fork_id, "completed")

    fork = row(fork_id)
    assert steerapp.epochs_trained(fork_id) == [(epoch, 0.01) for epoch in range(2, 8)]
    # The fork's history: the parent's epochs 1-2 (copied when it was made), then its own.
    assert history(fork_id) == list(range(1, 9))
    assert read_epochs(fork_id, limit=2) == read_epochs(parent_id, limit=2)
    assert fork.config == {**parent.config, "alpha": 0.01, "epoch_pause": 0}
    assert (fork.parent_run_id, fork.parent_step, fork.name) == (parent_id, 1, "lower")
    assert fork.uid != parent.uid
    assert load_model(fork_id).alpha == 0.01
    # The parent is as it was: its row, its epochs, its checkpoints.
    after = row(parent_id)
    assert (after.status, after.config, after.version) == ("stopped", parent.config, parent.version)
    with store(steering, parent_id) as checkpoints:
        assert [info.step for info in checkpoints.list()] == parent_steps
    assert all(alpha is None for _, alpha in steerapp.epochs_trained(parent_id))


def test_a_fork_names_the_steps_there_are_and_refuses_a_checkpoint_that_does_not_verify(
    steering: Celery,
) -> None:
    parent_id = start_and_stop(steering, {"epochs": 8, "seed": 5, "epoch_pause": 0.3}, after=2)
    with store(steering, parent_id) as checkpoints:
        steps = [info.step for info in checkpoints.list()]
    before = _count_runs()

    with pytest.raises(
        RunNotResumable,
        match=r"no checkpoint at step 99 \(its checkpoint steps: " + ", ".join(map(str, steps)),
    ):
        fork_run(steering, parent_id, from_step=99)
    # The parent's newest checkpoint re-signed with another key: refused, never copied.
    with store(steering, parent_id) as checkpoints:
        state = checkpoints.load(steps[-1]).state
    uid = row(parent_id).uid
    with CheckpointStore(parent_id, run_uid=uid, secret_key="another-key-0123456789") as forged:
        forged.save(state, step=steps[-1])
    with pytest.raises(CheckpointTampered):
        fork_run(steering, parent_id)

    assert _count_runs() == before


def _count_runs() -> int:
    with session_scope() as db:
        return db.query(ModelRun).count()


def test_stop_and_fork_of_an_unknown_run_say_so(steering: Celery) -> None:
    from taskkit.errors import RunNotFound

    with pytest.raises(RunNotFound):
        stop_run(987654)
    with pytest.raises(RunNotFound):
        fork_run(steering, 987654)


def test_the_copy_of_a_checkpoint_keeps_its_bytes_under_the_forks_identity(tmp_path: Path) -> None:
    from taskkit.checkpoint import DirectoryStorage

    storage = DirectoryStorage(tmp_path)
    source = CheckpointStore(1, run_uid="a" * 32, storage=storage, secret_key=KEY)
    source.save({"w": [1, 2, 3]}, step=4, metrics={"loss": 0.5}, is_best=True)
    target = CheckpointStore(2, run_uid="b" * 32, storage=storage, secret_key=KEY)

    copied = target.copy_from(source, 4)

    assert (copied.run_id, copied.run_uid, copied.step) == (target.run_id, "b" * 32, 4)
    assert (copied.metrics, copied.is_best) == ({"loss": 0.5}, True)
    assert copied.blake3 == source.latest().blake3 is not None  # type: ignore[union-attr]
    assert target.load_latest().state == {"w": [1, 2, 3]}  # type: ignore[union-attr]


def test_a_run_asked_to_stop_whose_worker_died_is_stopped_not_resumed(steering: Celery) -> None:
    from taskkit.tasks._runs import resume_runs_without_trainer

    with session_scope() as db:
        run = ModelRun(
            name="orphan", model_type="sgd", config={}, status="running", task_name=steerapp.TASK
        )
        db.add(run)
        db.flush()
        run_id = run.id
    assert stop_run(run_id, lease_alive=lambda *_: True) == "stopping"

    assert resume_runs_without_trainer(steering, lambda *_: False) == []

    assert row(run_id).status == "stopped"
