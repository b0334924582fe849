"""``taskkit runs``: training runs from the database (``model_runs``, ``training_progress``).

::

    taskkit runs list [--status S] [--limit N] [--json] the newest runs, newest first
    taskkit runs show RUN_ID [--watch] [--interval S] [--json]
                                                        one run: status, epoch, metrics, progress
    taskkit runs stop RUN_ID                            checkpoint at the next epoch end, stop
    taskkit runs fork RUN_ID [--from-step N] [--set KEY=VALUE]... [--name NAME] [--app APP]
                                                        a new run from a checkpoint of this one

A running run whose trainer has not renewed its lease for the lease ttl is ``running (stale)``
(see ``taskkit.cli._runview``).

Example::

    $ taskkit runs show 7 --watch
"""

from __future__ import annotations

import re
from typing import Annotated, Any

import typer
from rich.markup import escape

from taskkit._utils import mask_password
from taskkit.cli._common import (
    DEFAULT_APP,
    AppOption,
    CliError,
    Group,
    UrlOption,
    database,
    echo_json,
    out,
)
from taskkit.cli._launch import check_services, load_app
from taskkit.cli._runview import (
    check_run_id,
    follow,
    list_runs,
    read_run,
    run_panel,
    run_record,
    run_reported,
    runs_table,
    stale_notes,
)
from taskkit.errors import RunNotResumable, RunNotStoppable

__all__ = ["runs_app"]

JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON (for scripts).")]

runs_app = typer.Typer(
    cls=Group,
    help="Training runs: list them, show or follow one, stop one, fork one.",
    no_args_is_help=True,
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
    as_json: JsonOption = False,
    url: UrlOption = None,
) -> None:
    """The newest training runs, newest first; a run whose worker stopped beating is
    ``running (stale)``, with its last heartbeat under the table (JSON: {"runs": [...]})."""
    db = database(url)
    with run_reported(db):
        views = list_runs(db.url, status=status, limit=limit)
    if as_json:
        echo_json({"runs": [run_record(view) for view in views]})
        return
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
    as_json: JsonOption = False,
    url: UrlOption = None,
) -> None:
    """One run: status, task, times, last heartbeat (``stale`` once the lease expired), error,
    epoch, metrics and a progress bar (``--json``: the run once; with ``--watch``, when it
    ends)."""
    db = database(url)
    with run_reported(db):
        if watch_run:
            follow(run_id, db, interval, as_json=as_json)
        elif as_json:
            echo_json(run_record(read_run(run_id, db.url)))
        else:
            out.print(run_panel(read_run(run_id, db.url)))


@runs_app.command("stop")
def _stop_command(
    run_id: Annotated[int, typer.Argument(help="The run's id (see: taskkit runs list).")],
    url: UrlOption = None,
) -> None:
    """Ask a run to stop: a queued one stops at once, a running one checkpoints the epoch it is
    training and stops (exit 4 when it has ended already). ``taskkit resume`` continues it."""
    from taskkit.tasks import stop_run  # noqa: PLC0415 - celery and the tasks: only here

    db = database(url)
    with run_reported(db):
        check_run_id(run_id)
        try:
            status = stop_run(run_id, database_url=db.url)
        except RunNotStoppable as exc:
            raise CliError(str(exc), 4) from None
    if status == "stopped":
        out.print(f"run [bold]{run_id}[/] stopped", highlight=False)
    else:
        out.print(
            f"run [bold]{run_id}[/] stops after the epoch it is training (checkpointed)",
            highlight=False,
        )
    out.print(f"continue it later with: taskkit resume {run_id}", highlight=False)


def _parse_setting(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` with the value read as a YAML scalar (``0.001``, ``true``, ``null``,
    ``[1, 2]``; anything else is a string).

    Example::

        _parse_setting("alpha=1e-5")     # ('alpha', 1e-05)
    """
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise CliError(f"--set {text!r}: expected KEY=VALUE (e.g. --set alpha=0.0001)", 2)
    import yaml  # noqa: PLC0415 - `taskkit --help` starts without it

    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if not isinstance(value, str | int | float | bool | list | dict | None):
        value = raw.strip()  # a YAML date or timestamp: keep the text (configs are JSON)
    if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        value = float(value)  # YAML 1.1 reads 1e-5 as a string; whoever typed it meant a number
    return key, value


_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


@runs_app.command("fork")
def _fork_command(
    run_id: Annotated[int, typer.Argument(help="The run to fork (see: taskkit runs list).")],
    from_step: Annotated[
        int | None,
        typer.Option(
            "--from-step",
            min=0,
            help="Its checkpoint step to start from (default: the newest).",
            show_default=False,
        ),
    ] = None,
    settings: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="KEY=VALUE overriding the parent's config (repeatable; YAML values).",
            show_default=False,
        ),
    ] = None,
    name: Annotated[
        str | None,
        typer.Option(help="The fork's name (default: the parent's).", show_default=False),
    ] = None,
    app_spec: AppOption = DEFAULT_APP,
    url: UrlOption = None,
) -> None:
    """A new run that starts from a checkpoint of this one (its first epoch is the one after
    the step) with config overrides, e.g. a lower learning rate; the parent is not changed."""
    db = database(url)
    with run_reported(db):
        overrides = dict(_parse_setting(item) for item in settings or ())
        check_run_id(run_id)
        celery_app = load_app(app_spec)
        check_services(celery_app)
    from taskkit.tasks import fork_run  # noqa: PLC0415 - celery and the tasks: only here

    with run_reported(db, mask_password(str(celery_app.conf.broker_url))):
        try:
            fork_id, task_id = fork_run(
                celery_app,
                run_id,
                from_step=from_step,
                config=overrides,
                name=name,
                database_url=db.url,
            )
        except RunNotResumable as exc:
            raise CliError(str(exc), 6 if exc.kind == "no_checkpoint" else 2) from None
    out.print(f"forked run {run_id} as run [bold]{fork_id}[/] (task {task_id})", highlight=False)
    out.print(f"follow it with: taskkit runs show {fork_id} --watch", highlight=False)
