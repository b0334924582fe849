"""taskkit's Celery custom events and the worker's shared event clock (issue 17), on Redis.

A real worker subprocess (prefork, concurrency 2) imports this module as its Celery app; a real
event receiver (what Flower and ``celery events`` run) collects what it sends. The tasks here
emit taskkit events themselves (``events.emit``), as taskkit's sources do, so the test sees
exactly which events went in.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from kombu.clocks import LamportClock

from taskkit.db.migrate import upgrade
from taskkit.db.models import ModelRun
from taskkit.db.session import session_scope
from taskkit.recovery import events
from taskkit.tasks import BatchTask, ResilientTask, TrainingTask
from taskkit.tasks._events import (
    EVENT_TYPES,
    PAUSE_AFTER_FAILURE,
    SharedLamportClock,
    _Sink,
    celery_event,
)
from tests._support.apps import redis_test_app
from tests._support.workers import WorkerProcess, wait_for

kit = redis_test_app("cev")
app, counter = kit.app, kit.counter

HOSTNAME = f"cev@{socket.gethostname()}"


def _wait_for_gate(gate: str) -> None:
    deadline = time.monotonic() + 60
    while not counter.get(gate) and time.monotonic() < deadline:
        time.sleep(0.02)


@app.task(base=ResilientTask, bind=True, progress_interval=0)
def emitting(self: ResilientTask, gate: str) -> int:
    """Wait for ``gate`` (a Redis key the test sets), then emit one taskkit event of each kind
    with a Celery counterpart (the checkpoint from another thread, as the background checkpoint
    writer does) and report progress; return this pool process's pid."""
    _wait_for_gate(gate)
    task_id = str(self.request.id)
    events.emit(events.TaskAttemptEnded(self.name, task_id, "inner", 1, "success"))
    events.emit(events.TaskAttemptEnded(self.name, task_id, "inner", 2, "retry", "OSError", 0.25))
    events.emit(events.DeadLettered(self.name, 17, "ValueError", None, "batch-1", "item-3"))
    events.emit(events.LeaseTakenOver(self.name, task_id, "taskkit:lease:x", "host-1:42", 7))
    writer = threading.Thread(
        target=events.emit, args=(events.CheckpointSaved("run-9", 5, 2048, 0.125, True),)
    )
    writer.start()
    writer.join()
    events.emit(events.BatchChunkFinished(self.name, task_id, "batch-1", 9, 1, 2))
    self.progress(1, 1, "done")
    return os.getpid()


# -- tasks whose events come from taskkit's own sources ----------------------------------------


@app.task(base=ResilientTask, bind=True, max_retries=0)
def connects_second_time(self: ResilientTask, name: str) -> int:
    """Fail with ConnectionError on the first call (an inner retry follows), then succeed."""
    calls = int(counter.incr(kit.key("calls", name)))
    if calls == 1:
        raise ConnectionError("connection reset (first call)")
    return calls


@app.task(base=BatchTask, bind=True, item_delay=0, item_max_attempts=2)
def reprice(self: BatchTask, item_id: int) -> None:
    """Item 3 always fails (KeyError): retried once, then dead-lettered."""
    if item_id == 3:
        raise KeyError(item_id)


@app.task(base=TrainingTask, bind=True, checkpoint_background=True, score_metric=None)
def fit(self: TrainingTask, model_run_id: int, epochs: int) -> dict[str, Any]:
    """Epochs that count; a checkpoint per epoch, written by the background writer thread."""
    with self.training(total_epochs=epochs) as run:
        state = run.restore() or {"seen": 0}
        for epoch in run.epochs():
            state = {"seen": state["seen"] + 1}
            run.report(epoch, {"seen": state["seen"]}, state)
        return run.complete(state)


