"""safe_bulk_insert: every good record lands, each bad one comes back with the database's reason."""

from __future__ import annotations

import logging

import pytest
from sqlalchemy import String, event, func, select, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from taskkit.db import safe_bulk_insert
from taskkit.db.models import ModelRun, Prediction
from taskkit.db.session import get_sessionmaker
from taskkit.errors import ConfigurationError


@pytest.fixture
def run_id(db: Session) -> int:
    run = ModelRun(name="scorer", model_type="sgd", config={})
    db.add(run)
    db.commit()
    return run.id


def rows(run_id: int, n: int) -> list[dict]:
    return [
        {
            "model_run_id": run_id,
            "item_key": f"item-{i}",
            "input_data": {"f": [i, i / 2]},
            "prediction": i % 3,
            "confidence": 0.5,
        }
        for i in range(n)
    ]


class StatementCounter:
    def __init__(self, engine) -> None:
        self.inserts = 0
        self.engine = engine
        event.listen(engine, "before_cursor_execute", self)

    def __call__(self, conn, cursor, statement, parameters, context, executemany) -> None:
        if statement.lstrip().upper().startswith("INSERT"):
            self.inserts += 1

    def close(self) -> None:
        event.remove(self.engine, "before_cursor_execute", self)


def stored_keys(db_url: str) -> list[str]:
    with get_sessionmaker(db_url)() as fresh:
        return list(fresh.scalars(select(Prediction.item_key).order_by(Prediction.id)))


def test_ten_thousand_records_with_ten_bad_ones(db: Session, db_url: str, engine, run_id: int):
    records = rows(run_id, 10_000)
    null_rows = [17, 2_500, 5_001, 7_777, 9_999]
    duplicate_rows = [100, 3_333, 6_000, 8_123, 9_000]
    for i in null_rows:
        records[i]["prediction"] = None  # NOT NULL violation
    for i in duplicate_rows:
        records[i]["item_key"] = records[i - 50]["item_key"]  # unique (run, item_key) violation
    bad = {id(records[i]) for i in null_rows + duplicate_rows}
    counter = StatementCounter(engine)
    try:
        successful, failed = safe_bulk_insert(db, Prediction, records, batch_size=100)
    finally:
        counter.close()

    assert {id(record) for record, _ in failed} == bad
    assert len(successful) == 9_990
    assert {id(r) for r in successful}.isdisjoint(bad)
    for record, error in failed:
        if record["prediction"] is None:
            assert "prediction" in error.lower()
            assert "null" in error.lower()
        else:
            assert "unique" in error.lower() or "duplicate" in error.lower()
    keys = stored_keys(db_url)
    assert len(keys) == 9_990
    assert sorted(keys) == sorted(r["item_key"] for r in successful)
    # Bisection, not row by row: 100 batches, plus about 2*log2(100) per bad record.
    assert counter.inserts <= 100 + 10 * 16


def test_psycopgs_pipeline_abort_warning_is_not_logged_for_handled_failures(pg_db: Session, caplog):
    run = ModelRun(name="scorer", model_type="sgd", config={})
    pg_db.add(run)
    pg_db.commit()
    records = rows(run.id, 300)
    records[150]["prediction"] = None
    with caplog.at_level(logging.WARNING):
        _, failed = safe_bulk_insert(pg_db, Prediction, records)
    assert [r for r, _ in failed] == [records[150]]
    assert not [r for r in caplog.records if r.name.startswith("psycopg")]
    logging.getLogger("psycopg").warning("error ignored terminating %r: %s", "p", "e")
    assert [r.name for r in caplog.records] == ["psycopg"]  # outside our calls it passes


def test_instances_are_inserted_and_bad_ones_isolated(db: Session, db_url: str, run_id: int):
    good = [
        Prediction(model_run_id=run_id, item_key=f"k{i}", input_data=[i], prediction=i)
        for i in range(30)
    ]
    bad = Prediction(model_run_id=run_id, item_key="k3", input_data=[3], prediction=3)
    successful, failed = safe_bulk_insert(db, Prediction, [*good[:10], bad, *good[10:]], 8)
    assert successful == good
    assert [record for record, _ in failed] == [bad]
    assert all(p.id is not None for p in good)
    assert len(stored_keys(db_url)) == 30


