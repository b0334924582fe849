"""TransactionManager with a sqlite3 connection, a SQLAlchemy Session and an AsyncSession-like."""

from __future__ import annotations

import asyncio
import logging
import sqlite3

import pytest
from sqlalchemy import Column, Integer, String, create_engine, select
from sqlalchemy.orm import Session, declarative_base

from taskkit.errors import ConfigurationError
from taskkit.recovery import TransactionManager

Base = declarative_base()


class Row(Base):
    __tablename__ = "rows"
    id = Column(Integer, primary_key=True)
    name = Column(String, nullable=False)


@pytest.fixture
def conn(tmp_path):
    connection = sqlite3.connect(tmp_path / "t.db")
    connection.execute("create table t (x integer not null)")
    connection.commit()
    yield connection
    connection.close()


def count(conn) -> int:
    return conn.execute("select count(*) from t").fetchone()[0]


def test_commits_when_the_block_succeeds(conn):
    with TransactionManager(conn) as tx:
        conn.execute("insert into t values (1)")
    assert tx.session is conn
    other = sqlite3.connect(conn.execute("pragma database_list").fetchone()[2])
    assert other.execute("select count(*) from t").fetchone()[0] == 1


def test_rolls_back_and_reraises_when_the_block_fails(conn):
    with pytest.raises(RuntimeError, match="half way"), TransactionManager(conn):
        conn.execute("insert into t values (1)")
        raise RuntimeError("half way")
    assert count(conn) == 0


def test_with_a_sqlalchemy_session(tmp_path):
    engine = create_engine(f"sqlite:///{tmp_path / 'orm.db'}")
    Base.metadata.create_all(engine)
    with Session(engine) as db:
        with TransactionManager(db):
            db.add(Row(name="kept"))
        with pytest.raises(ValueError), TransactionManager(db):
            db.add(Row(name="dropped"))
            db.flush()
            raise ValueError
    with Session(engine) as db:
        assert db.scalars(select(Row.name)).all() == ["kept"]


def test_a_failed_commit_is_rolled_back_and_raised(tmp_path):
    engine = create_engine(f"sqlite:///{tmp_path / 'orm.db'}")
    Base.metadata.create_all(engine)
    with Session(engine) as db:
        with pytest.raises(Exception, match="NOT NULL"), TransactionManager(db):
            db.add(Row(name=None))
        # the session is usable again
        with TransactionManager(db):
            db.add(Row(name="after"))
        assert db.scalars(select(Row.name)).all() == ["after"]


class Recording:
    def __init__(self, rollback_error: Exception | None = None):
        self.calls: list[str] = []
        self.rollback_error = rollback_error

    def commit(self):
        self.calls.append("commit")

    def rollback(self):
        self.calls.append("rollback")
        if self.rollback_error:
            raise self.rollback_error


def test_a_failing_rollback_is_logged_and_the_original_error_wins(caplog):
    session = Recording(rollback_error=OSError("connection lost"))
    with (
        caplog.at_level(logging.ERROR, logger="taskkit.recovery"),
        pytest.raises(KeyError),
        TransactionManager(session),
    ):
        raise KeyError("the real problem")
    assert session.calls == ["rollback"]
    assert "rollback failed while handling KeyError" in caplog.text


def test_async_with_awaits_commit_and_rollback():
    class AsyncSessionLike:
        def __init__(self):
            self.calls = []

        async def commit(self):
            self.calls.append("commit")

        async def rollback(self):
            self.calls.append("rollback")

    session = AsyncSessionLike()

    async def main():
        async with TransactionManager(session):
            pass
        with pytest.raises(ValueError):
            async with TransactionManager(session):
                raise ValueError

    asyncio.run(main())
    assert session.calls == ["commit", "rollback"]


def test_an_object_without_commit_is_rejected():
    with pytest.raises(ConfigurationError, match="dict has no commit\\(\\) or rollback\\(\\)"):
        TransactionManager({})