@contextlib.contextmanager
def listening(received: list[dict[str, Any]]) -> Iterator[None]:
    """Collect the app's events in a thread, as Flower does. Redis delivers events to live
    subscribers only: the block starts once a probe event came back."""
    receiver = app.events.Receiver(
        app.connection(), handlers={"*": received.append}, app=app, node_id=f"cev-{uuid.uuid4()}"
    )
    thread = threading.Thread(
        target=receiver.capture, kwargs={"limit": None, "wakeup": False}, daemon=True
    )
    thread.start()
    try:
        with app.events.default_dispatcher() as dispatcher:

            def probed() -> bool:
                dispatcher.send("taskkit-probe")
                time.sleep(0.05)
                return any(e.get("type") == "taskkit-probe" for e in received)

            wait_for(probed, 10, "the event receiver to subscribe")
        yield
    finally:
        receiver.should_stop = True
        thread.join(timeout=10)


def start_worker(tmp_path: Any, events_on: bool) -> WorkerProcess:
    worker = WorkerProcess(
        "cev",
        tmp_path,
        app=__name__,
        queue=kit.queue,
        concurrency=2,
        env={"TASKKIT_WORKER_EVENTS": "1" if events_on else "0"},
    )
    try:
        worker.wait_ready()
    except BaseException:
        worker.stop()
        raise
    return worker


@pytest.fixture
def events_worker(redis_url: str, tmp_path: Any) -> Iterator[WorkerProcess]:
    worker = start_worker(tmp_path, events_on=True)
    try:
        yield worker
    finally:
        worker.stop()
        print(f"--- worker log ---\n{worker.log()[-4000:]}")


def of_worker(received: list[dict[str, Any]], worker: WorkerProcess) -> list[dict[str, Any]]:
    return [e for e in received if e.get("hostname") == HOSTNAME]


def run_gated(received: list[dict[str, Any]], tasks: int) -> list[str]:
    """Send ``tasks`` tasks at once (both pool processes busy), then let them go one at a time:
    a task is let go only once its ``task-started`` came in, and the next one once the previous
    one's ``task-succeeded`` did. Returns the task ids in the order they were let go."""
    gates = [kit.key("gate", uuid.uuid4().hex) for _ in range(tasks)]
    results = [emitting.delay(gate) for gate in gates]

    def seen(kind: str, task_id: str) -> bool:
        return any(e.get("type") == kind and e.get("uuid") == task_id for e in received)

    for result in results:
        wait_for(lambda r=result: seen("task-started", r.id), 30, "task-started")  # type: ignore[misc]
    for gate, result in zip(gates, results, strict=True):
        counter.set(gate, 1, ex=3600)
        assert isinstance(result.get(timeout=30), int)
        wait_for(lambda r=result: seen("task-succeeded", r.id), 30, "task-succeeded")  # type: ignore[misc]
    return [result.id for result in results]


def test_custom_events_reach_a_monitor_with_their_fields_and_the_task_uuid(events_worker):
    received: list[dict[str, Any]] = []
    with listening(received):
        (task_id,) = run_gated(received, 1)
        wait_for(
            lambda: {e["type"] for e in received if e.get("uuid") == task_id} >= set(EVENT_TYPES),
            30,
            "the custom events",
        )

    mine = [e for e in of_worker(received, events_worker) if e.get("uuid") == task_id]
    custom = {e["type"]: e for e in mine if e["type"] in EVENT_TYPES}
    fields = {
        kind: {
            k: v
            for k, v in event.items()
            if k
            not in {
                "type",
                "uuid",
                "hostname",
                "pid",
                "clock",
                "timestamp",
                "utcoffset",
                "local_received",
            }
        }
        for kind, event in custom.items()
    }
    assert fields == {
        "task-inner-retry": {"attempt": 2, "error_type": "OSError", "wait": 0.25},
        "task-dead-lettered": {
            "letter_id": 17,
            "error_type": "ValueError",
            "batch_id": "batch-1",
            "item_key": "item-3",
        },
        "task-lease-takeover": {
            "key": "taskkit:lease:x",
            "previous_owner": "host-1:42",
            "fencing_token": 7,
        },
        "task-checkpoint": {
            "step": 5,
            "bytes": 2048,
            "seconds": 0.125,
            "is_best": True,
            "run_id": "run-9",
        },
        "task-batch-summary": {"done": 9, "dead": 1, "skipped": 2, "batch_id": "batch-1"},
    }
    # One of each: the inner attempt that succeeded has no event.
    assert sorted(e["type"] for e in mine if e["type"] in EVENT_TYPES) == sorted(EVENT_TYPES)
    # What Flower keeps (Celery's monitor state): the task ends SUCCESS whatever came before.
    state = app.events.State()
    for event in received:
        state.event(dict(event))
    assert state.tasks[task_id].state == "SUCCESS"
    # Sent from the pool process that ran the task.
    assert {e["pid"] for e in custom.values()} <= events_worker.children()
    assert events_worker.pid not in {e["pid"] for e in custom.values()}


