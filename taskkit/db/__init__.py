"""The data layer: sessions, migrations, and recovery helpers for database code.

``db_retry`` (transient errors only, session rolled back), ``ensure_connection``,
``atomic_update``, ``safe_bulk_insert``, ``with_savepoint``, ``is_transient``; engines and
sessions from ``taskkit.config`` (``get_engine``, ``get_db``, ``session_scope``); ``upgrade``
to this version's schema. The models are in ``taskkit.db.models``. Behaviour and decisions:
``docs/db.md``.

Example::

    from sqlalchemy.orm import Session
    from taskkit.db import db_retry, ensure_connection
    from taskkit.db.models import ModelRun
    from taskkit.recovery import TransactionManager

    @ensure_connection
    @db_retry(max_attempts=3, delay=0.5)
    def start(db: Session, name: str) -> int:
        with TransactionManager(db):
            run = ModelRun(name=name, model_type="sgd", config={}, status="queued")
            db.add(run)
            db.flush()
            return run.id
"""

from taskkit.db._atomic import atomic_update
from taskkit.db._bulk import BulkInsertResult, safe_bulk_insert
from taskkit.db._retry import db_retry, ensure_connection, with_savepoint
from taskkit.db.classify import is_transient
from taskkit.db.migrate import upgrade
from taskkit.db.session import get_db, get_engine, get_sessionmaker, session_scope

__all__ = [
    "BulkInsertResult",
    "atomic_update",
    "db_retry",
    "ensure_connection",
    "get_db",
    "get_engine",
    "get_sessionmaker",
    "is_transient",
    "safe_bulk_insert",
    "session_scope",
    "upgrade",
    "with_savepoint",
]
