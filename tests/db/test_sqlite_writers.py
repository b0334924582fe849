"""SQLite write sessions take the write lock when they begin (``BEGIN IMMEDIATE``): concurrent
read-then-write transactions wait their turn instead of failing with "database is locked", and
read-only sessions neither wait for nor block a writer (WAL)."""

from __future__ import annotations

import multiprocessing
import sqlite3
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from sqlalchemy import func, insert, select
from sqlalchemy.exc import OperationalError

from taskkit._utils import sqlite_wal
from taskkit.config import reset_settings
from taskkit.db.migrate import upgrade
from taskkit.db.models import Dataset, ModelRun
from taskkit.db.session import create_engine_for, dispose_engines, get_engine, session_scope
from taskkit.errors import ConfigurationError

PROCESSES = 4
TRANSACTIONS = 40


@pytest.fixture
def sqlite_file(tmp_path: Path) -> Iterator[str]:
    """A fresh SQLite file, migrated to head; engines forgotten afterwards."""
    url = f"sqlite:///{tmp_path / 'writers.db'}"
    engine = create_engine_for(url)
    try:
        upgrade(engine)
    finally:
        engine.dispose()
    yield url
    dispose_engines()


@pytest.fixture
def no_busy_wait(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """SQLite connections fail at once instead of waiting for a lock: a session that would wait
    for another's lock fails with "database is locked" instead."""
    monkeypatch.setenv("TASKKIT_SQLITE_BUSY_TIMEOUT", "0")
    reset_settings()
    yield
    monkeypatch.undo()
    reset_settings()


def _increment(url: str, run_id: int, start: object, results: object) -> None:
    """A writer process: read the row, then write it, TRANSACTIONS times; report the errors."""
    errors: list[str] = []
    start.wait(timeout=60)  # type: ignore[attr-defined]
    for _ in range(TRANSACTIONS):
        try:
            with session_scope(url) as db:
                run = db.get(ModelRun, run_id)
                assert run is not None
                run.usage_count = run.usage_count + 1
        except Exception as exc:
            errors.append(f"{type(exc).__name__}: {str(exc).splitlines()[0]}")
    results.put(errors)  # type: ignore[attr-defined]


def test_concurrent_read_then_write_sessions_never_see_database_is_locked(sqlite_file: str):
    with session_scope(sqlite_file) as db:
        run = ModelRun(name="counter", model_type="sgd", config={})
        db.add(run)
        db.flush()
        run_id = run.id
    dispose_engines()  # the children open their own connections
    context = multiprocessing.get_context("fork")
    start = context.Barrier(PROCESSES)
    results = context.Queue()
    workers = [
        context.Process(target=_increment, args=(sqlite_file, run_id, start, results))
        for _ in range(PROCESSES)
    ]
    for worker in workers:
        worker.start()
    try:
        errors = [error for _ in workers for error in results.get(timeout=120)]
    finally:
        for worker in workers:
            worker.join(timeout=30)
            if worker.is_alive():
                worker.kill()
    assert errors == []
    with session_scope(sqlite_file, readonly=True) as db:
        assert db.scalar(select(ModelRun.usage_count).where(ModelRun.id == run_id)) == (
            PROCESSES * TRANSACTIONS
        )


def test_a_reader_is_not_blocked_by_a_writer_holding_the_lock(sqlite_file: str, no_busy_wait):
    outcome: dict[str, object] = {}

    def read() -> None:
        try:
            with session_scope(sqlite_file, readonly=True) as db:
                outcome["read"] = db.scalar(select(func.count()).select_from(Dataset))
        except Exception as exc:
            outcome["read"] = exc

    def write() -> None:
        try:
            with session_scope(sqlite_file) as db:
                outcome["write"] = db.scalar(select(func.count()).select_from(Dataset))
        except Exception as exc:
            outcome["write"] = exc

    with session_scope(sqlite_file) as writer:
        writer.add(Dataset(name="pending"))
        writer.flush()  # holds the write lock until the block ends
        for job in (read, write):
            thread = threading.Thread(target=job)
            thread.start()
            thread.join(timeout=30)
    assert outcome["read"] == 0  # the committed state, at once
    # A second writer would have had to wait: the lock was really held while the reader read.
    assert isinstance(outcome["write"], OperationalError)
    assert "database is locked" in str(outcome["write"])


def test_a_session_opened_inside_a_write_session_of_the_same_thread_does_not_wait_for_it(
    sqlite_file: str, no_busy_wait
):
    with session_scope(sqlite_file) as outer:
        outer.add(Dataset(name="outer"))
        outer.flush()
        with session_scope(sqlite_file) as inner:  # a helper that only reads
            assert inner.scalar(select(func.count()).select_from(Dataset)) == 0
    with session_scope(sqlite_file, readonly=True) as db:
        assert list(db.scalars(select(Dataset.name))) == ["outer"]


def test_a_session_opened_inside_any_transaction_holding_the_lock_does_not_wait_for_it(
    sqlite_file: str, no_busy_wait
):
    writer = get_engine(sqlite_file).execution_options(taskkit_sqlite_begin="BEGIN IMMEDIATE")
    with writer.begin() as connection:  # as the dead-letter store's replay holds its letters
        connection.execute(insert(Dataset).values(name="held", version=1))
        with session_scope(sqlite_file) as inner:
            assert inner.scalar(select(func.count()).select_from(Dataset)) == 0
    with session_scope(sqlite_file) as db:  # the lock was released with its transaction
        db.add(Dataset(name="after"))
    with session_scope(sqlite_file, readonly=True) as db:
        assert sorted(db.scalars(select(Dataset.name))) == ["after", "held"]


def test_a_read_only_session_refuses_to_write(db_url: str, engine):
    with (
        pytest.raises(ConfigurationError, match="readonly"),
        session_scope(db_url, readonly=True) as db,
    ):
        db.add(Dataset(name="sneaky"))
        db.flush()
    with session_scope(db_url, readonly=True) as db:
        assert db.scalar(select(func.count()).select_from(Dataset)) == 0


def test_runs_list_show_and_database_checkpoints_read_while_a_worker_holds_the_lock(
    sqlite_file: str, no_busy_wait, monkeypatch: pytest.MonkeyPatch
):
    from typer.testing import CliRunner

    from taskkit.checkpoint import DatabaseStorage
    from taskkit.cli import app

    with session_scope(sqlite_file) as db:
        run = ModelRun(name="watched", model_type="sgd", config={})
        db.add(run)
        db.flush()
        run_id = run.id
    monkeypatch.setenv("TASKKIT_DATABASE_URL", sqlite_file)
    reset_settings()
    holder = sqlite3.connect(sqlite_file.removeprefix("sqlite:///"), isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # a worker in the middle of a status write
    try:
        for args in (["runs", "list"], ["runs", "show", str(run_id)]):
            result = CliRunner().invoke(app, args)
            assert result.exit_code == 0, result.output
            assert "watched" in result.stdout
        storage = DatabaseStorage(sqlite_file)
        assert storage.runs() == []
        assert storage.infos("some-run") == []
    finally:
        holder.execute("ROLLBACK")
        holder.close()


def test_load_model_reads_while_a_worker_holds_the_lock(sqlite_file: str, no_busy_wait):
    from taskkit.tasks import load_model
    from taskkit.tasks._runs import mark_completed

    with session_scope(sqlite_file) as db:
        run = ModelRun(name="done", model_type="dict", config={}, status="running")
        db.add(run)
        db.flush()
        run_id = run.id
    mark_completed(run_id, {"weights": [1, 2]}, 0.9, database_url=sqlite_file)
    holder = sqlite3.connect(sqlite_file.removeprefix("sqlite:///"), isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # a worker in the middle of a status write
    try:
        assert load_model(run_id, database_url=sqlite_file) == {"weights": [1, 2]}
    finally:
        holder.execute("ROLLBACK")
        holder.close()


def test_a_write_session_ended_on_another_thread_leaves_this_thread_taking_the_lock(
    sqlite_file: str, no_busy_wait
):
    # FastAPI enters a sync dependency (taskkit.api's write_session) in one thread-pool thread
    # and exits it in another.
    scope = session_scope(sqlite_file)
    outcome: dict[str, object] = {}

    def begin() -> None:
        db = scope.__enter__()
        db.add(Dataset(name="across"))
        db.flush()

    def end() -> None:
        scope.__exit__(None, None, None)

    def write_again() -> None:
        try:
            with session_scope(sqlite_file) as db:
                db.scalar(select(func.count()).select_from(Dataset))  # begins the transaction
                other = sqlite3.connect(sqlite_file.removeprefix("sqlite:///"), timeout=0)
                try:
                    other.execute("BEGIN IMMEDIATE")
                    outcome["other"] = "got the lock"
                    other.execute("ROLLBACK")
                except sqlite3.OperationalError as exc:
                    outcome["other"] = str(exc)
                finally:
                    other.close()
        except Exception as exc:
            outcome["error"] = exc

    with ThreadPoolExecutor(1) as first, ThreadPoolExecutor(1) as second:
        first.submit(begin).result(timeout=30)
        second.submit(end).result(timeout=30)
        first.submit(write_again).result(timeout=30)
    assert "error" not in outcome, outcome
    # The first thread's new write session began IMMEDIATE: it holds the write lock.
    assert outcome["other"] == "database is locked"
    with session_scope(sqlite_file, readonly=True) as db:
        assert list(db.scalars(select(Dataset.name))) == ["across"]


class _LockedCursor:
    """Answers ``PRAGMA journal_mode=WAL`` with ``errors`` in turn, then succeeds."""

    def __init__(self, *errors: str) -> None:
        self.errors = list(errors)
        self.calls = 0

    def execute(self, statement: str) -> None:
        assert statement == "PRAGMA journal_mode=WAL"
        self.calls += 1
        if self.errors:
            raise sqlite3.OperationalError(self.errors.pop(0))


def test_switching_to_wal_waits_while_another_connection_holds_the_lock():
    """SQLite answers "database is locked" at once, without its busy wait, when a connection
    switches the file to WAL while another holds a lock: the switch is tried again, with
    growing waits, until it succeeds or the busy timeout has passed."""
    now = [0.0]
    waits: list[float] = []

    def sleep(seconds: float) -> None:
        waits.append(seconds)
        now[0] += seconds

    cursor = _LockedCursor(*["database is locked"] * 6)
    sqlite_wal(cursor, 30.0, clock=lambda: now[0], sleep=sleep)
    assert cursor.calls == 7
    assert waits == [0.005, 0.01, 0.02, 0.04, 0.08, 0.1]

    stuck = _LockedCursor(*["database is locked"] * 1000)
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        sqlite_wal(stuck, 1.0, clock=lambda: now[0], sleep=sleep)
    assert 10 < stuck.calls < 20  # about 1 s of waits of at most 0.1 s

    other = _LockedCursor("disk I/O error")
    with pytest.raises(sqlite3.OperationalError, match="disk I/O"):
        sqlite_wal(other, 30.0, clock=lambda: now[0], sleep=sleep)
    assert other.calls == 1
