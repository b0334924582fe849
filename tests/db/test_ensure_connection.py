"""ensure_connection with real dropped connections, and DatabaseUnavailable for a dead server."""

from __future__ import annotations

import asyncio
import socket

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from taskkit.db import db_retry, ensure_connection, get_db
from taskkit.db.models import Dataset
from taskkit.db.session import create_engine_for, get_engine, get_sessionmaker
from taskkit.errors import DatabaseUnavailable


def terminate(pid: int, url: str) -> None:
    """Kill a PostgreSQL backend from another connection, as a failover or a DBA would."""
    with get_engine(url).connect() as admin:
        assert admin.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid}).scalar()


def backend_pid(db: Session) -> int:
    return int(db.execute(text("SELECT pg_backend_pid()")).scalar_one())


def test_dropped_connection_mid_call_succeeds_and_writes_once(pg_db: Session, pg_schema_url: str):
    attempts: list[int] = []
    pids: list[int] = []

    @ensure_connection
    @db_retry(max_attempts=3, delay=0.5, sleep=lambda s: None)
    def register(db: Session, name: str) -> int:
        attempts.append(1)
        dataset = Dataset(name=name, source="s3://bucket/iris.csv")
        db.add(dataset)
        db.flush()
        pids.append(backend_pid(db))
        if len(attempts) == 1:
            terminate(pids[-1], pg_schema_url)  # the connection dies before the commit
        db.commit()
        return dataset.id

    register(pg_db, "iris")
    assert len(attempts) == 2
    assert pids[0] != pids[1]  # the second attempt ran on a new connection
    with get_sessionmaker(pg_schema_url)() as fresh:
        assert fresh.scalar(select(func.count()).select_from(Dataset)) == 1


def test_connection_dropped_before_the_call_is_replaced(pg_db: Session, pg_schema_url: str):
    old_pid = backend_pid(pg_db)  # the session now holds this connection in a transaction
    terminate(old_pid, pg_schema_url)
    calls: list[int] = []

    @ensure_connection
    def count_datasets(db: Session) -> int:
        calls.append(backend_pid(db))
        return int(db.scalar(select(func.count()).select_from(Dataset)) or 0)

    assert count_datasets(pg_db) == 0
    assert len(calls) == 1
    assert calls[0] != old_pid


def test_idle_pooled_connections_killed_by_the_server_are_replaced(pg_schema_url: str, pg_engine):
    with pg_engine.connect() as connection:
        pid = connection.execute(text("SELECT pg_backend_pid()")).scalar_one()
    terminate(pid, pg_schema_url)  # now idle in the pool, and dead

    @ensure_connection
    def ping() -> int:
        db = next(get_db())
        try:
            return int(db.execute(text("SELECT pg_backend_pid()")).scalar_one())
        finally:
            db.close()

    with pytest.MonkeyPatch.context() as patch:
        from taskkit.config import reset_settings

        patch.setenv("TASKKIT_DATABASE_URL", pg_schema_url)
        reset_settings()
        try:
            assert ping() != pid
        finally:
            reset_settings()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def dead_url() -> str:
    return f"postgresql+psycopg://taskkit:hunter2@127.0.0.1:{free_port()}/prod"


def test_unreachable_database_raises_database_unavailable_without_the_password(dead_url: str):
    engine = create_engine_for(dead_url)
    sleeps: list[float] = []
    calls: list[int] = []

    @ensure_connection(max_attempts=3, delay=0.5, backoff=2.0, sleep=sleeps.append)
    def read(db: Session) -> None:
        calls.append(1)

    try:
        with Session(engine) as db, pytest.raises(DatabaseUnavailable) as caught:
            read(db)
    finally:
        engine.dispose()
    error = caught.value
    port = engine.url.port
    assert f"postgresql://127.0.0.1:{port}/prod" in str(error)
    assert error.database == f"postgresql://127.0.0.1:{port}/prod"
    assert error.attempts == 3
    assert sleeps == [0.5, 1.0]
    assert calls == []  # the function never ran against a dead database
    assert isinstance(error, ConnectionError)  # task ladders retry it as an outage
    everything = f"{error!s} {error!r} {error.__cause__!s} {error.__cause__!r}"
    assert "hunter2" not in everything


def test_without_a_session_it_checks_the_given_engine(dead_url: str):
    engine = create_engine_for(dead_url)

    @ensure_connection(engine=engine, max_attempts=2, sleep=lambda s: None)
    def uses_its_own_session() -> None:
        pytest.fail("must not run")

    try:
        with pytest.raises(DatabaseUnavailable, match="after 2 attempt"):
            uses_its_own_session()
    finally:
        engine.dispose()


def test_without_a_session_it_checks_the_default_database(default_database: str):
    @ensure_connection
    def datasets() -> int:
        db = next(get_db())
        try:
            return int(db.scalar(select(func.count()).select_from(Dataset)) or 0)
        finally:
            db.close()

    assert datasets() == 0


def test_async_functions_are_checked(db: Session, dead_url: str):
    @ensure_connection
    async def read(db: Session) -> int:
        return int(db.scalar(select(func.count()).select_from(Dataset)) or 0)

    assert asyncio.run(read(db)) == 0
    engine = create_engine_for(dead_url)
    try:
        with Session(engine) as dead, pytest.raises(DatabaseUnavailable):
            asyncio.run(
                ensure_connection(max_attempts=1)(read)(dead)  # type: ignore[arg-type]
            )
    finally:
        engine.dispose()