def test_records_with_unknown_columns_fail_without_a_round_trip(db: Session, run_id: int):
    records = rows(run_id, 3)
    records[1]["colour"] = "blue"
    successful, failed = safe_bulk_insert(db, Prediction, records)
    assert len(successful) == 2
    assert failed == [(records[1], "Prediction has no column colour")]


def test_values_the_driver_cannot_bind_fail_alone(db: Session, run_id: int):
    records = rows(run_id, 4)
    records[2]["input_data"] = {1, 2}  # a set is not JSON
    successful, failed = safe_bulk_insert(db, Prediction, records, batch_size=4)
    assert len(successful) == 3
    assert [r for r, _ in failed] == [records[2]]
    assert "not JSON serializable" in failed[0][1]


def test_commit_false_leaves_the_rows_in_the_callers_transaction(
    db: Session, db_url: str, run_id: int
):
    successful, failed = safe_bulk_insert(db, Prediction, rows(run_id, 5), commit=False)
    assert (len(successful), failed) == (5, [])
    db.rollback()
    assert stored_keys(db_url) == []


def test_empty_input_and_bad_arguments(db: Session):
    assert safe_bulk_insert(db, Prediction, []) == ([], [])
    with pytest.raises(ConfigurationError, match="batch_size"):
        safe_bulk_insert(db, Prediction, [], batch_size=0)
    with pytest.raises(ConfigurationError, match="mapped model class"):
        safe_bulk_insert(db, object, [])


def test_a_lost_connection_is_not_a_bad_record_and_nothing_is_committed(
    pg_db: Session, pg_schema_url: str, pg_engine
):
    run = ModelRun(name="scorer", model_type="sgd", config={})
    pg_db.add(run)
    pg_db.commit()
    pid = pg_db.execute(text("SELECT pg_backend_pid()")).scalar_one()
    batches = {"n": 0}

    def kill_during_third_batch(conn, cursor, statement, parameters, context, executemany):
        if statement.lstrip().upper().startswith("INSERT"):
            batches["n"] += 1
            if batches["n"] == 3:
                with pg_engine.connect() as admin:
                    admin.execute(text("SELECT pg_terminate_backend(:p)"), {"p": pid})

    # Instances take the INSERT path on PostgreSQL too (dicts take COPY: test_bulk_copy.py).
    instances = [Prediction(**row) for row in rows(run.id, 500)]
    event.listen(pg_engine, "before_cursor_execute", kill_during_third_batch)
    try:
        with pytest.raises(OperationalError):
            safe_bulk_insert(pg_db, Prediction, instances, batch_size=100)
    finally:
        event.remove(pg_engine, "before_cursor_execute", kill_during_third_batch)
    pg_db.rollback()
    with get_sessionmaker(pg_schema_url)() as fresh:
        assert fresh.scalar(select(func.count()).select_from(Prediction)) == 0


class _Other(DeclarativeBase):
    pass


class Renamed(_Other):
    """A model whose attribute names differ from its column names."""

    __tablename__ = "taskkit_test_renamed"
    id: Mapped[int] = mapped_column(primary_key=True)
    label: Mapped[str] = mapped_column("label_text", String(20), unique=True)


def test_attribute_names_that_differ_from_column_names(db: Session, engine):
    _Other.metadata.create_all(engine)
    try:
        records = [{"label": "a"}, {"label": "b"}, {"label": "a"}]
        successful, failed = safe_bulk_insert(db, Renamed, records)
        assert successful == records[:2]
        assert [r for r, _ in failed] == [records[2]]
        assert sorted(db.scalars(select(Renamed.label))) == ["a", "b"]
    finally:
        db.rollback()
        _Other.metadata.drop_all(engine)
