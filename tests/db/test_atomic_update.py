"""atomic_update: expressions, callables with compare-and-swap, and real concurrent processes."""

from __future__ import annotations

import multiprocessing

import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session

from taskkit.db import atomic_update
from taskkit.db.models import ModelRun, Prediction
from taskkit.db.session import dispose_engines, get_sessionmaker
from taskkit.errors import ConcurrentUpdateError, ConfigurationError
from taskkit.recovery import TransactionManager


@pytest.fixture
def run_id(db: Session) -> int:
    run = ModelRun(name="counted", model_type="sgd", config={"lr": 0.1}, usage_count=0)
    db.add(run)
    db.commit()
    return run.id


def fresh(db_url: str, run_id: int) -> ModelRun:
    with get_sessionmaker(db_url)() as session:
        run = session.get(ModelRun, run_id)
        assert run is not None
        return run


def test_expression_form_increments_and_bumps_the_version(db: Session, db_url: str, run_id: int):
    for _ in range(3):
        assert atomic_update(db, ModelRun, run_id, {"usage_count": ModelRun.usage_count + 1})
    run = fresh(db_url, run_id)
    assert (run.usage_count, run.version) == (3, 4)


def test_callable_form_reads_the_current_row(db: Session, db_url: str, run_id: int):
    assert atomic_update(db, ModelRun, run_id, {"config": lambda r: {**r.config, "epochs": 5}})
    assert fresh(db_url, run_id).config == {"lr": 0.1, "epochs": 5}


def test_constants_are_written(db: Session, db_url: str, run_id: int):
    assert atomic_update(db, ModelRun, run_id, {"status": "running", "accuracy": 0.9})
    run = fresh(db_url, run_id)
    assert (run.status, run.accuracy) == ("running", 0.9)


def test_missing_record_returns_false(db: Session, run_id: int):
    assert atomic_update(db, ModelRun, run_id + 1000, {"usage_count": 1}) is False
    assert atomic_update(db, ModelRun, run_id + 1000, {"usage_count": lambda r: 1}) is False


def test_loaded_copy_shows_the_new_values(db: Session, run_id: int):
    run = db.get(ModelRun, run_id)
    assert run is not None
    assert run.usage_count == 0
    atomic_update(db, ModelRun, run_id, {"usage_count": ModelRun.usage_count + 5})
    assert run.usage_count == 5


def test_conflict_is_retried_with_a_fresh_read(db: Session, db_url: str, run_id: int):
    seen: list[int] = []

    def add_one(row: ModelRun) -> int:
        seen.append(row.usage_count)
        if len(seen) == 1:
            # Another writer commits between our read and our compare-and-swap.
            with get_sessionmaker(db_url)() as other:
                atomic_update(other, ModelRun, run_id, {"usage_count": ModelRun.usage_count + 10})
        return row.usage_count + 1

    assert atomic_update(db, ModelRun, run_id, {"usage_count": add_one}, sleep=lambda s: None)
    assert seen == [0, 10]  # the second attempt saw the other writer's value
    assert fresh(db_url, run_id).usage_count == 11  # nothing lost


def test_conflict_outliving_the_retries_raises_and_writes_nothing(
    db: Session, db_url: str, run_id: int
):
    calls: list[int] = []

    def always_raced(row: ModelRun) -> str:
        calls.append(1)
        with get_sessionmaker(db_url)() as other:
            atomic_update(other, ModelRun, run_id, {"usage_count": ModelRun.usage_count + 1})
        return "ours"

    with pytest.raises(ConcurrentUpdateError, match=r"ModelRun id=\d+ .* 3 attempt") as caught:
        atomic_update(
            db, ModelRun, run_id, {"name": always_raced}, max_retries=2, sleep=lambda s: None
        )
    assert caught.value.attempts == 3
    assert len(calls) == 3
    run = fresh(db_url, run_id)
    assert run.name == "counted"
    assert run.usage_count == 3


