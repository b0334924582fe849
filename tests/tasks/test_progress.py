"""Progress: PROGRESS state and meta, ``task-progress`` events, the TrainingProgress row, and a
database outage that delays the row but never the task."""

from __future__ import annotations

import threading
import time

import pytest
from sqlalchemy import select

from taskkit.db.migrate import upgrade
from taskkit.db.models import ModelRun, TrainingProgress
from taskkit.db.session import session_scope
from taskkit.tasks import ProgressReport
from taskkit.tasks._progress import ProgressWriter, Throttle
from tests._support.workers import wait_for
from tests.tasks import apps


def new_run(url: str) -> int:
    with session_scope(url) as session:
        run = ModelRun(name="progress-test", model_type="sgd")
        session.add(run)
        session.flush()
        return run.id


def progress_row(url: str, run_id: int) -> TrainingProgress | None:
    with session_scope(url) as session:
        return session.scalars(select(TrainingProgress).filter_by(model_run_id=run_id)).first()


@pytest.fixture
def database(db_url, engine):
    """``db_url`` as the test app's progress database; its tables are emptied afterwards."""
    previous = apps.app.conf.get("taskkit_database_url")
    apps.app.conf.taskkit_database_url = db_url
    yield db_url
    apps.app.conf.taskkit_database_url = previous


@pytest.mark.parametrize("db_url", ["sqlite", "postgresql"], indirect=True)
def test_progress_state_meta_and_training_progress_row(worker, database):
    run_id = new_run(database)
    result = apps.epochs.delay(run_id, 5, 0.3)
    metas = []
    deadline = time.monotonic() + 30
    while not result.ready() and time.monotonic() < deadline:
        # One read of the state and its meta together: reading .state then .info asks the
        # backend twice, and the task may end in between (then .info is the return value).
        task_meta = result.backend.get_task_meta(result.id)
        if task_meta["status"] == "PROGRESS":
            metas.append(task_meta["result"])
        time.sleep(0.05)
    assert result.get(timeout=30) == 5
    assert metas, "no PROGRESS state was seen"
    meta = metas[-1]
    assert set(meta) == {"current", "total", "percent", "description", "metrics"}
    assert meta["total"] == 5
    assert meta["percent"] == meta["current"] * 20
    assert meta["description"] == f"epoch {meta['current']}"
    row = progress_row(database, run_id)
    assert row is not None
    assert (row.current_epoch, row.total_epochs, row.progress_percentage) == (5, 5, 100.0)
    assert row.metrics == {"loss": 0.2}
    assert row.status == "completed"
    assert row.message == "epoch 5"


def test_task_progress_events_reach_a_monitor(worker):
    events: list[dict] = []
    ready = threading.Event()

    def monitor() -> None:
        with apps.app.connection() as connection:

            def on_progress(event: dict) -> None:
                events.append(event)
                receiver.should_stop = len(events) >= 3

            receiver = apps.app.events.Receiver(connection, handlers={"task-progress": on_progress})
            ready.set()
            try:
                receiver.capture(limit=None, timeout=20, wakeup=False)
            except TimeoutError:
                pass

    thread = threading.Thread(target=monitor, daemon=True)
    thread.start()
    ready.wait(10)
    time.sleep(0.5)  # the receiver's queue is bound
    result = apps.count_progress.delay(3)
    assert result.get(timeout=30) == 3
    thread.join(25)
    assert [e["current"] for e in events] == [1, 2, 3]
    assert all(e["uuid"] == result.id and e["total"] == 3 for e in events)


def test_a_database_outage_delays_the_progress_row_but_never_fails_the_task(
    worker, private_postgres
):
    url = private_postgres.url
    upgrade(url)
    run_id = new_run(url)
    previous = apps.app.conf.get("taskkit_database_url")
    apps.app.conf.taskkit_database_url = url
    try:
        private_postgres.crash()
        result = apps.epochs.delay(run_id, 3)
        assert result.get(timeout=30) == 3  # the task does not wait for the database
        private_postgres.start()
        waited = wait_for(lambda: progress_row(url, run_id) is not None, 60, "the delayed row")
        row = progress_row(url, run_id)
        assert row is not None
        assert row.current_epoch == 3
        assert row.status == "completed"
        print(f"progress row written {waited:.1f}s after the database came back")
    finally:
        apps.app.conf.taskkit_database_url = previous


# -- pure parts ------------------------------------------------------------------------------


def test_throttle_admits_the_first_one_per_interval_and_always_the_last(clock):
    throttle = Throttle(1.0, clock=clock)
    report = ProgressReport(1, 10)
    assert throttle.admit(report)
    clock.advance(0.5)
    assert not throttle.admit(ProgressReport(2, 10))
    clock.advance(0.5)
    assert throttle.admit(ProgressReport(3, 10))
    assert throttle.admit(ProgressReport(10, 10))  # finished: always


def test_percent_handles_unknown_and_zero_totals():
    assert ProgressReport(3, None).percent is None
    assert ProgressReport(3, 0).percent is None
    assert ProgressReport(1, 3).percent == 33.33
    assert ProgressReport(5, 3).percent == 100.0


def test_writer_keeps_only_the_newest_write_per_key_and_retries_failures():
    writer = ProgressWriter(delay=0.01, max_delay=0.02)
    written: list[int] = []
    failures = {"left": 3}
    gate = threading.Event()

    def write(value: int):
        def run() -> None:
            gate.wait(5)
            if failures["left"]:
                failures["left"] -= 1
                raise ConnectionError("database down")
            written.append(value)

        return run

    for value in range(5):
        writer.submit("run-1", write(value))
    gate.set()
    assert writer.flush(10)
    # The first write was already taken when the rest arrived; only the newest of the rest
    # is kept; failures were retried until the newest landed.
    assert written[-1] == 4
    assert len(written) <= 2
