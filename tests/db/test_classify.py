"""Which database errors db_retry treats as transient: the classification, as pure logic."""

from __future__ import annotations

import sqlite3

import pytest
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url
from sqlalchemy.orm.exc import StaleDataError

from taskkit.db import is_transient
from taskkit.db.classify import describe_database


class DriverError(Exception):
    def __init__(self, message: str, sqlstate: str | None = None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


def wrap(kind: type[sa_exc.DBAPIError], message: str, sqlstate: str | None = None, **kw):
    return kind("SELECT 1", {}, DriverError(message, sqlstate), **kw)


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        (wrap(sa_exc.OperationalError, "server closed the connection", "08006"), True),
        (wrap(sa_exc.OperationalError, "could not serialize access", "40001"), True),
        (wrap(sa_exc.OperationalError, "deadlock detected", "40P01"), True),
        (wrap(sa_exc.OperationalError, "terminating connection", "57P01"), True),
        (wrap(sa_exc.OperationalError, "lock timeout", "55P03"), True),
        (wrap(sa_exc.OperationalError, "too many connections", "53300"), True),
        (wrap(sa_exc.OperationalError, "database is locked"), True),
        (wrap(sa_exc.OperationalError, "no such table: model_runs"), False),
        (wrap(sa_exc.OperationalError, 'near "SELEC": syntax error'), False),
        (wrap(sa_exc.IntegrityError, "duplicate key value", "23505"), False),
        (wrap(sa_exc.DataError, "invalid input syntax for type integer", "22P02"), False),
        (wrap(sa_exc.ProgrammingError, "relation does not exist", "42P01"), False),
        (
            wrap(sa_exc.InterfaceError, "connection already closed", connection_invalidated=True),
            True,
        ),
        (wrap(sa_exc.InterfaceError, "cursor already closed"), False),
        (StaleDataError("UPDATE statement on table expected to update 1 row(s); 0 matched"), True),
        (sa_exc.TimeoutError("QueuePool limit of size 5 overflow 10 reached"), True),
        (sa_exc.DisconnectionError("pre-ping failed"), True),
        (ConnectionError("not a database error"), False),
        (sqlite3.OperationalError("database is locked"), False),  # unwrapped: not SQLAlchemy's
    ],
    ids=lambda v: v if isinstance(v, bool) else f"{type(v).__name__}:{str(v)[:40]}",
)
def test_is_transient(error: BaseException, transient: bool):
    assert is_transient(error) is transient


def test_describe_database_never_shows_credentials():
    url = make_url("postgresql+psycopg://app:s3cret@db.internal:6543/prod?sslmode=require")
    assert describe_database(url) == "postgresql://db.internal:6543/prod"
    assert describe_database(make_url("sqlite:////var/lib/app/taskkit.db")) == (
        "sqlite:////var/lib/app/taskkit.db"
    )