def test_taskkit_sources_send_inner_retry_dead_letter_batch_and_checkpoint_events(
    events_worker,
):
    """The events of a task with an inner retry, a batch chunk with a dead item and a training
    run whose checkpoints the background writer stores, as taskkit's sources emit them."""
    upgrade()
    with session_scope() as db:
        row = ModelRun(name="celery-events", model_type="counter")
        db.add(row)
        db.flush()
        run_id = row.id
    batch_id = f"cev-{uuid.uuid4().hex}"
    received: list[dict[str, Any]] = []
    with listening(received):
        retried = connects_second_time.delay(uuid.uuid4().hex)
        chunk = reprice.delay([1, 2, 3], batch_id=batch_id)
        trained = fit.delay(run_id, 2)
        assert retried.get(timeout=60) == 2
        assert chunk.get(timeout=60)["failed_ids"] == [3]
        assert trained.get(timeout=60)["status"] == "success"

        def custom(task_id: str) -> list[dict[str, Any]]:
            return [e for e in received if e.get("uuid") == task_id and e["type"] in EVENT_TYPES]

        wait_for(lambda: len(custom(trained.id)) >= 2, 30, "the checkpoint events")
        wait_for(lambda: len(custom(chunk.id)) >= 2, 30, "the batch events")
        wait_for(lambda: custom(retried.id), 30, "the inner retry event")

    (inner,) = custom(retried.id)
    assert (inner["type"], inner["attempt"], inner["error_type"]) == (
        "task-inner-retry",
        1,
        "ConnectionError",
    )
    assert inner["wait"] >= 0
    batch_events = {e["type"]: e for e in custom(chunk.id)}
    assert sorted(batch_events) == ["task-batch-summary", "task-dead-lettered"]
    dead, summary = batch_events["task-dead-lettered"], batch_events["task-batch-summary"]
    assert (dead["error_type"], dead["batch_id"], dead["item_key"]) == ("KeyError", batch_id, "3")
    assert isinstance(dead["letter_id"], int)
    assert {k: summary[k] for k in ("done", "dead", "skipped", "batch_id")} == {
        "done": 2,
        "dead": 1,
        "skipped": 0,
        "batch_id": batch_id,
    }
    checkpoints = custom(trained.id)
    assert [e["type"] for e in checkpoints] == ["task-checkpoint"] * 2
    assert [e["step"] for e in checkpoints] == [0, 1]
    assert all(e["bytes"] > 0 and e["seconds"] >= 0 for e in checkpoints)
    assert {e["run_id"] for e in checkpoints} == {run_id}
    assert {e["pid"] for e in received if e.get("uuid") == trained.id} <= (
        events_worker.children() | {events_worker.pid}
    )


def test_pool_process_events_never_carry_a_clock_behind_the_workers(events_worker):
    """Within the stream, an event from a pool process has a larger clock than every event of
    the worker's main process that came before it (task-received, -started, -succeeded of
    earlier tasks): pool processes and worker share one clock. With a pool process's own copy
    of the clock, its first event already carried a clock behind its task's task-started."""
    received: list[dict[str, Any]] = []
    with listening(received):
        task_ids = run_gated(received, 2) + run_gated(received, 2)

    stream = of_worker(received, events_worker)
    pool_pids = {e["pid"] for e in stream if e.get("uuid") in task_ids} - {events_worker.pid}
    assert len(pool_pids) == 2, "both pool processes ran tasks"
    latest_of_worker = 0
    checked = 0
    behind = []
    for event in stream:
        if event["pid"] == events_worker.pid:
            latest_of_worker = max(latest_of_worker, event["clock"])
        elif event["pid"] in pool_pids:
            checked += 1
            if event["clock"] <= latest_of_worker:
                behind.append((event["type"], event["clock"], latest_of_worker))
    assert checked >= 4 * (len(EVENT_TYPES) + 1)
    assert behind == [], f"pool process events behind the worker's clock: {behind}"


