"""Settings, engines and sessions: the embedded SQLite default and PostgreSQL behave alike."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from taskkit.config import Settings, get_settings, load_settings, reset_settings
from taskkit.db import get_db, session_scope, with_savepoint
from taskkit.db.models import Dataset, ModelRun, Prediction, TrainingProgress
from taskkit.db.session import create_engine_for, get_engine, get_sessionmaker
from taskkit.errors import ConfigurationError
from taskkit.recovery import TransactionManager

# -- settings ---------------------------------------------------------------------------------


def test_default_database_is_a_sqlite_file_under_taskkit_home(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TASKKIT_HOME")
    settings = Settings()
    assert settings.home == tmp_path / ".taskkit"
    assert settings.database_url == f"sqlite:///{tmp_path / '.taskkit' / 'taskkit.db'}"


def test_settings_come_from_taskkit_environment_variables(monkeypatch):
    monkeypatch.setenv("TASKKIT_DATABASE_URL", "postgresql+psycopg://app@db:5432/app")
    monkeypatch.setenv("TASKKIT_DB_POOL_SIZE", "12")
    reset_settings()
    try:
        settings = get_settings()
        assert settings.database_url == "postgresql+psycopg://app@db:5432/app"
        assert settings.db_pool_size == 12
        assert get_settings() is settings  # cached
    finally:
        monkeypatch.undo()
        reset_settings()


def test_malformed_settings_name_the_variable_and_hide_the_value(monkeypatch):
    monkeypatch.setenv("TASKKIT_DATABASE_URL", "postgres//app:hunter2@db")
    with pytest.raises(ConfigurationError, match="TASKKIT_DATABASE_URL: .*not a database URL") as e:
        load_settings()
    assert "hunter2" not in str(e.value)
    monkeypatch.setenv("TASKKIT_DATABASE_URL", "")
    monkeypatch.setenv("TASKKIT_DB_POOL_SIZE", "zero")
    with pytest.raises(ConfigurationError, match="TASKKIT_DB_POOL_SIZE"):
        load_settings()
    monkeypatch.setenv("TASKKIT_DB_POOL_SIZE", "0")
    with pytest.raises(ConfigurationError, match="TASKKIT_DB_POOL_SIZE: .*greater than or equal"):
        load_settings()


# -- engines ----------------------------------------------------------------------------------


def test_sqlite_engine_uses_wal_a_busy_timeout_and_foreign_keys(tmp_path: Path):
    engine = create_engine_for(
        f"sqlite:///{tmp_path / 'nested' / 'dir' / 'x.db'}", Settings(sqlite_busy_timeout=7)
    )
    try:
        with engine.connect() as connection:
            pragma = connection.exec_driver_sql
            assert pragma("PRAGMA journal_mode").scalar() == "wal"
            assert pragma("PRAGMA busy_timeout").scalar() == 7000
            assert pragma("PRAGMA foreign_keys").scalar() == 1
        assert (tmp_path / "nested" / "dir" / "x.db").exists()
    finally:
        engine.dispose()


def test_postgres_engine_pings_pooled_connections(pg_engine):
    assert pg_engine.pool._pre_ping is True
    assert pg_engine.dialect.driver == "psycopg"


def test_foreign_keys_are_enforced(db: Session):
    db.add(TrainingProgress(model_run_id=12345))
    with pytest.raises(IntegrityError):
        db.commit()


def test_get_engine_is_cached_per_url(db_url: str):
    assert get_engine(db_url) is get_engine(db_url)


# -- sessions ---------------------------------------------------------------------------------


def test_get_db_yields_a_session_and_closes_it(default_database: str):
    generator = get_db()
    db = next(generator)
    db.add(Dataset(name="iris"))
    db.flush()
    assert db.in_transaction()
    generator.close()  # FastAPI does this after the response
    assert not db.in_transaction()  # closed: the uncommitted row was rolled back
    with get_sessionmaker(default_database)() as fresh:
        assert fresh.scalar(select(func.count()).select_from(Dataset)) == 0


def test_session_scope_commits_or_rolls_back(default_database: str):
    with session_scope() as db:
        db.add(Dataset(name="kept"))
    with pytest.raises(RuntimeError), session_scope() as db:
        db.add(Dataset(name="dropped"))
        db.flush()
        raise RuntimeError
    with session_scope() as db:
        assert list(db.scalars(select(Dataset.name))) == ["kept"]


def test_records_stay_readable_after_commit_and_close(db_url: str, engine):
    with get_sessionmaker(db_url)() as db:
        run = ModelRun(name="kept", model_type="sgd", config={"a": [1, 2]})
        db.add(run)
        db.commit()
    assert (run.name, run.config, run.status, run.usage_count) == (
        "kept",
        {"a": [1, 2]},
        "created",
        0,
    )


def test_timestamps_are_aware_utc_on_every_backend(db: Session):
    naive_utc = datetime(2026, 1, 2, 3, 4, 5)  # the seed's datetime.utcnow() style
    plus_two = datetime(2026, 1, 2, 5, 4, 5, tzinfo=timezone(timedelta(hours=2)))
    run = ModelRun(name="t", model_type="sgd", config={}, created_at=naive_utc)
    run.completed_at = plus_two
    db.add(run)
    db.commit()
    db.expire_all()
    loaded = db.get(ModelRun, run.id)
    assert loaded is not None
    assert loaded.created_at == datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert loaded.completed_at == datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert loaded.updated_at.tzinfo is not None


def test_json_none_is_sql_null_so_not_null_columns_reject_it(db: Session):
    run = ModelRun(name="t", model_type="sgd", config={})
    db.add(run)
    db.commit()
    db.add(Prediction(model_run_id=run.id, input_data=None, prediction=1))
    with pytest.raises(IntegrityError):
        db.commit()


def test_large_model_columns_are_not_loaded_until_asked(db: Session):
    run = ModelRun(name="t", model_type="sgd", config={}, model_object=b"\x80" * 1000)
    db.add(run)
    db.commit()
    db.expunge_all()
    loaded = db.get(ModelRun, run.id)
    assert loaded is not None
    assert "model_object" not in loaded.__dict__
    assert loaded.model_object == b"\x80" * 1000


# -- TransactionManager and with_savepoint on these sessions ----------------------------------


def test_transaction_manager_commits_and_rolls_back(db: Session, db_url: str):
    with TransactionManager(db):
        db.add(Dataset(name="committed"))
    with pytest.raises(IntegrityError), TransactionManager(db):
        db.add(Dataset(name="rolled back"))
        db.add(Dataset(name="committed"))  # duplicate name: the commit fails
    with get_sessionmaker(db_url)() as fresh:
        assert list(fresh.scalars(select(Dataset.name))) == ["committed"]
    db.add(Dataset(name="after the failure"))  # the session is usable again
    db.commit()


def test_with_savepoint_undoes_only_its_own_part(db: Session, db_url: str):
    @with_savepoint
    def add_dataset(db: Session, name: str) -> Dataset:
        dataset = Dataset(name=name)
        db.add(dataset)
        db.flush()
        return dataset

    with TransactionManager(db):
        db.add(ModelRun(name="outer", model_type="sgd", config={}))
        db.flush()
        first = add_dataset(db, "iris")
        with pytest.raises(IntegrityError):
            add_dataset(db, "iris")
        assert add_dataset(db, name="wine").id is not None
    with get_sessionmaker(db_url)() as fresh:
        assert fresh.scalar(select(func.count()).select_from(ModelRun)) == 1
        assert sorted(fresh.scalars(select(Dataset.name))) == ["iris", "wine"]
    assert first.id is not None


def test_with_savepoint_on_async_functions(db: Session, db_url: str):
    @with_savepoint
    async def add(db: Session, name: str) -> None:
        db.add(Dataset(name=name))
        db.flush()
        raise ValueError("undo me")

    with TransactionManager(db):
        db.add(Dataset(name="kept"))
        with pytest.raises(ValueError, match="undo me"):
            asyncio.run(add(db, "undone"))
    with get_sessionmaker(db_url)() as fresh:
        assert list(fresh.scalars(select(Dataset.name))) == ["kept"]


def test_with_savepoint_needs_a_session():
    @with_savepoint
    def no_session(x: int) -> int:
        return x

    with pytest.raises(ConfigurationError, match="no_session was called without a SQLAlchemy"):
        no_session(1)


def test_sqlite_savepoints_really_nest(sqlite_url: str):
    # pysqlite's own transaction handling would commit before a SAVEPOINT; taskkit's engine
    # lets SQLAlchemy emit BEGIN so the outer transaction survives the inner rollback.
    with get_sessionmaker(sqlite_url)() as db:
        db.add(Dataset(name="outer"))
        nested = db.begin_nested()
        db.add(Dataset(name="inner"))
        db.flush()
        nested.rollback()
        db.rollback()
        assert db.scalar(text("SELECT count(*) FROM datasets")) == 0
