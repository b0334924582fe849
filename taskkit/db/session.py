"""Engines and sessions: ``get_engine``, ``get_db``, ``session_scope``.

One engine per database URL per process, built from ``taskkit.config.Settings``:

- PostgreSQL (``postgresql+psycopg://``): a connection pool with pre-ping (a connection that
  died while idle is replaced before use), ``pool_recycle``, and a connect timeout.
- SQLite (the embedded default): WAL journal (readers do not block the writer), a busy
  timeout (a writer waits for the lock instead of failing at once), foreign keys enforced, and
  transactions begun by SQLAlchemy rather than by the ``sqlite3`` module, so that savepoints
  (``with_savepoint``, ``safe_bulk_insert``) really nest.

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

from taskkit.config import Settings, get_settings

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
                cursor.execute("PRAGMA journal_mode=WAL")
                cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute(f"PRAGMA busy_timeout={busy_ms}")
            cursor.execute("PRAGMA foreign_keys=ON")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(connection: Any) -> None:
        # A transaction that reads and then must write asks for the write lock up front
        # (``execution_options(taskkit_sqlite_begin="BEGIN IMMEDIATE")``): a deferred one that
        # read first fails at once with "database is locked" if another writer got in between.
        connection.exec_driver_sql(
            connection.get_execution_options().get("taskkit_sqlite_begin", "BEGIN")
        )

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
def session_scope(url: str | URL | None = None) -> Iterator[Session]:
    """A session that commits when the block succeeds, rolls back when it raises, and closes.

    Example::

        with session_scope() as db:
            db.add(Dataset(name="iris"))
    """
    db = get_sessionmaker(url)()
    try:
        yield db
        db.commit()
    except BaseException:
        db.rollback()
        raise
    finally:
        db.close()


def dispose_engines() -> None:
    """Close every pooled connection and forget the engines (after a fork, or in tests).

    Example::

        dispose_engines()  # the next get_engine() reads TASKKIT_DATABASE_URL again
    """
    with _lock:
        engines = list(_engines.values())
        _engines.clear()
        _makers.clear()
    for engine in engines:
        engine.dispose()


def _after_fork_in_child() -> None:
    # A forked child (a Celery prefork pool process) must not use the parent's sockets:
    # drop the inherited pooled connections without closing them under the parent's feet.
    for engine in list(_engines.values()):
        engine.dispose(close=False)


os.register_at_fork(after_in_child=_after_fork_in_child)
