"""The ``taskkit`` command.

::

    taskkit db upgrade [--url URL] [--revision REV]   migrate the database (default: to head)
    taskkit db current [--url URL]                    show the database's revision
    taskkit train CONFIG_FILE [--name NAME] [--task TASK] [--app APP] [--queue Q] [--watch]
                                                      submit a training run (JSON or YAML config)
    taskkit runs list [--status S] [--limit N]        the newest runs, newest first
    taskkit runs show RUN_ID [--watch] [--interval S] one run: status, epoch, metrics, progress
    taskkit resume RUN_ID [--app APP] [--queue Q]     re-enqueue a failed or interrupted run from
                                                      its last valid checkpoint
    taskkit dlq list [--task T] [--batch B] [--error-type E] [--older-than AGE] [--json] ...
                                                      dead letters, oldest failure first
    taskkit dlq show ID [--json]                      one letter: error, payload, traceback
    taskkit dlq replay (ID... | --task T | ... | --all) [--into TASK] [--app APP]
                                                      send dead letters again, all or nothing
    taskkit dlq discard ID...                         mark letters discarded (kept, not replayed)
    taskkit dlq purge (ID... | --older-than AGE | --retention) [--yes]
                                                      delete letters for good
    taskkit dlq depth [--json]                        dead letters waiting per task

The database is ``TASKKIT_DATABASE_URL`` unless ``--url`` is given (every command takes it);
workers must use the same one. The app (``train``, ``resume``, ``dlq replay``) is ``--app``,
else ``TASKKIT_APP``, else ``workers.app``: a module (its ``app`` or ``celery_app``) or
``module:attribute``. The task (``train``) is ``--task``, else the config's ``task`` key, else
``workers.training.train_model``. ``taskkit._cli_dlq`` describes the ``dlq`` commands.

Exit codes:

===  ==========================================================================================
0    success (``--watch``: the run completed)
1    a service (the database, the broker, the result backend, the lease store) could not be
     reached, a migration failed, the run's checkpoints could not be read, or the watched run
     failed
2    bad arguments or settings: a config file, app, task or revision that cannot be used, an
     age that is not one (``dlq``), a refused replay (nothing was sent), a ``purge`` without
     ``--yes`` and no terminal to ask on
3    unknown run (no such ``RUN_ID``) or dead letter (no such ``ID``)
4    the run is already completed (``resume``)
5    the run is still running on a live worker (``resume``)
6    the run has no checkpoint to resume from (``resume``)
130  interrupted (Ctrl-C); a watched run goes on
===  ==========================================================================================

Every error is one line on stderr, ``error: ...`` (warnings: ``warning: ...``). ``train`` and
``resume`` check that the broker (and a Redis result backend) answer before they touch the run,
so an outage is exit 1 with the run left as it was.

Example::

    $ TASKKIT_DATABASE_URL=postgresql+psycopg://app@db:5432/app taskkit db upgrade
    database postgresql://db:5432/app is at revision 0003 (head)
    $ taskkit train experiments/baseline.yaml --name baseline
    submitted run 7 as task 0b6c... (workers.training.train_model)
    follow it with: taskkit runs show 7 --watch
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from taskkit._cli_dlq import dlq_app
from taskkit._cli_launch import (
    DEFAULT_APP,
    AppOption,
    CliError,
    UrlOption,
    check_services,
    find_task,
    load_app,
    load_config,
    safe_url,
    task_name_for,
)
from taskkit._cli_runs import list_runs, read_run, run_panel, runs_table, watch
from taskkit.config import get_settings
from taskkit.db import describe_database
from taskkit.db.classify import driver_message
from taskkit.db.migrate import current_revision, head_revision, upgrade
from taskkit.errors import (
    ConfigurationError,
    DatabaseUnavailable,
    RunNotFound,
    RunNotResumable,
    TaskkitError,
)

__all__ = ["app", "main"]

app = typer.Typer(
    name="taskkit",
    help="taskkit: Celery tasks that survive failures.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
db_app = typer.Typer(help="The taskkit database: schema migrations.", no_args_is_help=True)
app.add_typer(db_app, name="db")
runs_app = typer.Typer(help="Training runs: list them, show or follow one.", no_args_is_help=True)
app.add_typer(runs_app, name="runs")
app.add_typer(dlq_app, name="dlq")

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

QueueOption = Annotated[
    str | None,
    typer.Option(
        "--queue",
        "-Q",
        help="Send to this queue (default: the task's routing).",
        show_default=False,
    ),
]
RunId = Annotated[int, typer.Argument(help="The run's id (see: taskkit runs list).")]

#: Exit status of each ``RunNotResumable.kind`` (an unknown task is a bad --app: 2).
_RESUME_EXIT = {"completed": 4, "running": 5, "no_checkpoint": 6}
_RESUME_HINTS = {
    "running": "; wait for it, or stop its worker first",
    "no_checkpoint": "; submit it again with: taskkit train",
    "unknown_task": " (is --app right?)",
}


def _fail(message: str, code: int) -> typer.Exit:
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False)
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


# -- training runs ---------------------------------------------------------------------------


@contextmanager
def _reported(database: str, broker: str | None = None) -> Iterator[None]:
    """Turn what the run commands raise into one ``error:`` line and its exit status."""
    try:
        yield
    except CliError as exc:
        raise _fail(exc.message, exc.code) from None
    except RunNotFound as exc:
        raise _fail(f"{exc} in {database}; see: taskkit runs list", 3) from None
    except RunNotResumable as exc:
        hint = _RESUME_HINTS.get(exc.kind, "")
        raise _fail(f"{exc}{hint}", _RESUME_EXIT.get(exc.kind, 2)) from None
    except ConfigurationError as exc:
        raise _fail(str(exc), 2) from None
    except (DatabaseUnavailable, SQLAlchemyError) as exc:
        raise _fail(f"could not use database {database}: {_short(exc)}", 1) from None
    except KeyboardInterrupt:
        raise _fail("interrupted", 130) from None
    except TaskkitError as exc:  # a checkpoint store that cannot be read, ...
        raise _fail(str(exc), 1) from None
    except Exception as exc:
        if not _unreachable(exc):
            raise
        where = f"the broker {broker}" if broker else "a service"
        raise _fail(f"could not reach {where}: {_short(exc)}", 1) from None


def _unreachable(exc: BaseException) -> bool:
    """A broker or Redis error: its module is loaded if it was raised, so none is imported."""
    kinds: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module, name in (
        ("kombu.exceptions", "OperationalError"),
        ("redis.exceptions", "RedisError"),
    ):
        loaded = sys.modules.get(module)
        if loaded is not None:
            kinds.append(getattr(loaded, name))
    return isinstance(exc, tuple(kinds))


def _broker(celery_app: Any) -> str:
    return safe_url(celery_app.conf.broker_url)


def _follow(run_id: int, database: str, interval: float) -> None:
    """``--watch``: follow the run until it ends; exit 0 completed, 1 failed, 130 Ctrl-C."""
    try:
        final = watch(partial(read_run, run_id, database), out, interval)
    except KeyboardInterrupt:
        raise _fail(f"interrupted; run {run_id} goes on without you watching it", 130) from None
    if final.status == "failed":
        raise _fail(f"run {run_id} failed: {final.error or 'no error message'}", 1)


@app.command("train")
def _train_command(
    config_file: Annotated[
        Path, typer.Argument(help="The run's config: a .json, .yaml or .yml mapping.")
    ],
    name: Annotated[
        str | None,
        typer.Option(
            help="The run's name (default: the config's name, else the task's).", show_default=False
        ),
    ] = None,
    task: Annotated[
        str | None,
        typer.Option(
            help="The training task (default: the config's task, else "
            "workers.training.train_model).",
            show_default=False,
        ),
    ] = None,
    app_spec: AppOption = DEFAULT_APP,
    queue: QueueOption = None,
    watch_run: Annotated[bool, typer.Option("--watch", help="Then follow the run live.")] = False,
    url: UrlOption = None,
) -> None:
    """Submit a training run from a config file; prints its run id and task id."""
    database, described = _database(url)
    with _reported(described):
        config = load_config(config_file)
        task_name = task_name_for(config, task)
        celery_app = load_app(app_spec)
        training_task = find_task(celery_app, task_name, app_spec)
        check_services(celery_app)
    run_name = name or (config.get("name") if isinstance(config.get("name"), str) else None)
    options: dict[str, Any] = {"queue": queue} if queue else {}
    from taskkit.tasks import submit_run  # noqa: PLC0415 - see _lease_alive

    with _reported(described, _broker(celery_app)):
        run_id, task_id = submit_run(
            training_task, config, name=run_name, database_url=database, **options
        )
    out.print(
        f"submitted run [bold]{run_id}[/] as task {task_id} ({escape(task_name)})", highlight=False
    )
    if watch_run:
        with _reported(described):
            _follow(run_id, database, 1.0)
    else:
        out.print(f"follow it with: taskkit runs show {run_id} --watch", highlight=False)


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
    """The newest training runs, newest first."""
    database, described = _database(url)
    with _reported(described):
        views = list_runs(database, status=status, limit=limit)
    if not views:
        which = f" with status {status!r}" if status else ""
        out.print(escape(f"no runs{which} in {described}"), highlight=False)
        return
    out.print(runs_table(views))


@runs_app.command("show")
def _show_command(
    run_id: RunId,
    watch_run: Annotated[
        bool, typer.Option("--watch", help="Follow the run live until it ends.")
    ] = False,
    interval: Annotated[
        float, typer.Option(min=0.05, help="Seconds between two reads with --watch.")
    ] = 1.0,
    url: UrlOption = None,
) -> None:
    """One run: status, task, times, error, epoch, metrics and a progress bar."""
    database, described = _database(url)
    with _reported(described):
        if watch_run:
            _follow(run_id, database, interval)
        else:
            out.print(run_panel(read_run(run_id, database)))


@app.command("resume")
def _resume_command(
    run_id: RunId,
    app_spec: AppOption = DEFAULT_APP,
    queue: QueueOption = None,
    url: UrlOption = None,
) -> None:
    """Re-enqueue a failed or interrupted run; it continues from its last valid checkpoint."""
    database, described = _database(url)
    with _reported(described):
        celery_app = load_app(app_spec)
        check_services(celery_app)
    options: dict[str, Any] = {"queue": queue} if queue else {}
    from taskkit.tasks import resume_run  # noqa: PLC0415 - see _lease_alive

    with _reported(described, _broker(celery_app)):
        task_id = resume_run(
            celery_app,
            run_id,
            lease_alive=partial(_lease_alive, celery_app),
            database_url=database,
            **options,
        )
    out.print(f"resumed run [bold]{run_id}[/] as task {task_id}", highlight=False)
    out.print(f"follow it with: taskkit runs show {run_id} --watch", highlight=False)


def _lease_alive(celery_app: Any, run_id: int, task_name: str | None) -> bool:
    # deferred: taskkit.tasks (celery, numpy, the checkpoint store) loads only for the
    # commands that send tasks, so `taskkit db` and `taskkit runs` start fast
    from taskkit.tasks import run_is_alive  # noqa: PLC0415

    try:
        return run_is_alive(celery_app, run_id, task_name)
    except Exception as exc:
        if not (_unreachable(exc) or isinstance(exc, OSError)):
            raise
        raise CliError(
            f"could not reach the lease store to check run {run_id}: {_short(exc)}", 1
        ) from None


def _short(exc: BaseException) -> str:
    return driver_message(exc)


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: Any = None,
    line: str | None = None,
) -> None:
    err.print(f"[yellow]warning:[/] {escape(' '.join(str(message).split()))}", highlight=False)


def main() -> None:
    """Entry point of the ``taskkit`` console script."""
    warnings.showwarning = _show_warning  # one line each, like errors (not a source excerpt)
    app()