def test_commit_false_joins_the_callers_transaction(db: Session, db_url: str, run_id: int):
    with pytest.raises(RuntimeError), TransactionManager(db):
        db.add(ModelRun(name="in the same transaction", model_type="sgd", config={}))
        atomic_update(db, ModelRun, run_id, {"usage_count": lambda r: 7}, commit=False)
        raise RuntimeError("the caller's transaction fails")
    assert fresh(db_url, run_id).usage_count == 0  # rolled back with it
    with TransactionManager(db):
        atomic_update(db, ModelRun, run_id, {"usage_count": ModelRun.usage_count + 2}, commit=False)
    assert fresh(db_url, run_id).usage_count == 2


def test_bad_arguments_are_clear_errors(db: Session, run_id: int):
    with pytest.raises(ConfigurationError, match="ModelRun has no column usage"):
        atomic_update(db, ModelRun, run_id, {"usage": 1})
    with pytest.raises(ConfigurationError, match="Prediction has no version column"):
        atomic_update(db, Prediction, 1, {"confidence": 1.0})
    with pytest.raises(ConfigurationError, match="mapped model class"):
        atomic_update(db, dict, 1, {"x": 1})
    with pytest.raises(ConfigurationError, match="max_retries"):
        atomic_update(db, ModelRun, run_id, {"status": "x"}, max_retries=-1)


# -- several OS processes ---------------------------------------------------------------------

PROCESSES = 4


def _increment(url: str, run_id: int, times: int, form: str) -> tuple[int, int]:
    """In a child process: ``times`` increments; returns (updated, conflicts given up)."""
    dispose_engines()
    updated = gave_up = 0
    with get_sessionmaker(url)() as db:
        for _ in range(times):
            value = (
                ModelRun.usage_count + 1 if form == "expression" else (lambda r: r.usage_count + 1)
            )
            try:
                updated += atomic_update(
                    db, ModelRun, run_id, {"usage_count": value}, max_retries=20
                )
            except ConcurrentUpdateError:
                gave_up += 1
    dispose_engines()
    return updated, gave_up


def run_in_processes(url: str, run_id: int, times: int, form: str) -> list[tuple[int, int]]:
    dispose_engines()  # no pooled connection may cross the fork
    context = multiprocessing.get_context("spawn")
    with context.Pool(PROCESSES) as pool:
        return pool.starmap(_increment, [(url, run_id, times, form)] * PROCESSES)


def test_processes_incrementing_with_the_expression_lose_nothing(
    pg_db: Session, pg_schema_url: str
):
    run = ModelRun(name="hot", model_type="sgd", config={})
    pg_db.add(run)
    pg_db.commit()
    results = run_in_processes(pg_schema_url, run.id, 300, "expression")
    assert results == [(300, 0)] * PROCESSES
    final = fresh(pg_schema_url, run.id)
    assert final.usage_count == PROCESSES * 300
    assert final.version == PROCESSES * 300 + 1


def test_processes_read_modify_write_with_a_callable_lose_nothing(
    pg_db: Session, pg_schema_url: str
):
    run = ModelRun(name="hot", model_type="sgd", config={})
    pg_db.add(run)
    pg_db.commit()
    results = run_in_processes(pg_schema_url, run.id, 100, "callable")
    updated = sum(u for u, _ in results)
    # Every call that returned True is in the count, exactly once; contention may make a few
    # give up (ConcurrentUpdateError), and those wrote nothing.
    assert fresh(pg_schema_url, run.id).usage_count == updated
    assert updated + sum(g for _, g in results) == PROCESSES * 100
    assert updated >= PROCESSES * 100 * 0.9


def test_processes_on_the_embedded_sqlite_database_lose_nothing(sqlite_url: str):
    with get_sessionmaker(sqlite_url)() as db:
        run = ModelRun(name="hot", model_type="sgd", config={})
        db.add(run)
        db.commit()
        run_id = run.id
    try:
        results = run_in_processes(sqlite_url, run_id, 50, "callable")
        updated = sum(u for u, _ in results)
        assert fresh(sqlite_url, run_id).usage_count == updated
        assert updated + sum(g for _, g in results) == PROCESSES * 50
    finally:
        with get_sessionmaker(sqlite_url)() as db:
            db.execute(text("DELETE FROM model_runs"))
            db.commit()
