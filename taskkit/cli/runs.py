"""``taskkit runs``: training runs from the database (``model_runs``, ``training_progress``).

::

    taskkit runs list [--status S] [--limit N]          the newest runs, newest first
    taskkit runs show RUN_ID [--watch] [--interval S]   one run: status, epoch, metrics, progress

A running run whose trainer has not renewed its lease for the lease ttl is ``running (stale)``
(see ``taskkit.cli._runview``).

Example::

    $ taskkit runs show 7 --watch
"""

from __future__ import annotations

from typing import Annotated

import typer
from rich.markup import escape

from taskkit.cli._common import Group, UrlOption, database, out
from taskkit.cli._runview import (
    follow,
    list_runs,
    read_run,
    run_panel,
    run_reported,
    runs_table,
    stale_notes,
)

__all__ = ["runs_app"]

runs_app = typer.Typer(
    cls=Group, help="Training runs: list them, show or follow one.", no_args_is_help=True
)


@runs_app.command("list")
def _list_command(
    status: Annotated[
        str | None,
        typer.Option(
            help="Only runs with this status (queued, running, completed, ...).", show_default=False
        ),
    ] = None,
    limit: Annotated[int, typer.Option(min=1, help="At most this many runs.")] = 20,
    url: UrlOption = None,
) -> None:
    """The newest training runs, newest first; a run whose worker stopped beating is
    ``running (stale)``, with its last heartbeat under the table."""
    db = database(url)
    with run_reported(db):
        views = list_runs(db.url, status=status, limit=limit)
    if not views:
        which = f" with status {status!r}" if status else ""
        out.print(escape(f"no runs{which} in {db.name}"), highlight=False)
        return
    out.print(runs_table(views))
    for note in stale_notes(views):
        out.print(escape(note), style="yellow", highlight=False)


@runs_app.command("show")
def _show_command(
    run_id: Annotated[int, typer.Argument(help="The run's id (see: taskkit runs list).")],
    watch_run: Annotated[
        bool, typer.Option("--watch", help="Follow the run live until it ends.")
    ] = False,
    interval: Annotated[
        float, typer.Option(min=0.05, help="Seconds between two reads with --watch.")
    ] = 1.0,
    url: UrlOption = None,
) -> None:
    """One run: status, task, times, last heartbeat (``stale`` once the lease expired), error,
    epoch, metrics and a progress bar."""
    db = database(url)
    with run_reported(db):
        if watch_run:
            follow(run_id, db, interval)
        else:
            out.print(run_panel(read_run(run_id, db.url)))
