"""db_retry on real databases: what it retries, what it does not, and the rollback in between."""

from __future__ import annotations

import asyncio
import inspect
import sqlite3
import threading

import pytest
from sqlalchemy import func, select, text, update
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session

from taskkit.config import Settings
from taskkit.db import db_retry
from taskkit.db.models import Dataset, ModelRun
from taskkit.db.session import create_engine_for, get_sessionmaker


class DriverError(Exception):
    sqlstate = "08006"


def dropped() -> OperationalError:
    return OperationalError("COMMIT", {}, DriverError("server closed the connection"))


def count(db_url: str, model: type, **where) -> int:
    with get_sessionmaker(db_url)() as fresh:
        return fresh.scalar(select(func.count()).select_from(model).filter_by(**where)) or 0


def test_rolls_the_session_back_between_attempts(db: Session, db_url: str):
    attempts: list[int] = []
    sleeps: list[float] = []

    @db_retry(max_attempts=3, delay=0.5, jitter=False, sleep=sleeps.append)
    def create(db: Session, name: str) -> int:
        attempts.append(1)
        run = ModelRun(name=name, model_type="sgd", config={})
        db.add(run)
        db.flush()  # sent to the database, in the transaction
        if len(attempts) == 1:
            raise dropped()
        db.commit()
        return run.id

    create(db, "only-once")
    assert len(attempts) == 2
    assert sleeps == [0.5]
    # The first attempt's flushed row was rolled back, not committed with the second.
    assert count(db_url, ModelRun, name="only-once") == 1


def test_integrity_errors_are_not_retried(db: Session, db_url: str):
    db.add(Dataset(name="iris"))
    db.commit()
    attempts: list[int] = []

    @db_retry(max_attempts=5, sleep=lambda s: pytest.fail("no wait expected"))
    def add(db: Session) -> None:
        attempts.append(1)
        db.add(Dataset(name="iris"))
        db.commit()

    with pytest.raises(IntegrityError):
        add(db)
    assert attempts == [1]


def test_gives_up_after_max_attempts_with_the_last_error(db: Session):
    sleeps: list[float] = []

    @db_retry(max_attempts=3, delay=0.5, backoff=2.0, jitter=False, sleep=sleeps.append)
    def always_dropped(db: Session) -> None:
        raise dropped()

    with pytest.raises(OperationalError) as caught:
        always_dropped(db=db)
    assert sleeps == [0.5, 1.0]
    assert caught.value.taskkit_attempts == 3  # type: ignore[attr-defined]


def test_extra_exceptions_are_retried(db: Session):
    class FlakyStorage(Exception):
        pass

    attempts: list[int] = []

    @db_retry(exceptions=FlakyStorage, sleep=lambda s: None)
    def write(db: Session) -> str:
        attempts.append(1)
        if len(attempts) < 3:
            raise FlakyStorage
        return "written"

    assert write(db) == "written"
    assert len(attempts) == 3


def test_async_functions_are_retried_and_rolled_back(db: Session, db_url: str):
    attempts: list[int] = []

    @db_retry(max_attempts=2, sleep=lambda s: None)
    async def create(name: str, db: Session) -> None:
        attempts.append(1)
        db.add(ModelRun(name=name, model_type="sgd", config={}))
        db.flush()
        if len(attempts) == 1:
            raise dropped()
        db.commit()

    assert inspect.iscoroutinefunction(create)
    asyncio.run(create("async-run", db=db))
    assert len(attempts) == 2
    assert count(db_url, ModelRun, name="async-run") == 1


def test_keeps_the_signature_for_dependency_injection():
    def get_model(model_id: int, db: Session) -> None: ...

    assert inspect.signature(db_retry(max_attempts=3)(get_model)) == inspect.signature(get_model)
    assert db_retry(get_model).__wrapped__ is get_model  # type: ignore[attr-defined]


