"""``taskkit train`` and ``taskkit resume``: send a training run to the workers.

::

    taskkit train CONFIG_FILE [--name NAME] [--task TASK] [--app APP] [--queue Q] [--watch]
    taskkit resume RUN_ID [--app APP] [--queue Q]

Both check that the broker (and a Redis result backend) answer before they touch the run, so
an outage is exit 1 with the run left as it was. The app, and with it Celery and the task
modules (numpy, scikit-learn, ...), is imported only here, when one of them runs.

Example::

    $ taskkit train experiments/baseline.yaml --name baseline
    submitted run 7 as task 0b6c... (workers.training.train_model)
    follow it with: taskkit runs show 7 --watch
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from taskkit._utils import mask_password
from taskkit.cli._common import (
    DEFAULT_APP,
    AppOption,
    CliError,
    Database,
    Group,
    UrlOption,
    database,
    out,
    short,
    unreachable,
)
from taskkit.cli._launch import (
    check_services,
    find_task,
    load_app,
    load_config,
    task_name_for,
)
from taskkit.cli._runview import check_run_id, follow, run_reported
from taskkit.errors import RunNotResumable

__all__ = ["train_app"]

#: Its commands are ``taskkit``'s own (``taskkit train``, not ``taskkit train train``).
train_app = typer.Typer(cls=Group)

QueueOption = Annotated[
    str | None,
    typer.Option(
        "--queue",
        "-Q",
        help="Send to this queue (default: the task's routing).",
        show_default=False,
    ),
]

#: Exit status of each ``RunNotResumable.kind`` (an unknown task is a bad --app: 2).
_RESUME_EXIT = {"completed": 4, "running": 5, "no_checkpoint": 6}
_RESUME_HINTS = {
    "running": "; wait for it, or stop its worker first",
    "no_checkpoint": "; submit it again with: taskkit train",
    "unknown_task": " (is --app right?)",
}


@train_app.command("train")
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
    db = database(url)
    with run_reported(db):
        config = load_config(config_file)
        task_name = task_name_for(config, task)
        celery_app = load_app(app_spec)
        training_task = find_task(celery_app, task_name, app_spec)
        check_services(celery_app)
    run_name = name or (config.get("name") if isinstance(config.get("name"), str) else None)
    options: dict[str, Any] = {"queue": queue} if queue else {}
    from taskkit.tasks import submit_run  # noqa: PLC0415 - celery and the tasks: only here

    with run_reported(db, mask_password(str(celery_app.conf.broker_url))):
        run_id, task_id = submit_run(
            training_task, config, name=run_name, database_url=db.url, **options
        )
    out.print(
        f"submitted run [bold]{run_id}[/] as task {task_id} ({escape(task_name)})", highlight=False
    )
    if watch_run:
        with run_reported(db):
            follow(run_id, db, 1.0)
    else:
        out.print(f"follow it with: taskkit runs show {run_id} --watch", highlight=False)


@train_app.command("resume")
def _resume_command(
    run_id: Annotated[int, typer.Argument(help="The run's id (see: taskkit runs list).")],
    app_spec: AppOption = DEFAULT_APP,
    queue: QueueOption = None,
    url: UrlOption = None,
) -> None:
    """Re-enqueue a failed or interrupted run; it continues from its last valid checkpoint."""
    db = database(url)
    with run_reported(db):
        check_run_id(run_id)
        celery_app = load_app(app_spec)
        check_services(celery_app)
    options: dict[str, Any] = {"queue": queue} if queue else {}
    from taskkit.tasks import resume_run  # noqa: PLC0415 - celery and the tasks: only here

    with _resume_reported(db, mask_password(str(celery_app.conf.broker_url))):
        task_id = resume_run(
            celery_app,
            run_id,
            lease_alive=partial(_lease_alive, celery_app),
            database_url=db.url,
            **options,
        )
    out.print(f"resumed run [bold]{run_id}[/] as task {task_id}", highlight=False)
    out.print(f"follow it with: taskkit runs show {run_id} --watch", highlight=False)


@contextmanager
def _resume_reported(db: Database, broker: str) -> Iterator[None]:
    """``run_reported``, and a run that cannot be resumed: its own exit status and hint."""
    with run_reported(db, broker):
        try:
            yield
        except RunNotResumable as exc:
            hint = _RESUME_HINTS.get(exc.kind, "")
            raise CliError(f"{exc}{hint}", _RESUME_EXIT.get(exc.kind, 2)) from None


def _lease_alive(celery_app: Any, run_id: int, task_name: str | None) -> bool:
    from taskkit.tasks import run_is_alive  # noqa: PLC0415 - loaded by resume_run already

    try:
        return run_is_alive(celery_app, run_id, task_name)
    except Exception as exc:
        if not (unreachable(exc) or isinstance(exc, OSError)):
            raise
        raise CliError(
            f"could not reach the lease store to check run {run_id}: {short(exc)}", 1
        ) from None
