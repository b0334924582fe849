"""The ``taskkit`` command: the typer app and ``main`` (the console script's entry point).

One module per command group, each readable alone: ``db`` (migrations), ``runs`` (list, show,
watch), ``train`` (``train`` and ``resume``), ``dlq`` (the dead-letter queue), ``tasks`` (one
Celery task: state, attempts, progress, lease), ``batches`` (one batch: ledger counts, rate,
ETA), ``serve`` (the HTTP service); ``_common`` holds what they share (the consoles,
``--url``/``--app``, the database a command uses, the error lines and exit codes, JSON output),
``_launch`` loads run configs and Celery apps, ``_runview`` reads and draws runs, ``_watch`` is
the ``--watch`` loop of ``tasks show`` and ``batches show``. Listing and show commands take
``--json`` (one JSON document). Nothing heavy is imported to build the command
tree: SQLAlchemy, the settings, Celery, the app and its task modules load inside the commands
that use them, so ``taskkit --help`` starts in a fraction of a second
(``tests/cli/test_startup.py``).

Every error is one line on stderr, ``error: ...`` (warnings: ``warning: ...``). The exit codes,
which database and app a command uses, and examples: ``docs/cli.md``.

Example::

    $ taskkit db upgrade
    database sqlite:////home/me/project/.taskkit/taskkit.db is at revision 0003 (head)
    $ taskkit train experiments/baseline.yaml --name baseline
    submitted run 7 as task 0b6c... (workers.training.train_model)
    follow it with: taskkit runs show 7 --watch
"""

from __future__ import annotations

import warnings
from typing import Annotated, Any

import typer
from rich.markup import escape

from taskkit import __version__
from taskkit.cli import _common
from taskkit.cli._common import err, out
from taskkit.cli.batches import batches_app
from taskkit.cli.db import db_app
from taskkit.cli.dlq import dlq_app
from taskkit.cli.doctor import doctor_app
from taskkit.cli.runs import runs_app
from taskkit.cli.serve import serve_app
from taskkit.cli.tasks import tasks_app
from taskkit.cli.train import train_app

__all__ = ["app", "main"]

app = typer.Typer(
    cls=_common.Group,
    name="taskkit",
    help="taskkit: Celery tasks that survive failures.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(train_app)  # train, resume: top-level commands
app.add_typer(db_app, name="db")
app.add_typer(runs_app, name="runs")
app.add_typer(dlq_app, name="dlq")
app.add_typer(tasks_app, name="tasks")
app.add_typer(batches_app, name="batches")
app.add_typer(serve_app)  # serve: a top-level command
app.add_typer(doctor_app)  # doctor: a top-level command


def _print_version(value: bool) -> None:
    if value:
        out.print(f"taskkit {__version__}", highlight=False)
        raise typer.Exit


@app.callback()
def _options(
    version: Annotated[
        bool,
        typer.Option(
            "--version", is_eager=True, callback=_print_version, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    # no docstring: the app's help above is the one shown
    pass


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
    """Entry point of the ``taskkit`` console script.

    Example::

        main()   # as `taskkit runs list`, with sys.argv
    """
    warnings.showwarning = _show_warning  # one line each, like errors (not a source excerpt)
    app()