def test_stale_versioned_row_is_re_read_and_no_update_is_lost(db: Session, db_url: str):
    run = ModelRun(name="shared", model_type="sgd", config={}, status="queued")
    db.add(run)
    db.commit()
    attempts: list[int] = []

    @db_retry(max_attempts=3, sleep=lambda s: None)
    def rename(db: Session, run_id: int) -> None:
        attempts.append(1)
        loaded = db.get(ModelRun, run_id, populate_existing=True)
        assert loaded is not None
        if len(attempts) == 1:
            # Someone else changes the row between our read and our write.
            with get_sessionmaker(db_url)() as other:
                other_run = other.get(ModelRun, run_id)
                assert other_run is not None
                other_run.status = "running"
                other.commit()
        loaded.name = "renamed"
        db.commit()  # version check: StaleDataError on the first attempt

    rename(db, run.id)
    assert len(attempts) == 2
    with get_sessionmaker(db_url)() as fresh:
        final = fresh.get(ModelRun, run.id)
        assert final is not None
        assert (final.name, final.status, final.version) == ("renamed", "running", 3)


def test_sqlite_database_is_locked_is_retried(sqlite_url: str, tmp_path):
    engine = create_engine_for(sqlite_url, Settings(sqlite_busy_timeout=0.05))
    path = engine.url.database
    assert path
    # Another process-like writer holds the write lock.
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    attempts: list[int] = []

    def release(_seconds: float) -> None:
        holder.execute("COMMIT")

    @db_retry(max_attempts=3, sleep=release)
    def create(db: Session) -> None:
        attempts.append(1)
        db.add(ModelRun(name="locked", model_type="sgd", config={}))
        db.commit()

    try:
        with Session(engine) as db:
            create(db)
        assert len(attempts) == 2
        with Session(engine) as db:
            assert db.scalar(select(func.count()).select_from(ModelRun)) == 1
            db.execute(text("DELETE FROM model_runs"))
            db.commit()
    finally:
        holder.close()
        engine.dispose()


def test_postgres_deadlock_is_retried(pg_schema_url: str, pg_db: Session):
    pg_url, db = pg_schema_url, pg_db
    db.add_all([Dataset(name="a"), Dataset(name="b")])
    db.commit()
    barrier = threading.Barrier(2, timeout=10)
    attempts: list[str] = []
    errors: list[BaseException] = []

    committed = {"a": threading.Event(), "b": threading.Event()}

    @db_retry(max_attempts=3, sleep=lambda s: None)
    def touch(db: Session, first: str, second: str) -> None:
        attempts.append(first)
        if attempts.count(first) > 1:
            # The retry waits for the survivor to commit: retrying at once could take row
            # `first` again before the survivor got it and deadlock a second time (seen under
            # load: 4 attempts).
            committed[second].wait(10)
        db.execute(update(Dataset).where(Dataset.name == first).values(description=first))
        if attempts.count(first) == 1:
            barrier.wait()  # both hold their first row lock: each now waits for the other
        db.execute(update(Dataset).where(Dataset.name == second).values(description=first))
        db.commit()
        committed[first].set()

    def worker(first: str, second: str) -> None:
        try:
            with get_sessionmaker(pg_url)() as session:
                touch(session, first, second)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=pair) for pair in (("a", "b"), ("b", "a"))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == []
    assert len(attempts) == 3  # PostgreSQL killed one side of the deadlock; it was retried
    with get_sessionmaker(pg_url)() as fresh:
        descriptions = set(fresh.scalars(select(Dataset.description)))
    assert len(descriptions) == 1  # the retried side ran last and wrote both rows


def test_postgres_serialization_failure_is_retried(pg_schema_url: str, pg_db: Session):
    pg_url, db = pg_schema_url, pg_db
    run = ModelRun(name="counter", model_type="sgd", config={})
    db.add(run)
    db.commit()
    attempts: list[int] = []

    @db_retry(max_attempts=3, sleep=lambda s: None)
    def bump(db: Session, run_id: int) -> None:
        attempts.append(1)
        db.connection(execution_options={"isolation_level": "REPEATABLE READ"})
        current = db.scalar(select(ModelRun.usage_count).where(ModelRun.id == run_id))
        if len(attempts) == 1:
            with get_sessionmaker(pg_url)() as other:
                other.execute(
                    update(ModelRun)
                    .where(ModelRun.id == run_id)
                    .values(usage_count=ModelRun.usage_count + 10)
                )
                other.commit()
        db.execute(
            update(ModelRun).where(ModelRun.id == run_id).values(usage_count=(current or 0) + 1)
        )
        db.commit()

    bump(db, run.id)
    assert len(attempts) == 2
    assert count(pg_url, ModelRun, usage_count=11) == 1
