"""Training runs under SIGKILL, SIGTERM and time limits, with worker subprocesses on real Redis
and PostgreSQL.

Every trial checks the issue's three promises: the run completes, the epochs executed exceed
the total by at most the checkpoint interval per kill, and the final model is identical
(``np.array_equal``) to an uninterrupted run's. Kill moments are random; the seed of each
trial is printed so a failure can be replayed.
"""

from __future__ import annotations

import os
import random
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import Engine

from taskkit.config import reset_settings
from taskkit.db.models import ModelRun
from taskkit.db.session import session_scope
from taskkit.tasks import load_model, resume_run, submit_run
from tests._support.workers import WorkerProcess, wait_for
from tests.training import apps

EPOCHS = 10
CONFIG = {"epochs": EPOCHS, "seed": 9, "batch_size": 200, "epoch_pause": 0.25}


@pytest.fixture
def env(
    redis_url: str,
    pg_schema_url: str,
    pg_engine: Engine,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[dict[str, str]]:
    """PostgreSQL (taskkit's tables emptied after the test, by ``pg_engine``: the schema is
    this test process's, and a later test counting every dead letter in it must not find these
    runs' letters), a shared checkpoint directory and a short visibility timeout, for this
    process and its workers."""
    values = {
        "TASKKIT_DATABASE_URL": pg_schema_url,
        "TASKKIT_CHECKPOINT_DIR": str(tmp_path / "checkpoints"),
        "TASKKIT_TEST_VISIBILITY": "5",
        "TASKKIT_SECRET_KEY": "training-chaos-tests",
    }
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    reset_settings()
    apps.app.conf.taskkit_database_url = pg_schema_url
    yield values
    reset_settings()


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[list[WorkerProcess]]:
    started: list[WorkerProcess] = []
    yield started
    for worker in started:
        worker.stop()


def start(workers: list[WorkerProcess], name: str, log_dir: Path) -> WorkerProcess:
    worker = WorkerProcess(name, log_dir, app="tests.training.apps", queue=apps.QUEUE)
    workers.append(worker)
    worker.wait_ready()
    return worker


def status(run_id: int) -> str:
    with session_scope() as db:
        run = db.get(ModelRun, run_id)
        return run.status if run is not None else "missing"


def current_epoch_started(config: dict[str, Any]) -> int:
    started = apps.epochs_started(config)
    return started[-1] if started else -1


def wait_done(run_id: int, timeout: float = 90) -> None:
    wait_for(lambda: status(run_id) in ("completed", "failed"), timeout, f"run {run_id}")
    assert status(run_id) == "completed"


_reference: dict[str, Any] = {}


def reference() -> Any:
    """The model of an uninterrupted run of CONFIG, trained once per test session."""
    if "model" not in _reference:
        from tests.training.test_training import new_run

        config = {**CONFIG, "epoch_pause": 0.0}  # the pause only sleeps
        run_id = new_run(config)
        apps.train(run_id, config)
        _reference["model"] = load_model(run_id)
    return _reference["model"]


def assert_identical(run_id: int) -> None:
    model, expected = load_model(run_id), reference()
    assert np.array_equal(model.coef_, expected.coef_)
    assert np.array_equal(model.intercept_, expected.intercept_)


def new_config() -> dict[str, Any]:
    return {**CONFIG, "nonce": uuid.uuid4().hex}


def test_sigkill_of_the_pool_process_at_random_moments(
    env: dict[str, str], workers: list[WorkerProcess], tmp_path: Path
) -> None:
    worker = start(workers, "pool", tmp_path)
    for trial in range(3):
        seed = random.randrange(10**6)
        rng = random.Random(seed)
        config = new_config()
        run_id, _ = submit_run(apps.train, config, name=f"pool-kill-{trial}")
        kill_after = rng.randint(1, EPOCHS - 3)
        wait_for(
            lambda c=config, k=kill_after: current_epoch_started(c) >= k, 30, "training to start"
        )
        time.sleep(rng.uniform(0, 0.25))  # anywhere inside the epoch
        (child,) = worker.children()
        os.kill(child, signal.SIGKILL)

        wait_done(run_id)

        executed = len(apps.epochs_started(config))
        assert EPOCHS <= executed <= EPOCHS + 1, f"trial seed {seed}"
        assert_identical(run_id)


def test_sigkill_of_the_whole_worker_at_random_moments(
    env: dict[str, str], workers: list[WorkerProcess], tmp_path: Path
) -> None:
    for trial in range(2):
        seed = random.randrange(10**6)
        rng = random.Random(seed)
        config = new_config()
        doomed = start(workers, f"doomed{trial}", tmp_path)
        run_id, _ = submit_run(apps.train, config, name=f"worker-kill-{trial}")
        kill_after = rng.randint(1, EPOCHS - 3)
        wait_for(
            lambda c=config, k=kill_after: current_epoch_started(c) >= k, 30, "training to start"
        )
        time.sleep(rng.uniform(0, 0.25))
        doomed.kill()
        start(workers, f"survivor{trial}", tmp_path)

        wait_done(run_id, timeout=120)

        executed = len(apps.epochs_started(config))
        assert EPOCHS <= executed <= EPOCHS + 1, f"trial seed {seed}"
        assert_identical(run_id)


def test_sigterm_checkpoints_hands_over_and_a_new_worker_loses_no_epoch(
    env: dict[str, str], workers: list[WorkerProcess], tmp_path: Path
) -> None:
    config = new_config()
    first = start(workers, "terminated", tmp_path)
    run_id, _ = submit_run(apps.train, config, name="sigterm")
    wait_for(lambda: current_epoch_started(config) >= 3, 30, "training to start")

    os.kill(first.pid, signal.SIGTERM)  # warm shutdown, as systemd or Kubernetes sends it

    first.process.wait(timeout=20)
    assert "handed over" in first.log()
    start(workers, "next", tmp_path)
    wait_done(run_id)
    assert apps.epochs_started(config) == list(range(EPOCHS))
    assert_identical(run_id)


def history(config: dict[str, Any], started: list[int], worker: WorkerProcess) -> str:
    """What a failed bound needs to be read: the epochs started, where each limit struck and
    what each attempt resumed from (the worker's log)."""
    marks = ("resumes at epoch", "Soft time limit", "checkpointing", "received", "succeeded")
    lines = [line for line in worker.log().splitlines() if any(m in line for m in marks)]
    return "\n".join(
        [f"epochs started: {started}", *apps.limits(config), *(line[:200] for line in lines)]
    )


def test_a_real_soft_time_limit_fails_the_run_and_resume_finishes_it(
    env: dict[str, str], workers: list[WorkerProcess], tmp_path: Path
) -> None:
    config = new_config()  # 10 epochs of 0.25 s; each attempt has a 1 s soft limit
    start(workers, "limited", tmp_path)
    run_id, _ = submit_run(apps.train_limited, config, name="soft-limit")
    attempts = 1

    def finish() -> str:
        wait_for(lambda: status(run_id) in ("completed", "failed"), 60, "the attempt to end")
        return status(run_id)

    while finish() == "failed":
        with session_scope() as db:
            run = db.get(ModelRun, run_id)
            assert run is not None
            assert "soft time limit exceeded" in (run.error_message or "")
        assert attempts < 8, "the run does not progress between attempts"
        resume_run(apps.app, run_id)  # what `taskkit resume RUN_ID` does
        attempts += 1

    assert attempts >= 2
    # Each limit cuts at most the epoch in progress; the rest resumes from the checkpoint.
    started = apps.epochs_started(config)
    assert len(started) <= EPOCHS + attempts - 1, history(config, started, workers[0])
    assert_identical(run_id)


def test_a_soft_time_limit_inside_a_checkpoint_write_fails_the_run_and_is_not_retried(
    env: dict[str, str], workers: list[WorkerProcess], tmp_path: Path
) -> None:
    """Celery raises the soft limit wherever the task is. Inside a checkpoint write the store
    wrapped it in a ``CheckpointError``, which the retry ladder retried in place: the run went
    on past its limit, ``retrying`` instead of ``failed``, and resumed one epoch more than the
    limit had cut (the flake of the test above, when the real limit struck there)."""
    config = {**new_config(), "test": {"soft_limit_in_checkpoint_at": 3}}
    start(workers, "limit-in-write", tmp_path)
    run_id, task_id = submit_run(apps.train_limit_in_write, config, name="limit-in-write")

    wait_for(lambda: status(run_id) in ("completed", "failed"), 60, "the attempt to end")
    with session_scope() as db:
        run = db.get(ModelRun, run_id)
        assert run is not None
        assert (run.status, run.error_message) == (
            "failed",
            "soft time limit exceeded; checkpointed, continue with: taskkit resume",
        )
    assert apps.deliveries(task_id) == 1  # failed, not retried
    assert apps.epochs_started(config) == [0, 1, 2, 3]

    resume_run(apps.app, run_id)
    wait_done(run_id)
    # The write of epoch 3 was cut: the run resumed from epoch 2's checkpoint.
    assert apps.epochs_started(config) == [0, 1, 2, 3, *range(3, EPOCHS)]
    assert_identical(run_id)


def test_a_soft_time_limit_caught_on_the_way_still_ends_the_attempt_at_the_epoch_end(
    env: dict[str, str], workers: list[WorkerProcess], tmp_path: Path
) -> None:
    """The limit is raised wherever the task is: a progress write or a database read that
    catches every ``Exception`` swallowed it, and the attempt trained on with no limit at all
    (the real soft-limit test then saw one attempt). The signal is latched: the report of the
    epoch it struck in checkpoints that epoch and fails the run."""
    config = {**new_config(), "test": {"swallowed_soft_limit_at": 4}}
    start(workers, "swallowed", tmp_path)
    run_id, task_id = submit_run(apps.train, config, name="swallowed-limit")

    wait_for(lambda: status(run_id) in ("completed", "failed"), 60, "the attempt to end")
    with session_scope() as db:
        run = db.get(ModelRun, run_id)
        assert run is not None
        assert (run.status, run.error_message) == (
            "failed",
            "soft time limit exceeded; checkpointed, continue with: taskkit resume",
        )
    assert apps.deliveries(task_id) == 1
    assert apps.epochs_started(config) == [0, 1, 2, 3, 4]

    resume_run(apps.app, run_id)
    wait_done(run_id)
    assert apps.epochs_started(config) == list(range(EPOCHS))  # epoch 4 was checkpointed
    assert_identical(run_id)
