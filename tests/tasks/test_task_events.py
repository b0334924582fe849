"""Task-level events (``taskkit.recovery.events``) and their log records, at their sources.

A worker subprocess (prefork, two pool processes) on ``tests.tasks.event_apps`` pushes every
event it emits onto a Redis list: the tests assert the exact sequences a delivery, a batch, a
training run and a lease takeover produce. Eager runs in this process check the log records
(one per event, with ``taskkit_event``, ``attempt``, ``layer`` and the task fields) and the
attempts record a task stores in its result backend.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery.result import AsyncResult
from sqlalchemy import Engine

from taskkit.config import reset_settings
from taskkit.db.models import ModelRun
from taskkit.db.session import session_scope
from taskkit.deadletter import DeadLetterStore
from taskkit.errors import CircuitBreakerError
from taskkit.recovery import CircuitBreaker, events, retry
from taskkit.tasks import ResilientTask, TrainingTask, create_app, submit_batch, submit_run
from taskkit.tasks._lease import FileLeaseStore, LeaseOwner, RedisLeaseStore
from tests._support.workers import REPO, WorkerProcess, wait_for
from tests.tasks import event_apps as ev

pytestmark = pytest.mark.usefixtures("redis_url")

KEY = "task-events-tests-signing-key"


@pytest.fixture(scope="module")
def worker(
    redis_url: str, pg_schema_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[WorkerProcess]:
    """One worker subprocess for the module: prefork, two pool processes, PostgreSQL."""
    logs = tmp_path_factory.mktemp("event-worker")
    env = {
        "TASKKIT_DATABASE_URL": pg_schema_url,
        "TASKKIT_CHECKPOINT_DIR": str(logs / "checkpoints"),
        "TASKKIT_SECRET_KEY": KEY,
    }
    process = WorkerProcess(
        "events", logs, app="tests.tasks.event_apps", queue=ev.QUEUE, concurrency=2, env=env
    )
    try:
        process.wait_ready()
        yield process
    finally:
        process.stop()
        print(f"--- log of the worker ---\n{process.log()[-6000:]}")


@pytest.fixture
def recorded(worker: WorkerProcess, pg_schema_url: str, pg_engine: Engine) -> Iterator[None]:
    """An empty event list, and this process's app on the worker's database."""
    ev.app.conf.taskkit_database_url = pg_schema_url
    ev.clear()
    yield
    ev.clear()


def attempts(task_id: str) -> list[tuple[str, int, str]]:
    return [
        (e["layer"], e["attempt"], e["outcome"])
        for e in ev.recorded()
        if e["type"] == "TaskAttemptEnded" and e["task_id"] == task_id
    ]


def of_type(kind: str, **fields: Any) -> list[dict[str, Any]]:
    return [
        e
        for e in ev.recorded()
        if e["type"] == kind and all(e.get(k) == v for k, v in fields.items())
    ]


# -- through a real worker ---------------------------------------------------------------------


@pytest.mark.usefixtures("recorded")
def test_two_transient_failures_are_two_inner_retries_and_one_outer_success():
    result = ev.ev_flaky.delay(f"absorbed-{uuid.uuid4().hex}", 2)
    assert result.get(timeout=60) == 3
    assert attempts(result.id) == [
        ("inner", 1, "retry"),
        ("inner", 2, "retry"),
        ("inner", 3, "success"),
        ("outer", 1, "success"),
    ]
    inner_retries = of_type("TaskAttemptEnded", task_id=result.id, outcome="retry")
    assert {(e["error_type"], e["task"]) for e in inner_retries} == {
        ("ConnectionError", ev.ev_flaky.name)
    }
    assert all(e["wait"] is not None for e in inner_retries)
    # The task's in-process ladder reports through TaskAttemptEnded only.
    assert of_type("RetryScheduled") == of_type("GaveUp") == []


@pytest.mark.usefixtures("recorded")
def test_an_exhausted_inner_ladder_escalates_to_an_outer_retry():
    result = ev.ev_flaky.delay(f"escalated-{uuid.uuid4().hex}", 4)
    assert result.get(timeout=60) == 5
    assert attempts(result.id) == [
        ("inner", 1, "retry"),
        ("inner", 2, "retry"),
        ("inner", 3, "escalated"),
        ("outer", 1, "retry"),
        ("inner", 1, "retry"),
        ("inner", 2, "success"),
        ("outer", 2, "success"),
    ]
    (outer,) = of_type("TaskAttemptEnded", task_id=result.id, layer="outer", outcome="retry")
    assert outer["error_type"] == "ConnectionError"
    assert outer["wait"] is not None
    assert outer["wait"] >= 0
    assert of_type("TaskFailed") == of_type("RetryScheduled") == []


@pytest.mark.usefixtures("recorded")
def test_a_permanent_error_fails_both_layers_then_the_task_and_is_dead_lettered(
    pg_schema_url: str,
):
    result = ev.ev_flaky.delay(f"permanent-{uuid.uuid4().hex}", 5, "ValueError")
    with pytest.raises(ValueError):
        result.get(timeout=60)
    wait_for(lambda: of_type("TaskFailed", task_id=result.id), 30, "the terminal failure")
    ours = [e for e in ev.recorded() if e.get("task_id") == result.id]
    assert [e["type"] for e in ours] == [
        "TaskAttemptEnded",
        "TaskAttemptEnded",
        "DeadLettered",  # record_failure stores the letter first
        "TaskFailed",
    ]
    assert attempts(result.id) == [("inner", 1, "failure"), ("outer", 1, "failure")]
    (failed,) = of_type("TaskFailed", task_id=result.id)
    assert (failed["task"], failed["error_type"], failed["attempts"]) == (
        ev.ev_flaky.name,
        "ValueError",
        1,
    )
    (letter,) = DeadLetterStore(pg_schema_url).list(task=ev.ev_flaky.name)
    (dead,) = of_type("DeadLettered", task_id=result.id)
    assert (dead["letter_id"], dead["error_type"], dead["batch_id"]) == (
        letter.id,
        "ValueError",
        None,
    )


@pytest.mark.usefixtures("recorded")
def test_a_batch_reports_each_dead_item_and_each_chunk_with_its_counts(pg_schema_url: str):
    submission = submit_batch(ev.ev_items, list(range(10)), chunk_size=4)
    summary = submission.get(timeout=90)
    assert sorted(summary["failed_ids"]) == [3, 6, 9]
    chunk_ids = [child.id for child in submission.result.results]
    finished = {
        e["task_id"]: (e["done"], e["dead"], e["skipped"])
        for e in of_type("BatchChunkFinished", batch_id=submission.batch_id)
    }
    assert len(of_type("BatchChunkFinished")) == 3  # one per chunk
    assert finished == {
        chunk_ids[0]: (3, 1, 0),  # 0 1 2 | 3
        chunk_ids[1]: (3, 1, 0),  # 4 5 7 | 6
        chunk_ids[2]: (1, 1, 0),  # 8 | 9
    }
    dead = of_type("DeadLettered", batch_id=submission.batch_id)
    letters = DeadLetterStore(pg_schema_url).list(batch_id=submission.batch_id)
    assert sorted((e["item_key"], e["letter_id"]) for e in dead) == sorted(
        (letter.item_key, letter.id) for letter in letters
    )
    assert sorted(e["item_key"] for e in dead) == ["3", "6", "9"]
    assert {(e["task"], e["error_type"]) for e in dead} == {(ev.ev_items.name, "ValueError")}


@pytest.mark.usefixtures("recorded")
def test_a_training_run_reports_epochs_checkpoints_and_its_resume(pg_schema_url: str):
    config = {"epochs": 4, "fail_at": 2, "nonce": uuid.uuid4().hex}
    run_id, task_id = submit_run(ev.ev_train, config, database_url=pg_schema_url)
    assert AsyncResult(task_id, app=ev.app).get(timeout=120)["status"] == "success"
    kinds = ("EpochFinished", "CheckpointSaved", "RunResumed")
    trail = [
        (e["type"], e.get("epoch", e.get("step")))
        for e in ev.recorded()
        if e["type"] in kinds and e["run_id"] == run_id
    ]
    assert trail == [
        ("EpochFinished", 0),
        ("CheckpointSaved", 0),
        ("EpochFinished", 1),
        ("CheckpointSaved", 1),
        ("RunResumed", 2),  # the re-queued delivery restores the checkpoint of epoch 1
        ("EpochFinished", 2),
        ("CheckpointSaved", 2),
        ("EpochFinished", 3),
        ("CheckpointSaved", 3),
    ]
    (resumed,) = of_type("RunResumed")
    assert (resumed["task"], resumed["task_id"]) == (ev.ev_train.name, task_id)
    for saved in of_type("CheckpointSaved"):
        assert saved["task"] == ev.ev_train.name
        assert saved["size"] > 0
        assert saved["seconds"] >= 0
        assert saved["is_best"] is True
    assert all(
        e["seconds"] >= 0 and e["task"] == ev.ev_train.name for e in of_type("EpochFinished")
    )
    assert attempts(task_id)[-1] == ("outer", 2, "success")


@pytest.mark.usefixtures("recorded")
def test_a_lease_left_to_lapse_is_taken_over_with_a_new_fencing_token(redis_url: str):
    name = f"lapsed-{uuid.uuid4().hex}"
    key = f"{ev.ev_leased.name}:{name}"
    store = RedisLeaseStore.from_url(redis_url)
    ghost = LeaseOwner("ghost-task", "another-host", 4242)
    stale = store.acquire(key, ghost, ttl=0.2)
    assert stale is not None  # never renewed, never released: it lapses
    wait_for(lambda: store.holder(key) is None, 10, "the ghost's lease to lapse")

    result = ev.ev_leased.delay(name)
    token = result.get(timeout=60)
    assert token == stale.token + 1
    (taken,) = of_type("LeaseTakenOver")
    assert taken == {
        "type": "LeaseTakenOver",
        "task": ev.ev_leased.name,
        "task_id": result.id,
        "key": key,
        "previous_owner": ghost.describe(),
        "fencing_token": token,
        "run_id": None,
    }
    # Released at the end: the next holder takes a free key, no takeover.
    assert ev.ev_leased.delay(name).get(timeout=60) == token + 1
    assert len(of_type("LeaseTakenOver")) == 1


# -- log records, in this process ----------------------------------------------------------------


def make_app(**config: Any) -> Any:
    return create_app(
        "evunit",
        broker_url="memory://",
        result_backend="cache+memory://",
        taskkit_outer_delay=0.01,
        taskkit_outer_max_delay=0.01,
        **config,
    )


@pytest.fixture
def seen() -> Iterator[list[events.Event]]:
    collected: list[events.Event] = []
    unsubscribe = events.subscribe(collected.append)
    yield collected
    unsubscribe()


def tagged(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if hasattr(r, "taskkit_event")]


def test_each_retry_of_a_task_is_one_record_with_its_layer_and_attempt(caplog, seen):
    app = make_app()
    runs = {"n": 0}

    @app.task(base=ResilientTask, bind=True, shared=False, max_retries=3, sleep=lambda s: None)
    def fetch(self: ResilientTask) -> int:
        runs["n"] += 1
        if runs["n"] <= 4:
            raise ConnectionError(f"run {runs['n']} fails")
        return runs["n"]

    with caplog.at_level(logging.DEBUG):
        result = fetch.apply()
    assert result.get() == 5
    records = tagged(caplog)
    assert [(r.taskkit_event, r.layer, r.attempt) for r in records] == [  # type: ignore[attr-defined]
        ("retry", "inner", 1),
        ("retry", "inner", 2),
        ("retry", "outer", 1),
        ("retry", "inner", 1),
    ]
    assert {(r.task, r.task_id, r.run_id) for r in records} == {  # type: ignore[attr-defined]
        (fetch.name, result.id, None)
    }
    retries = [e for e in seen if isinstance(e, events.TaskAttemptEnded) and e.outcome == "retry"]
    assert len(retries) == len(records)  # one record per retry event, none twice
    assert not [e for e in seen if isinstance(e, events.RetryScheduled | events.GaveUp)]


def test_the_bodys_own_self_retry_is_an_escalation_and_an_outer_retry(caplog, seen):
    app = make_app()
    runs = {"n": 0}

    @app.task(base=ResilientTask, bind=True, shared=False, max_retries=2)
    def seed(self: ResilientTask) -> str:
        runs["n"] += 1
        if runs["n"] == 1:
            raise self.retry(exc=RuntimeError("first run fails"), countdown=0.5)
        return "ok"

    with caplog.at_level(logging.DEBUG):
        result = seed.apply()
    assert result.get() == "ok"
    ended = [e for e in seen if isinstance(e, events.TaskAttemptEnded)]
    assert [(e.layer, e.attempt, e.outcome, e.error_type, e.wait) for e in ended] == [
        ("inner", 1, "escalated", "RuntimeError", None),
        ("outer", 1, "retry", "RuntimeError", 0.5),
        ("inner", 1, "success", None, None),
        ("outer", 2, "success", None, None),
    ]
    (record,) = tagged(caplog)
    assert (record.taskkit_event, record.layer, record.attempt) == ("retry", "outer", 1)  # type: ignore[attr-defined]
    assert "RuntimeError: first run fails" in record.getMessage()


def test_a_terminal_failure_and_its_dead_letter_are_one_record_each(
    caplog, seen, pg_schema_url: str, pg_engine: Engine
):
    app = make_app(taskkit_database_url=pg_schema_url)

    @app.task(base=ResilientTask, bind=True, shared=False)
    def parse(self: ResilientTask, text: str) -> int:
        return int(text)

    with caplog.at_level(logging.DEBUG):
        result = parse.apply(args=("not a number",))
    assert result.state == "FAILURE"
    (letter,) = DeadLetterStore(pg_schema_url).list(task=parse.name)
    records = tagged(caplog)
    assert [(r.taskkit_event, r.layer, r.attempt) for r in records] == [  # type: ignore[attr-defined]
        ("terminal_failure", "outer", 1),
        ("dead_letter", None, 1),
    ]
    assert {(r.task, r.task_id) for r in records} == {(parse.name, result.id)}  # type: ignore[attr-defined]
    assert [type(e).__name__ for e in seen] == [
        "TaskAttemptEnded",
        "TaskAttemptEnded",
        "DeadLettered",
        "TaskFailed",
    ]
    assert seen[-2] == events.DeadLettered(parse.name, letter.id, "ValueError", task_id=result.id)
    assert seen[-1] == events.TaskFailed(parse.name, result.id, "ValueError", 1)


def test_a_plain_retry_logs_its_retry_and_its_give_up(caplog, seen):
    @retry(max_attempts=2, delay=0, exceptions=(OSError,))
    def read() -> None:
        raise OSError("disk gone")

    with caplog.at_level(logging.DEBUG), pytest.raises(OSError):
        read()
    records = tagged(caplog)
    assert [(r.taskkit_event, r.layer, r.attempt, r.levelno) for r in records] == [  # type: ignore[attr-defined]
        ("retry", None, 1, logging.WARNING),
        ("gave_up", None, 2, logging.WARNING),
    ]
    assert [type(e).__name__ for e in seen] == ["RetryScheduled", "GaveUp"]


def test_a_breaker_transition_is_one_record(caplog, seen, unique: str):
    breaker = CircuitBreaker(failure_threshold=1, recovery_timeout=60, name=unique)

    def down() -> None:
        raise ConnectionError("down")

    with caplog.at_level(logging.DEBUG):
        with pytest.raises(ConnectionError):
            breaker.call(down)
        with pytest.raises(CircuitBreakerError):
            breaker.call(down)
    # (an alert notifier a worker installed in this process may log an "alert" record too)
    (record,) = [r for r in tagged(caplog) if r.taskkit_event == "circuit_state"]  # type: ignore[attr-defined]
    assert (record.layer, record.attempt) == (None, None)  # type: ignore[attr-defined]
    assert seen == [events.CircuitStateChanged(unique, "closed", "open")]


def test_a_dead_owners_file_lease_is_taken_over_with_one_record(caplog, tmp_path: Path):
    directory = tmp_path / "leases"
    died = subprocess.run(
        [
            sys.executable,
            "-c",
            "import os, pathlib; from taskkit.tasks._lease import FileLeaseStore, LeaseOwner; "
            f"s = FileLeaseStore(pathlib.Path({str(directory)!r})); "
            "s.acquire('k', LeaseOwner.here('dead-task'), 5); os._exit(0)",
        ],
        cwd=REPO,
        check=True,
    )
    assert died.returncode == 0
    store = FileLeaseStore(directory)
    with caplog.at_level(logging.DEBUG):
        lease = store.acquire("k", LeaseOwner.here("new-task"), 5)
    assert lease is not None
    assert lease.token == 2
    assert lease.previous_owner is not None
    assert lease.previous_owner.task_id == "dead-task"
    (record,) = tagged(caplog)
    assert (record.taskkit_event, record.task_id) == ("takeover", "new-task")  # type: ignore[attr-defined]
    lease.release()
    caplog.clear()
    with caplog.at_level(logging.DEBUG):
        again = store.acquire("k", LeaseOwner.here("next-task"), 5)
    assert again is not None
    assert again.previous_owner is None
    assert again.token == 3
    assert tagged(caplog) == []
    again.release()


def test_a_lapsed_redis_lease_is_taken_over_and_a_released_one_is_not(
    caplog, redis_client: redis.Redis, key_prefix: str
):
    store = RedisLeaseStore(redis_client, prefix=key_prefix)
    ghost = LeaseOwner("ghost", "elsewhere", 1)
    first = store.acquire("k", ghost, ttl=0.1)
    assert first is not None
    wait_for(lambda: store.holder("k") is None, 10, "the lease to lapse")
    with caplog.at_level(logging.DEBUG):
        second = store.acquire("k", LeaseOwner.here("heir"), ttl=5)
    assert second is not None
    assert second.previous_owner == ghost
    assert second.token == first.token + 1
    (record,) = tagged(caplog)
    assert (record.taskkit_event, record.task_id) == ("takeover", "heir")  # type: ignore[attr-defined]
    assert "let it lapse" in record.getMessage()
    second.release()
    caplog.clear()
    with caplog.at_level(logging.DEBUG):
        third = store.acquire("k", LeaseOwner.here("next"), ttl=5)
    assert third is not None
    assert third.previous_owner is None
    assert tagged(caplog) == []
    third.release()


def test_a_resumed_training_attempt_is_one_record_and_one_event(
    caplog, seen, pg_schema_url: str, pg_engine: Engine, tmp_path: Path, monkeypatch
):
    monkeypatch.setenv("TASKKIT_CHECKPOINT_DIR", str(tmp_path / "checkpoints"))
    monkeypatch.setenv("TASKKIT_SECRET_KEY", KEY)
    reset_settings()
    app = make_app(taskkit_database_url=pg_schema_url)
    failed: list[int] = []

    @app.task(base=TrainingTask, bind=True, shared=False, checkpoint_every=1, max_retries=2)
    def fit(self: TrainingTask, model_run_id: int, epochs: int) -> dict[str, Any]:
        with self.training(total_epochs=epochs) as run:
            state = run.restore() or {"w": 0}
            for epoch in run.epochs():
                state = {"w": state["w"] + 1}
                if epoch == 2 and not failed:
                    failed.append(epoch)
                    raise KeyError("injected")  # unclassified: the task is sent again
                run.report(epoch, {"score": float(epoch)}, state)
            return run.complete(state)

    try:
        with session_scope(pg_schema_url) as session:
            row = ModelRun(name="resume", model_type="test", status="queued", task_name=fit.name)
            session.add(row)
            session.flush()
            run_id = row.id
        with caplog.at_level(logging.DEBUG):
            result = fit.apply(args=(run_id, 4))
        assert result.get()["status"] == "success"
    finally:
        reset_settings()
    (record,) = [r for r in tagged(caplog) if r.taskkit_event == "resume"]  # type: ignore[attr-defined]
    assert (record.task, record.task_id, record.run_id) == (fit.name, result.id, run_id)  # type: ignore[attr-defined]
    assert (record.attempt, record.layer) == (None, None)  # type: ignore[attr-defined]
    resumed = [e for e in seen if isinstance(e, events.RunResumed)]
    assert resumed == [events.RunResumed(fit.name, run_id, result.id, 2)]
    epochs = [e.epoch for e in seen if isinstance(e, events.EpochFinished)]
    assert epochs == [0, 1, 2, 3]
    saved = [e for e in seen if isinstance(e, events.CheckpointSaved)]
    assert [(e.run_id, e.step, e.task) for e in saved] == [(run_id, s, fit.name) for s in range(4)]


# -- the attempts record (``taskkit tasks show``) ------------------------------------------------


def test_an_inner_retry_stores_the_attempts_in_the_started_and_progress_meta():
    app = make_app()
    seen_meta: list[tuple[str, dict[str, Any]]] = []
    runs = {"n": 0}

    @app.task(
        base=ResilientTask, bind=True, shared=False, sleep=lambda s: None, progress_interval=0
    )
    def job(self: ResilientTask, report: bool) -> str:
        runs["n"] += 1
        if report:
            self.progress(runs["n"], 10, "working")
        meta = self.backend.get_task_meta(self.request.id)
        seen_meta.append((meta["status"], dict(meta["result"] or {})))
        if runs["n"] < 3:
            raise TimeoutError("slow")
        return "done"

    assert job.apply(args=(False,)).get() == "done"
    states = [(status, meta.get("attempts")) for status, meta in seen_meta]
    assert states == [
        ("PENDING", None),  # eager: nothing stored before the first retry
        ("STARTED", {"inner": 2, "outer": 1}),
        ("STARTED", {"inner": 3, "outer": 1}),
    ]

    seen_meta.clear()
    runs["n"] = 0
    assert job.apply(args=(True,)).get() == "done"
    assert seen_meta[0][0] == "PROGRESS"
    assert "attempts" not in seen_meta[0][1]
    for (status, meta), inner in zip(seen_meta[1:], (2, 3), strict=True):
        assert status == "PROGRESS"
        assert meta["attempts"] == {"inner": inner, "outer": 1}
        assert meta["current"] == inner
        assert meta["total"] == 10


def test_the_happy_path_emits_nothing_when_nobody_listens(monkeypatch):
    app = make_app()

    @app.task(base=ResilientTask, bind=True, shared=False)
    def ok(self: ResilientTask) -> int:
        return 1

    emitted: list[object] = []
    monkeypatch.setattr(events, "_subscribers", [])  # nobody (not even tracing) listens
    monkeypatch.setattr(events, "emit", emitted.append)
    assert ok.apply().get() == 1
    assert emitted == []
