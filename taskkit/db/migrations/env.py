"""Alembic environment for taskkit's schema; ``taskkit.db.migrate`` passes the connection."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

from taskkit.config import get_settings
from taskkit.db.models import Base
from taskkit.db.session import get_engine

config = context.config


def run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        # SQLite cannot ALTER most things: Alembic's batch mode copies the table instead.
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        run(connection)
        return
    # Plain `alembic` command line use: the database of taskkit's settings.
    with get_engine().begin() as connection:
        run(connection)


if context.is_offline_mode():
    context.configure(
        url=get_settings().database_url, target_metadata=Base.metadata, literal_binds=True
    )
    with context.begin_transaction():
        context.run_migrations()
else:
    run_online()
