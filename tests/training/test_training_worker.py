"""TrainingTask through a real Celery worker (in process, solo pool) on the real Redis broker.

The run's status transitions are recorded by a SQLAlchemy listener on ``ModelRun`` in this
process, where the worker runs: every status the row was written with, in order.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from celery.result import AsyncResult
from sqlalchemy import event

from taskkit.config import reset_settings
from taskkit.db.models import ModelRun
from taskkit.db.session import session_scope
from taskkit.tasks import load_model, resume_run, submit_run
from tests._support.workers import wait_for
from tests.training import apps

CONFIG = {"epochs": 6, "seed": 5, "batch_size": 200}


@pytest.fixture(autouse=True)
def training_env(
    worker: object, default_database: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[None]:
    monkeypatch.setenv("TASKKIT_CHECKPOINT_DIR", str(tmp_path / "checkpoints"))
    monkeypatch.setenv("TASKKIT_SECRET_KEY", "training-tests-key")
    reset_settings()
    apps.app.conf.taskkit_database_url = default_database
    yield
    reset_settings()


@pytest.fixture
def statuses() -> Iterator[dict[int, list[str]]]:
    seen: dict[int, list[str]] = {}

    def record(_mapper: Any, _connection: Any, run: ModelRun) -> None:
        history = seen.setdefault(run.id, [])
        if not history or history[-1] != run.status:
            history.append(run.status)

    event.listen(ModelRun, "after_insert", record)
    event.listen(ModelRun, "after_update", record)
    yield seen
    event.remove(ModelRun, "after_insert", record)
    event.remove(ModelRun, "after_update", record)


def cfg(**extra: Any) -> dict[str, Any]:
    return {**CONFIG, "nonce": uuid.uuid4().hex, **extra}


def finished(run_id: int) -> str:
    def status() -> str:
        with session_scope() as db:
            run = db.get(ModelRun, run_id)
            return run.status if run is not None else "missing"

    wait_for(lambda: status() in ("completed", "failed"), 60, f"run {run_id} to finish")
    return status()


def reference_model(config: dict[str, Any]) -> Any:
    plain = {k: v for k, v in config.items() if k not in ("test", "nonce")}
    run_id, task_id = submit_run(apps.train, plain, name="reference")
    AsyncResult(task_id, app=apps.app).get(timeout=60)
    return load_model(run_id)


def assert_same(a: Any, b: Any) -> None:
    assert np.array_equal(a.coef_, b.coef_)
    assert np.array_equal(a.intercept_, b.intercept_)


def test_status_moves_queued_running_retrying_running_completed(
    statuses: dict[int, list[str]],
) -> None:
    config = cfg(test={"fail_at": 2})
    run_id, task_id = submit_run(apps.train, config, name="ladder")

    result = AsyncResult(task_id, app=apps.app).get(timeout=60)

    assert statuses[run_id] == ["queued", "running", "retrying", "running", "completed"]
    assert result["resumed_from"] == 2
    assert apps.epochs_started(config) == [0, 1, 2, 2, 3, 4, 5]
    with session_scope() as db:
        run = db.get(ModelRun, run_id)
        assert run is not None
        assert run.error_message is None
        assert run.task_name == apps.train.name
    assert_same(load_model(run_id), reference_model(config))


def test_a_stop_request_checkpoints_hands_over_and_loses_no_epoch() -> None:
    config = cfg(test={"stop_at": 2})
    run_id, task_id = submit_run(apps.train, config, name="handover")

    result = AsyncResult(task_id, app=apps.app).get(timeout=60)

    assert result["resumed_from"] == 3  # epoch 2 finished, was checkpointed, then handed over
    assert apps.epochs_started(config) == [0, 1, 2, 3, 4, 5]
    assert_same(load_model(run_id), reference_model(config))


def test_a_copy_of_a_completed_run_returns_its_result_without_training() -> None:
    config = cfg()
    run_id, task_id = submit_run(apps.train, config, name="done")
    first = AsyncResult(task_id, app=apps.app).get(timeout=60)
    before = apps.epochs_started(config)

    apps.train.apply_async((run_id, config), task_id=task_id)  # a redelivered copy
    wait_for(lambda: apps.deliveries(task_id) == 2, 30, "the copy to be delivered")
    other = apps.train.apply_async((run_id, config)).get(timeout=30)  # a stray duplicate

    assert AsyncResult(task_id, app=apps.app).get(timeout=5) == first  # kept, not replaced
    assert other == {"status": "success", "model_run_id": run_id, "best_score": first["best_score"]}
    assert apps.epochs_started(config) == before


def test_a_soft_time_limit_fails_the_run_and_resume_continues_it(
    statuses: dict[int, list[str]],
) -> None:
    config = cfg(test={"soft_limit_at": 3})
    run_id, task_id = submit_run(apps.train, config, name="limited")

    assert finished(run_id) == "failed"
    with session_scope() as db:
        run = db.get(ModelRun, run_id)
        assert run is not None
        assert "soft time limit exceeded" in (run.error_message or "")
    assert apps.train.checkpoint_store(run_id).latest().step == 2  # type: ignore[union-attr]

    new_task_id = resume_run(apps.app, run_id)

    assert new_task_id != task_id
    result = AsyncResult(new_task_id, app=apps.app).get(timeout=60)
    assert result["resumed_from"] == 3
    assert statuses[run_id] == ["queued", "running", "failed", "queued", "running", "completed"]
    assert_same(load_model(run_id), reference_model(config))


def test_a_copy_superseded_by_resume_drops_itself() -> None:
    config = cfg(test={"soft_limit_at": 1})
    run_id, old_task_id = submit_run(apps.train, config, name="superseded")
    assert finished(run_id) == "failed"
    trained = apps.epochs_started(config)
    with session_scope() as db:  # what resume_run does before it sends the new attempt
        run = db.get(ModelRun, run_id)
        assert run is not None
        run.task_id, run.status = "the-new-attempt", "queued"

    apps.train.apply_async((run_id, config), task_id=old_task_id)  # the old attempt, again
    wait_for(lambda: apps.deliveries(old_task_id) == 2, 30, "the old copy to be delivered")
    time.sleep(0.3)

    assert apps.epochs_started(config) == trained
    with session_scope() as db:
        run = db.get(ModelRun, run_id)
        assert run is not None
        assert (run.task_id, run.status) == ("the-new-attempt", "queued")
