"""Replaying the dead letter of a TrainingTask failure (issue 14 item 7): through a real Celery
worker (in process, solo pool) on the Redis broker, with the training tests' app.

Before, the replay sent the task's arguments again with a new task id; the worker saw that the
run still belonged to the failed attempt's task id and dropped the message ("run N now belongs
to task ...; dropping"), while the letter was marked ``replayed`` and the run stayed failed.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery.result import AsyncResult

from taskkit.config import reset_settings
from taskkit.db.models import ModelRun
from taskkit.db.session import session_scope
from taskkit.deadletter import DeadLetterStore
from taskkit.errors import ReplayRejected
from taskkit.tasks import replay_dead_letters, submit_run
from tests._support.apps import RedisTestApp
from tests._support.workers import wait_for
from tests.training import apps

pytestmark = pytest.mark.redis

CONFIG = {"epochs": 6, "seed": 5, "batch_size": 200}


@pytest.fixture(scope="module")
def worker_app() -> RedisTestApp:
    return apps.kit


@pytest.fixture(autouse=True)
def training_env(
    worker: object, default_database: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[None]:
    monkeypatch.setenv("TASKKIT_CHECKPOINT_DIR", str(tmp_path / "checkpoints"))
    monkeypatch.setenv("TASKKIT_SECRET_KEY", "replay-training-tests-key-0123456789")
    reset_settings()
    apps.app.conf.taskkit_database_url = default_database
    yield
    reset_settings()


def run_of(run_id: int) -> tuple[str, str | None]:
    with session_scope() as db:
        run = db.get(ModelRun, run_id)
        assert run is not None
        return run.status, run.task_id


def failed_run(store: DeadLetterStore) -> tuple[int, dict[str, Any], int]:
    """A run that failed for good at epoch 3 (a soft time limit), and its dead letter."""
    config = {**CONFIG, "nonce": uuid.uuid4().hex, "test": {"soft_limit_at": 3}}
    run_id, _ = submit_run(apps.train, config, name="replayed")
    wait_for(lambda: run_of(run_id)[0] == "failed", 60, f"run {run_id} to fail")
    wait_for(lambda: store.list(task=apps.train.name) != [], 10, "its dead letter")
    [letter] = store.list(task=apps.train.name)
    assert letter.payload["args"][0] == run_id
    return run_id, config, letter.id


def test_replaying_a_training_letter_resumes_the_run(default_database: str) -> None:
    store = DeadLetterStore(default_database, app=apps.app, queue="")
    run_id, _, letter_id = failed_run(store)

    result = replay_dead_letters([letter_id], app=apps.app, store=store)

    [sent] = result.sent
    assert (sent.task_name, sent.batch_id, sent.letter_ids) == (apps.train.name, None, [letter_id])
    outcome = AsyncResult(sent.task_id, app=apps.app).get(timeout=30)
    assert outcome["resumed_from"] == 3  # from its checkpoint, as `taskkit resume` does
    assert run_of(run_id) == ("completed", sent.task_id)
    letter = store.get(letter_id)
    assert (letter.status, letter.replay_task_id) == ("replayed", sent.task_id)


def test_a_training_letter_whose_run_is_not_failed_is_refused(default_database: str) -> None:
    store = DeadLetterStore(default_database, app=apps.app, queue="")
    run_id, _, letter_id = failed_run(store)
    with session_scope() as db:  # resumed by hand meanwhile, and finished
        run = db.get(ModelRun, run_id)
        assert run is not None
        run.status = "completed"

    with pytest.raises(ReplayRejected, match=f"run {run_id} is completed"):
        replay_dead_letters([letter_id], app=apps.app, store=store)

    assert store.get(letter_id).status == "dead"
    with pytest.raises(ReplayRejected, match="resumes into its own task"):
        replay_dead_letters([letter_id], app=apps.app, store=store, into=apps.train_every3.name)
