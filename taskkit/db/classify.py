"""Which database errors are worth retrying, and how to name a database without its password."""

from __future__ import annotations

from typing import Any

from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL
from sqlalchemy.orm.exc import StaleDataError

__all__ = [
    "describe_database",
    "driver_message",
    "is_disconnect",
    "is_missing_schema",
    "is_transient",
    "sqlstate",
]

# SQLSTATE classes that mean "try again": connection exception (08), transaction rollback:
# serialization failure and deadlock (40), insufficient resources (53), operator intervention:
# admin shutdown, crash shutdown, cannot connect now, statement cancelled (57), system error (58).
_TRANSIENT_SQLSTATE_CLASSES = frozenset({"08", "40", "53", "57", "58"})
# lock_not_available (NOWAIT / lock_timeout), object_in_use.
_TRANSIENT_SQLSTATES = frozenset({"55P03", "55006"})
# SQLite reports mistakes in the query as OperationalError too; these never heal by waiting.
_PERMANENT_SQLITE_MESSAGES = (
    "no such table",
    "no such column",
    "has no column named",
    "syntax error",
    "already exists",
    "unrecognized token",
    "no such function",
    "readonly database",
)
# undefined_table, undefined_column: a schema older than the code, or never migrated.
_MISSING_SCHEMA_SQLSTATES = frozenset({"42P01", "42703"})
_MISSING_SCHEMA_SQLITE_MESSAGES = ("no such table", "no such column", "has no column named")
_NEVER_TRANSIENT = (
    sa_exc.IntegrityError,
    sa_exc.DataError,
    sa_exc.ProgrammingError,
    sa_exc.NotSupportedError,
)


def sqlstate(error: BaseException) -> str | None:
    """The SQLSTATE code of a database error (psycopg 3 or psycopg2), if it has one."""
    orig = getattr(error, "orig", error)
    code = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    return code if isinstance(code, str) else None


def is_disconnect(error: BaseException) -> bool:
    """True when ``error`` means the connection itself is gone (SQLAlchemy invalidated it)."""
    if isinstance(error, sa_exc.DisconnectionError):
        return True
    return isinstance(error, sa_exc.DBAPIError) and error.connection_invalidated


def is_transient(error: BaseException) -> bool:
    """True for database errors that a new attempt can fix.

    Transient: a dropped or refused connection, ``OperationalError`` (except SQLite's reports
    of a bad query), PostgreSQL serialization failures, deadlocks and lock timeouts, SQLite's
    "database is locked", a pool timeout, and ``StaleDataError`` (a concurrent update of a
    versioned row: a new attempt re-reads it). Never ``IntegrityError``, ``DataError``,
    ``ProgrammingError``: the same statement would fail the same way.

    Example::

        try:
            db.commit()
        except SQLAlchemyError as exc:
            if not is_transient(exc):
                raise
    """
    if isinstance(error, StaleDataError | sa_exc.TimeoutError | sa_exc.DisconnectionError):
        return True
    if not isinstance(error, sa_exc.DBAPIError):
        return False
    if error.connection_invalidated:
        return True
    if isinstance(error, _NEVER_TRANSIENT):
        return False
    code = sqlstate(error)
    if code is not None:
        return code[:2] in _TRANSIENT_SQLSTATE_CLASSES or code in _TRANSIENT_SQLSTATES
    if isinstance(error, sa_exc.OperationalError):
        message = str(error.orig).lower()
        return not any(text in message for text in _PERMANENT_SQLITE_MESSAGES)
    return False


def is_missing_schema(error: BaseException) -> bool:
    """True when ``error`` is a table or column the database does not have (PostgreSQL's
    42P01/42703, SQLite's "no such table/column"): a schema behind the code, or a query's typo.

    Example::

        if is_missing_schema(exc) and schema_status().behind:
            print("run: taskkit db upgrade")
    """
    if not isinstance(error, sa_exc.DBAPIError):
        return False
    code = sqlstate(error)
    if code is not None:
        return code in _MISSING_SCHEMA_SQLSTATES
    message = str(error.orig).lower()
    return any(text in message for text in _MISSING_SCHEMA_SQLITE_MESSAGES)


def driver_message(error: BaseException) -> str:
    """The database's own message for ``error``, on one line, without SQLAlchemy's decoration."""
    orig: Any = getattr(error, "orig", None) or error
    text = str(orig).strip() or type(orig).__name__
    return " ".join(text.split())


def describe_database(url: URL) -> str:
    """``postgresql://host:port/name`` or ``sqlite:///path``: enough to find it, no credentials.

    Example::

        describe_database(make_url("postgresql+psycopg://app:s3cret@db:5432/app"))
        # 'postgresql://db:5432/app'
    """
    backend = url.get_backend_name()
    if backend == "sqlite":
        return f"sqlite:///{url.database or ':memory:'}"
    port = f":{url.port}" if url.port else ""
    return f"{backend}://{url.host or 'localhost'}{port}/{url.database or ''}"
