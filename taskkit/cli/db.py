"""``taskkit db``: the database's schema migrations.

::

    taskkit db upgrade [--url URL] [--revision REV]   migrate the database (default: to head)
    taskkit db current [--url URL] [--json]           show the database's revision

Example::

    $ taskkit db upgrade
    database sqlite:////home/me/project/.taskkit/taskkit.db is at revision 0003 (head)
"""

from __future__ import annotations

from typing import Annotated

import typer

from taskkit.cli._common import (
    Group,
    UrlOption,
    database,
    echo_json,
    fail,
    missing_file,
    out,
    short,
)

__all__ = ["db_app"]

db_app = typer.Typer(
    cls=Group, help="The taskkit database: schema migrations.", no_args_is_help=True
)


@db_app.command("upgrade")
def _upgrade_command(
    url: UrlOption = None,
    revision: Annotated[str, typer.Option(help="Target revision.")] = "head",
) -> None:
    """Bring the database to the latest schema (or to --revision)."""
    from sqlalchemy.exc import SQLAlchemyError  # noqa: PLC0415 - heavy; only for this command

    from taskkit.db.migrate import head_revision, schema_status, upgrade  # noqa: PLC0415
    from taskkit.errors import DatabaseUnavailable  # noqa: PLC0415

    db = database(url, must_exist=False)
    try:
        status = None if missing_file(db) else schema_status(db.url)
        # A newer taskkit's revision: alembic would only say it cannot find it.
        ahead = status.problem() if status is not None and status.ahead else None
        reached = upgrade(db.url, revision) if ahead is None else None
    except (DatabaseUnavailable, SQLAlchemyError) as exc:
        raise fail(f"could not upgrade {db.name}: {short(exc)}", 1) from None
    except Exception as exc:  # alembic's CommandError: an unknown revision
        raise fail(f"could not upgrade {db.name}: {exc}", 2) from None
    if ahead is not None:
        raise fail(ahead, 2)
    head = " (head)" if reached == head_revision() else ""
    out.print(f"database {db.name} is at revision [bold]{reached}[/]{head}", highlight=False)


@db_app.command("current")
def _current_command(
    url: UrlOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON (for scripts).")] = False,
) -> None:
    """Show the database's schema revision (JSON: database, revision, head, state: head,
    behind, ahead or unmigrated)."""
    from sqlalchemy.exc import SQLAlchemyError  # noqa: PLC0415 - heavy; only for this command

    from taskkit.db.migrate import head_revision, schema_status  # noqa: PLC0415

    db = database(url, must_exist=False)
    try:
        status = None if missing_file(db) else schema_status(db.url)
    except SQLAlchemyError as exc:
        raise fail(f"could not read {db.name}: {short(exc)}", 1) from None
    except ImportError as exc:  # the URL's driver is not installed
        raise fail(f"could not read {db.name}: {short(exc)}", 2) from None
    head = head_revision()
    revision = None if status is None else status.revision
    if as_json:
        if status is not None and status.ahead:
            state = "ahead"
        elif revision is None:
            state = "unmigrated"
        else:
            state = "head" if revision == head else "behind"
        echo_json({"database": db.name, "revision": revision, "head": head, "state": state})
        return
    if status is not None and status.ahead:
        out.print(
            f"database {db.name} is at revision [bold]{revision}[/], which this taskkit "
            f"(head {head}) does not know: a newer taskkit migrated it",
            highlight=False,
        )
    elif revision is None:
        out.print(f"database {db.name} has no taskkit schema; run: taskkit db upgrade")
    elif revision == head:
        out.print(f"database {db.name} is at revision [bold]{revision}[/] (head)", highlight=False)
    else:
        out.print(
            f"database {db.name} is at revision [bold]{revision}[/]; head is {head}: "
            "run taskkit db upgrade",
            highlight=False,
        )
