"""A PostgreSQL server of the test's own crashes and comes back: the helpers ride it out.

These tests crash (``pg_ctl stop -m immediate``) and restart a private server started for the
test on a free port; the shared server is never touched.
"""

from __future__ import annotations

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from taskkit.db import db_retry, ensure_connection
from taskkit.db.migrate import upgrade
from taskkit.db.models import Dataset
from taskkit.db.session import create_engine_for
from taskkit.errors import DatabaseUnavailable
from tests.conftest import PrivatePostgres


@pytest.fixture
def server(private_postgres: PrivatePostgres):
    engine = create_engine_for(private_postgres.url)
    upgrade(engine)
    yield private_postgres, engine
    engine.dispose()


def datasets(engine) -> list[str]:
    with Session(engine) as db:
        return sorted(db.scalars(select(Dataset.name)))


def test_pooled_and_held_connections_survive_a_server_restart(server):
    postgres, engine = server

    @ensure_connection
    @db_retry(max_attempts=3, sleep=lambda s: None)
    def register(db: Session, name: str) -> None:
        db.add(Dataset(name=name))
        db.commit()

    held = Session(engine)
    register(held, "before")
    held.scalar(select(func.count()).select_from(Dataset))  # holds a connection again
    postgres.crash()
    postgres.start()
    register(held, "after, same session")  # its connection died with the server
    with Session(engine) as new_session:  # the pool's connections died too
        register(new_session, "after, new session")
    held.close()
    assert datasets(engine) == ["after, new session", "after, same session", "before"]


def test_a_short_outage_is_waited_out(server):
    postgres, engine = server
    postgres.crash()
    waits: list[float] = []

    def wait_and_let_the_server_come_back(seconds: float) -> None:
        waits.append(seconds)
        if len(waits) == 2:
            postgres.start()

    @ensure_connection(max_attempts=5, delay=1.0, sleep=wait_and_let_the_server_come_back)
    def register(db: Session, name: str) -> None:
        db.add(Dataset(name=name))
        db.commit()

    with Session(engine) as db:
        register(db, "iris")
    assert waits == [1.0, 2.0]  # down for two checks, up on the third
    assert datasets(engine) == ["iris"]


def test_a_long_outage_is_database_unavailable_and_then_recovers(server):
    postgres, engine = server
    postgres.crash()

    @ensure_connection(max_attempts=3, sleep=lambda s: None)
    def register(db: Session, name: str) -> None:
        db.add(Dataset(name=name))
        db.commit()

    with Session(engine) as db, pytest.raises(DatabaseUnavailable) as caught:
        register(db, "lost?")
    assert f"127.0.0.1:{postgres.port}/postgres" in str(caught.value)
    postgres.start()
    with Session(engine) as db:
        register(db, "after the outage")
    assert datasets(engine) == ["after the outage"]  # nothing half-written from the outage


def test_a_crash_between_flush_and_commit_writes_the_row_once(server):
    postgres, engine = server
    attempts: list[int] = []

    def restart_while_waiting(seconds: float) -> None:
        postgres.start()

    @ensure_connection
    @db_retry(max_attempts=3, sleep=restart_while_waiting)
    def register(db: Session, name: str) -> None:
        attempts.append(1)
        db.add(Dataset(name=name))
        db.flush()
        if len(attempts) == 1:
            postgres.crash()  # the flushed row was never committed
        db.commit()

    with Session(engine) as db:
        register(db, "iris")
    assert len(attempts) == 2
    assert datasets(engine) == ["iris"]
