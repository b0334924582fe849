"""Schema migrations: bring any taskkit database to the schema of this version.

The Alembic scripts ship inside the package (``taskkit/db/migrations``); no ``alembic.ini`` is
needed. ``taskkit db upgrade`` calls ``upgrade()``.

Decisions: the upgrade holds the migration lock, so several workers starting at once do not
run the same migration twice: on PostgreSQL an advisory lock, on SQLite the database's write
lock (``BEGIN IMMEDIATE``), taken before the revision is read; the second one waits, then
finds the schema at head and does nothing. Each upgrade runs in one transaction (both
PostgreSQL and SQLite have transactional DDL), so a failed migration leaves the schema as it
was.

``schema_status`` says where a database stands against this taskkit (no tables, an older
revision, head, or a revision this taskkit does not know: a newer taskkit migrated it), and
``SchemaStatus.problem`` the one line to show for it: workers refuse to start on it (the
embedded SQLite default is upgraded instead, ``taskkit.tasks``) and every command prints it.

Example::

    from taskkit.db.migrate import upgrade

    upgrade()                                   # TASKKIT_DATABASE_URL, to the latest revision
    upgrade("postgresql+psycopg://app@db/app")  # another database
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine
from sqlalchemy.engine import URL

from taskkit.db.classify import describe_database
from taskkit.db.session import get_engine

__all__ = [
    "SchemaStatus",
    "current_revision",
    "head_revision",
    "schema_status",
    "upgrade",
    "upgrade_from",
]

#: What fixes a database behind this taskkit.
UPGRADE_HINT = "run: taskkit db upgrade"

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
    return upgrade_from(target, revision)[1]


def upgrade_from(
    target: Engine | str | URL | None = None, revision: str = "head"
) -> tuple[str | None, str | None]:
    """``upgrade``, returning the revisions before and after, both read under the migration
    lock: equal when another process migrated the database first (so a caller reports an
    upgrade only when it made one).

    Example::

        before, after = upgrade_from("sqlite:///taskkit.db")
        if before != after:
            print(f"upgraded from {before} to {after}")
    """
    engine = _engine(target)
    if engine.dialect.name == "sqlite":
        # The write lock first (with taskkit's engines): a second upgrader waits here, then
        # reads the new revision, instead of failing with "database is locked" at its first DDL.
        engine = engine.execution_options(taskkit_sqlite_begin="BEGIN IMMEDIATE")
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_LOCK_KEY})")
        before = MigrationContext.configure(connection).get_current_revision()
        command.upgrade(_alembic_config(connection), revision)
        return before, MigrationContext.configure(connection).get_current_revision()


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


def _known_revisions() -> frozenset[str]:
    scripts = ScriptDirectory.from_config(_alembic_config())
    return frozenset(script.revision for script in scripts.walk_revisions())


@dataclass(frozen=True)
class SchemaStatus:
    """Where a database's schema stands against this version of taskkit.

    Example::

        status = schema_status("postgresql+psycopg://app@db/app")
        if status.problem():
            print(status.problem())   # the database postgresql://db/app has no taskkit tables; ...
    """

    #: The database, named without credentials (``describe_database``).
    database: str
    #: Its revision; None when taskkit never migrated it.
    revision: str | None
    #: The latest revision this taskkit ships.
    head: str
    #: The revision is one of this taskkit's migrations (False: a newer taskkit's).
    known: bool

    @property
    def current(self) -> bool:
        """At this taskkit's head revision."""
        return self.revision == self.head

    @property
    def behind(self) -> bool:
        """Never migrated, or at an older revision of this taskkit: an upgrade fixes it."""
        return self.revision is None or (self.known and not self.current)

    @property
    def ahead(self) -> bool:
        """At a revision this taskkit does not know: a newer taskkit migrated it."""
        return self.revision is not None and not self.known

    def problem(self, fix: str = UPGRADE_HINT) -> str | None:
        """None at head; else one line naming the database, where it stands and the fix
        (``fix`` for a database behind this taskkit).

        Example::

            schema_status().problem()
            # 'the database sqlite:////srv/.taskkit/taskkit.db has no taskkit tables; run: ...'
        """
        if self.current:
            return None
        where = f"the database {self.database}"
        if self.revision is None:
            return f"{where} has no taskkit tables; {fix}"
        if self.known:
            return (
                f"{where} is at revision {self.revision}, older than this taskkit "
                f"(head {self.head}); {fix}"
            )
        return (
            f"{where} is at revision {self.revision}, which this taskkit (head {self.head}) "
            "does not know: a newer taskkit migrated it; upgrade taskkit, or use a database "
            "of this version"
        )


def schema_status(target: Engine | str | URL | None = None) -> SchemaStatus:
    """Read the database's revision and compare it with this taskkit's migrations.

    ``target`` is an engine or a URL (default: ``TASKKIT_DATABASE_URL``). Database errors (it
    does not answer) propagate.

    Example::

        if schema_status().behind:
            upgrade()
    """
    engine = _engine(target)
    revision = current_revision(engine)
    return SchemaStatus(
        database=describe_database(engine.url),
        revision=revision,
        head=head_revision(),
        known=revision is None or revision in _known_revisions(),
    )
