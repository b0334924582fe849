"""Engines and sessions: ``get_engine``, ``get_db``, ``session_scope``.

One engine per database URL per process, built from ``taskkit.config.Settings``:

- PostgreSQL (``postgresql+psycopg://``): a connection pool with pre-ping (a connection that
  died while idle is replaced before use), ``pool_recycle``, and a connect timeout.
- SQLite (the embedded default): WAL journal (readers do not block the writer), a busy
  timeout (a writer waits for the lock instead of failing at once), foreign keys enforced, and
  transactions begun by SQLAlchemy rather than by the ``sqlite3`` module, so that savepoints
  (``with_savepoint``, ``safe_bulk_insert``) really nest.

Write sessions on SQLite: ``session_scope()`` is a write session, and on SQLite its
transaction begins with ``BEGIN IMMEDIATE``, taking the database's one write lock when it
begins. With a deferred ``BEGIN`` a transaction that reads and then writes fails at once with
"database is locked" (no busy wait helps) whenever another writer committed in between; with
``BEGIN IMMEDIATE`` it waits its turn (up to ``TASKKIT_SQLITE_BUSY_TIMEOUT``) and then sees the
latest data. Decisions:

- ``session_scope(readonly=True)`` is for pure readers (list views, polling): a deferred
  ``BEGIN``, so in WAL it neither waits for nor blocks a writer; an ORM write in it raises
  ``ConfigurationError``.
- A ``session_scope()`` opened while the same thread holds the write lock of the same SQLite
  database (an outer write ``session_scope()``, or any transaction begun ``BEGIN IMMEDIATE``)
  begins deferred: the outer one holds the lock, so asking for it again could only wait for
  itself. (Such an inner session may read; a write in it would wait for the outer one and
  fail.)
- ``get_db()``, ``get_sessionmaker()`` and connections from ``get_engine()`` begin deferred, as
  SQLAlchemy's do (FastAPI readers, the seed's style). Ask for the lock on any of them with
  ``.execution_options(taskkit_sqlite_begin="BEGIN IMMEDIATE")`` on the engine.
- PostgreSQL is unaffected: its row locks and MVCC need none of this.

Decision: sessions are made with ``expire_on_commit=False``, so a record returned from a
function that committed (the seed's ``create_model_run``) can still be read after its session
closes. Call ``db.refresh(obj)`` when you need the database's latest values.

Example::

    from taskkit.db.session import get_db, session_scope

    with session_scope() as db:            # commits, or rolls back on error; always closes
        db.add(ModelRun(name="a", model_type="sgd", config={}))

    db = next(get_db())                   # the seed's style; close it yourself
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.orm import Session, sessionmaker

from taskkit._utils import sqlite_wal
from taskkit.config import Settings, get_settings
from taskkit.errors import ConfigurationError

__all__ = [
    "create_engine_for",
    "dispose_engines",
    "get_db",
    "get_engine",
    "get_sessionmaker",
    "session_scope",
]

_lock = threading.Lock()
_engines: dict[str, Engine] = {}
_makers: dict[str, sessionmaker[Session]] = {}
_writers: dict[str, Engine] = {}

# How a write session's transaction begins on SQLite (see the module docs).
_WRITE_BEGIN = "BEGIN IMMEDIATE"
# Marks a pooled SQLite connection whose open transaction holds the write lock.
_LOCK_INFO = "taskkit_write_lock"

# Per thread: the SQLite databases on which it holds the write lock (a transaction begun with
# BEGIN IMMEDIATE, by session_scope or by anyone else), and how many such transactions.
_write_locks = threading.local()
# Guards those counts: a transaction may end in another thread than the one that began it.
_counts_lock = threading.Lock()


def _held() -> dict[str, int]:
    held: dict[str, int] = _write_locks.__dict__.setdefault("held", {})
    return held


def create_engine_for(
    url: str | URL, settings: Settings | None = None, **engine_options: Any
) -> Engine:
    """A new engine for ``url`` with taskkit's reliability settings (see the module docs).

    ``engine_options`` are passed to ``sqlalchemy.create_engine`` and win over taskkit's.

    Example::

        engine = create_engine_for("postgresql+psycopg://app@127.0.0.1:5432/app")
    """
    settings = settings or get_settings()
    url = make_url(url)
    if url.get_backend_name() == "sqlite":
        return _sqlite_engine(url, settings, engine_options)
    options: dict[str, Any] = {
        "pool_pre_ping": True,
        "pool_size": settings.db_pool_size,
        "max_overflow": settings.db_max_overflow,
        "pool_recycle": settings.db_pool_recycle,
    }
    if url.get_backend_name() == "postgresql":
        # libpq counts whole seconds and treats anything under 2 as 2.
        options["connect_args"] = {"connect_timeout": max(2, round(settings.db_connect_timeout))}
    options.update(engine_options)
    return create_engine(url, **options)


def _sqlite_engine(url: URL, settings: Settings, engine_options: dict[str, Any]) -> Engine:
    database = url.database or ""
    in_memory = database in ("", ":memory:") or database.startswith("file::memory:")
    if not in_memory:
        Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    options: dict[str, Any] = {
        "connect_args": {"timeout": settings.sqlite_busy_timeout, "check_same_thread": False},
    }
    options.update(engine_options)
    engine = create_engine(url, **options)
    busy_ms = int(settings.sqlite_busy_timeout * 1000)

    @event.listens_for(engine, "connect")
    def _configure(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy emit BEGIN (below): pysqlite's own transaction handling would
        # commit before SAVEPOINT and break nested transactions.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            if not in_memory:
                sqlite_wal(cursor, settings.sqlite_busy_timeout)
                cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute(f"PRAGMA busy_timeout={busy_ms}")
            cursor.execute("PRAGMA foreign_keys=ON")
        finally:
            cursor.close()

    name = str(url)

    @event.listens_for(engine, "begin")
    def _begin(connection: Any) -> None:
        # A write session asks for the write lock up front (``taskkit_sqlite_begin``, see the
        # module docs): a deferred transaction that read first fails at once with "database is
        # locked" if another writer committed in between.
        statement = connection.get_execution_options().get("taskkit_sqlite_begin", "BEGIN")
        connection.exec_driver_sql(statement)
        if statement != "BEGIN":
            held = _held()
            with _counts_lock:
                held[name] = held.get(name, 0) + 1
            # The count to clear is the beginning thread's: the transaction may end in another
            # (FastAPI exits a sync dependency in another thread-pool thread than it entered).
            connection.info[_LOCK_INFO] = (name, held)

    @event.listens_for(engine, "commit")
    @event.listens_for(engine, "rollback")
    def _end(connection: Any) -> None:
        locked = connection.info.pop(_LOCK_INFO, None)
        if locked is not None:
            locked_name, held = locked
            with _counts_lock:
                held[locked_name] = held.get(locked_name, 1) - 1
                if held[locked_name] <= 0:
                    del held[locked_name]

    return engine


def _key(url: str | URL | None) -> str:
    if url is None:
        return get_settings().database_url
    return url.render_as_string(hide_password=False) if isinstance(url, URL) else url


def get_engine(url: str | URL | None = None) -> Engine:
    """The process's engine for ``url`` (default: ``TASKKIT_DATABASE_URL``), made on first use.

    Example::

        with get_engine().connect() as conn:
            conn.exec_driver_sql("SELECT 1")
    """
    key = _key(url)
    engine = _engines.get(key)
    if engine is None:
        with _lock:
            engine = _engines.get(key)
            if engine is None:
                engine = _engines[key] = create_engine_for(key)
    return engine


def get_sessionmaker(url: str | URL | None = None) -> sessionmaker[Session]:
    """The session factory bound to ``get_engine(url)``.

    Example::

        SessionLocal = get_sessionmaker()
        with SessionLocal() as db, db.begin():
            ...
    """
    key = _key(url)
    maker = _makers.get(key)
    if maker is None:
        engine = get_engine(key)
        with _lock:
            maker = _makers.setdefault(key, sessionmaker(bind=engine, expire_on_commit=False))
    return maker


def get_db() -> Iterator[Session]:
    """Yield a session and close it afterwards: a FastAPI dependency, or ``next(get_db())``.

    Closing rolls back whatever was not committed. With ``next(get_db())`` (the seed's style)
    close the session yourself, in a ``finally``.

    Example::

        @app.get("/models/{model_id}")
        def get_model(model_id: int, db: Session = Depends(get_db)): ...
    """
    db = get_sessionmaker()()
    try:
        yield db
    finally:
        db.close()


@contextmanager
def session_scope(url: str | URL | None = None, *, readonly: bool = False) -> Iterator[Session]:
    """A session that commits when the block succeeds, rolls back when it raises, and closes.

    A write session by default: on SQLite its transaction begins with ``BEGIN IMMEDIATE``, so a
    read-then-write block waits for the write lock instead of failing with "database is
    locked". ``readonly=True`` for a block that only reads: it begins deferred, so on SQLite
    it never waits for a writer nor makes one wait; adding, changing or deleting an ORM object
    in it raises ``ConfigurationError`` (see the module docs for the rules).

    Example::

        with session_scope() as db:
            db.add(Dataset(name="iris"))

        with session_scope(readonly=True) as db:
            names = db.scalars(select(Dataset.name)).all()
    """
    key = _key(url)
    maker = get_sessionmaker(key)
    engine = get_engine(key)
    locks = not readonly and engine.dialect.name == "sqlite" and str(engine.url) not in _held()
    db = maker(bind=_writer(key, engine)) if locks else maker()
    if readonly:
        db.info[_READONLY] = True
    try:
        yield db
        db.commit()
    except BaseException as exc:
        db.rollback()
        if isinstance(exc, Exception):
            _explain_schema(exc, engine)
        raise
    finally:
        db.close()


def _writer(key: str, engine: Engine) -> Engine:
    """``engine``, beginning its transactions with ``BEGIN IMMEDIATE`` (same pool)."""
    writer = _writers.get(key)
    if writer is None:
        with _lock:
            writer = _writers.setdefault(
                key, engine.execution_options(taskkit_sqlite_begin=_WRITE_BEGIN)
            )
    return writer


_READONLY = "taskkit_readonly"


@event.listens_for(Session, "before_flush")
def _refuse_writes(session: Session, _context: Any, _instances: Any) -> None:
    if session.info.get(_READONLY) and (session.new or session.dirty or session.deleted):
        raise ConfigurationError(
            "session_scope(readonly=True) cannot write: use session_scope() for a block that "
            "adds, changes or deletes rows"
        )


def _explain_schema(error: Exception, engine: Engine) -> None:
    """Raise a one-line ``ConfigurationError`` instead of ``error`` when it is a missing table or
    column of a database not at this taskkit's schema revision (never migrated, or older)."""
    from taskkit.db.classify import is_missing_schema  # noqa: PLC0415 - only on errors

    if not is_missing_schema(error):
        return
    from taskkit.db.migrate import schema_status  # noqa: PLC0415 - it imports this module

    try:
        problem = schema_status(engine).problem()
    except Exception:  # the original error says more than a failed second look
        return
    if problem is not None:
        raise ConfigurationError(problem) from error


def dispose_engines() -> None:
    """Close every pooled connection and forget the engines (after a fork, or in tests).

    Example::

        dispose_engines()  # the next get_engine() reads TASKKIT_DATABASE_URL again
    """
    with _lock:
        engines = list(_engines.values())
        _engines.clear()
        _makers.clear()
        _writers.clear()
    for engine in engines:
        engine.dispose()


def _after_fork_in_child() -> None:
    # A forked child (a Celery prefork pool process) must not use the parent's sockets:
    # drop the inherited pooled connections without closing them under the parent's feet.
    for engine in list(_engines.values()):
        engine.dispose(close=False)


os.register_at_fork(after_in_child=_after_fork_in_child)