def test_no_custom_events_when_the_worker_sends_no_events(redis_url, tmp_path):
    worker = start_worker(tmp_path, events_on=False)
    try:
        received: list[dict[str, Any]] = []
        with listening(received):
            gate = kit.key("gate", uuid.uuid4().hex)
            counter.set(gate, 1, ex=3600)
            result = emitting.delay(gate)
            assert isinstance(result.get(timeout=30), int)
            # task-progress is sent whatever the setting: once it is in, the rest would be too.
            wait_for(
                lambda: any(
                    e.get("type") == "task-progress" and e.get("uuid") == result.id
                    for e in received
                ),
                30,
                "the task-progress event",
            )
        assert [e["type"] for e in received if e["type"] in EVENT_TYPES] == []
    finally:
        worker.stop()


# -- pure logic ------------------------------------------------------------------------------


def test_only_inner_retries_of_the_attempt_events_become_celery_events():
    def inner(outcome: str, layer: str = "inner") -> events.TaskAttemptEnded:
        return events.TaskAttemptEnded("t", "id", layer, 1, outcome, "OSError", 0.5)

    assert celery_event(inner("retry")) == (
        "task-inner-retry",
        "id",
        {"attempt": 1, "error_type": "OSError", "wait": 0.5},
    )
    for other in (inner("success"), inner("escalated"), inner("failure"), inner("retry", "outer")):
        assert celery_event(other) is None
    assert celery_event(events.CircuitStateChanged("db", "closed", "open")) is None
    assert celery_event(events.TaskFailed("t", "id", "ValueError", 1)) is None
    # Ids that JSON cannot carry as they are go as text.
    letter = events.DeadLettered("t", uuid.UUID(int=1), "E", "id", None, None)
    assert celery_event(letter) == (
        "task-dead-lettered",
        "id",
        {
            "letter_id": str(uuid.UUID(int=1)),
            "error_type": "E",
            "batch_id": None,
            "item_key": None,
        },
    )


def test_the_shared_clock_continues_from_whatever_any_process_sent():
    clock = SharedLamportClock(processes=2, initial_value=5)
    assert clock.value == 5
    assert clock.forward() == 6
    assert clock.adjust(40) == 41
    assert clock.adjust(3) == 42
    clock.mutex = object()  # Celery's event loop swaps in a dummy lock; it is not used
    assert clock.forward() == 43
    assert isinstance(clock, LamportClock)
    assert clock.sort_heap([(1, "a"), (2, "b")]) == (1, "a")

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # a pool process of index 1 sends 10 events
        try:
            from billiard.process import current_process

            current_process().index = 1  # type: ignore[attr-defined]
            for _ in range(10):
                value = clock.forward()
            os.write(write, str(value).encode())
        finally:
            os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    assert int(os.read(read, 100)) == 53
    os.close(read)
    assert clock.value == 53
    assert clock.forward() == 54


def test_a_failed_send_pauses_custom_events_in_the_process(clock):
    """The broker is down: one attempt, then none for PAUSE_AFTER_FAILURE seconds."""
    attempts: list[str] = []

    class Down:
        def send(self, kind: str, **fields: Any) -> None:
            attempts.append(kind)
            raise ConnectionError("broker down")

    @contextlib.contextmanager
    def default_dispatcher(hostname: str | None = None) -> Iterator[Down]:
        yield Down()

    fake_app = SimpleNamespace(events=SimpleNamespace(default_dispatcher=default_dispatcher))
    sink = _Sink(clock=clock)
    sink.running = [(fake_app, "task-1", "w1@host")]
    summary = events.BatchChunkFinished("t", "task-1", None, 1, 0, 0)
    sink(summary)
    sink(summary)
    clock.advance(PAUSE_AFTER_FAILURE - 1)
    sink(summary)
    assert attempts == ["task-batch-summary"]
    clock.advance(1)
    sink(summary)
    assert attempts == ["task-batch-summary"] * 2
