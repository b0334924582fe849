"""The ``taskkit`` command.

::

    taskkit db upgrade [--url URL] [--revision REV]   migrate the database (default: to head)
    taskkit db current [--url URL]                    show the database's revision

The database is ``TASKKIT_DATABASE_URL`` unless ``--url`` is given. Exit codes: 0 success,
1 the database could not be reached or a migration failed, 2 bad settings or arguments.

Example::

    $ TASKKIT_DATABASE_URL=postgresql+psycopg://app@db:5432/app taskkit db upgrade
    database postgresql://db:5432/app is at revision 0001 (head)
"""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from taskkit.config import get_settings
from taskkit.db import describe_database
from taskkit.db._classify import driver_message
from taskkit.db.migrate import current_revision, head_revision, upgrade
from taskkit.errors import ConfigurationError, DatabaseUnavailable

__all__ = ["app", "main"]

app = typer.Typer(
    name="taskkit",
    help="taskkit: Celery tasks that survive failures.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
db_app = typer.Typer(help="The taskkit database: schema migrations.", no_args_is_help=True)
app.add_typer(db_app, name="db")

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

UrlOption = Annotated[
    str | None,
    typer.Option("--url", help="Database URL (default: TASKKIT_DATABASE_URL).", show_default=False),
]


def _fail(message: str, code: int) -> typer.Exit:
    err.print(f"[bold red]error:[/] {message}", highlight=False)
    return typer.Exit(code)


def _database(url: str | None) -> tuple[str, str]:
    """The URL to use and its description without credentials."""
    try:
        resolved = url or get_settings().database_url
        return resolved, describe_database(make_url(resolved))
    except ConfigurationError as exc:
        raise _fail(str(exc), 2) from None
    except ArgumentError:
        raise _fail("--url is not a database URL (dialect+driver://host/name)", 2) from None


@db_app.command("upgrade")
def _upgrade_command(
    url: UrlOption = None,
    revision: Annotated[str, typer.Option(help="Target revision.")] = "head",
) -> None:
    """Bring the database to the latest schema (or to --revision)."""
    resolved, name = _database(url)
    try:
        reached = upgrade(resolved, revision)
    except (DatabaseUnavailable, SQLAlchemyError) as exc:
        raise _fail(f"could not upgrade {name}: {_short(exc)}", 1) from None
    except Exception as exc:  # alembic's CommandError: an unknown revision
        raise _fail(f"could not upgrade {name}: {exc}", 2) from None
    head = " (head)" if reached == head_revision() else ""
    out.print(f"database {name} is at revision [bold]{reached}[/]{head}", highlight=False)


@db_app.command("current")
def _current_command(url: UrlOption = None) -> None:
    """Show the database's schema revision."""
    resolved, name = _database(url)
    try:
        revision = current_revision(resolved)
    except SQLAlchemyError as exc:
        raise _fail(f"could not read {name}: {_short(exc)}", 1) from None
    head = head_revision()
    if revision is None:
        out.print(f"database {name} has no taskkit schema; run: taskkit db upgrade")
    elif revision == head:
        out.print(f"database {name} is at revision [bold]{revision}[/] (head)", highlight=False)
    else:
        out.print(
            f"database {name} is at revision [bold]{revision}[/]; head is {head}: "
            "run taskkit db upgrade",
            highlight=False,
        )


def _short(exc: BaseException) -> str:
    return driver_message(exc)


def main() -> None:
    """Entry point of the ``taskkit`` console script."""
    app()
