"""Schema migrations: bring any taskkit database to the schema of this version.

The Alembic scripts ship inside the package (``taskkit/db/migrations``); no ``alembic.ini`` is
needed. ``taskkit db upgrade`` calls ``upgrade()``.

Decisions: on PostgreSQL the upgrade holds an advisory lock, so several workers starting at
once do not run the same migration twice; each upgrade runs in one transaction (both
PostgreSQL and SQLite have transactional DDL), so a failed migration leaves the schema as it
was.

Example::

    from taskkit.db.migrate import upgrade

    upgrade()                                   # TASKKIT_DATABASE_URL, to the latest revision
    upgrade("postgresql+psycopg://app@db/app")  # another database
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine
from sqlalchemy.engine import URL

from taskkit.db.session import get_engine

__all__ = ["current_revision", "head_revision", "upgrade"]

#: Where the migration scripts live.
_MIGRATIONS = Path(__file__).with_name("migrations")

# An arbitrary, fixed key for pg_advisory_xact_lock: "taskkit" in ASCII.
_LOCK_KEY = 0x7461736B6B6974


def _alembic_config(connection: Connection | None = None) -> Config:
    """An Alembic ``Config`` for taskkit's migrations, optionally bound to ``connection``."""
    config = Config()
    config.set_main_option("script_location", str(_MIGRATIONS))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def _engine(target: Engine | str | URL | None) -> Engine:
    if isinstance(target, Engine):
        return target
    return get_engine(target)


def upgrade(target: Engine | str | URL | None = None, revision: str = "head") -> str | None:
    """Migrate the database to ``revision`` (default: the latest); return the new revision.

    ``target`` is an engine or a URL (default: ``TASKKIT_DATABASE_URL``).

    Example::

        upgrade()  # what `taskkit db upgrade` does
    """
    engine = _engine(target)
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_LOCK_KEY})")
        command.upgrade(_alembic_config(connection), revision)
        return MigrationContext.configure(connection).get_current_revision()


def current_revision(target: Engine | str | URL | None = None) -> str | None:
    """The revision the database is at, or None for a database taskkit has never migrated.

    Example::

        if current_revision() != head_revision():
            upgrade()
    """
    with _engine(target).connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def head_revision() -> str:
    """The latest revision this version of taskkit ships."""
    head = ScriptDirectory.from_config(_alembic_config()).get_current_head()
    assert head is not None, "taskkit ships at least one migration"
    return head
