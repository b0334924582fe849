"""Training runs as ``taskkit runs`` and ``taskkit train --watch`` show them.

``RunView`` is one run as read in one session (``taskkit.db.runs``, which the HTTP service
reads too; here with control characters escaped); ``runs_table`` and ``run_panel`` draw them
with rich; ``watch`` follows one run, one database read per interval, until it is completed or
failed. The data layer (SQLAlchemy, the models) is imported by the functions that read.

A ``running`` run whose trainer has not renewed its lease for longer than the lease ttl
(``TASKKIT_LEASE_TTL``) is shown ``running (stale)``: its worker died or is cut off, and its
elapsed time stops at its last heartbeat. ``RunView.is_stale`` has the rule.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime
from functools import partial
from typing import TYPE_CHECKING, Any

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from taskkit.cli._common import (
    CliError,
    Database,
    echo_json,
    fail,
    iso,
    out,
    printable,
    reported,
    short,
    when,
)
from taskkit.errors import DatabaseUnavailable, RunNotFound

if TYPE_CHECKING:
    from taskkit.db.runs import RunView

__all__ = [
    "check_run_id",
    "follow",
    "list_runs",
    "read_run",
    "run_panel",
    "run_record",
    "run_reported",
    "runs_table",
    "stale_notes",
    "watch",
]

STATUS_STYLES = {
    "created": "dim",
    "queued": "cyan",
    "running": "bold blue",
    "retrying": "yellow",
    "completed": "bold green",
    "failed": "bold red",
    "stopped": "magenta",
}

#: The watch loop's clock and sleep; tests replace them (the loop reads them at each call).
_clock: Callable[[], float] = time.monotonic
_sleep: Callable[[float], None] = time.sleep


def _printable(view: RunView) -> RunView:
    # Control characters shown as escapes before the tables measure the text (the console
    # escapes whatever else it prints, but a table sized for the raw text would cut it).
    def text(value: str | None) -> str | None:
        return None if value is None else printable(value)

    return replace(
        view,
        name=printable(view.name),
        status=printable(view.status),
        task_id=text(view.task_id),
        task_name=text(view.task_name),
        error=text(view.error),
    )


# The data layer loads when a command reads, not when the command tree is built.


def read_run(run_id: int, database_url: str | None = None) -> RunView:
    """Run ``run_id`` and its progress (``taskkit.db.runs.read_run``), ready to print."""
    from taskkit.db import runs  # noqa: PLC0415

    return _printable(runs.read_run(run_id, database_url))


def list_runs(
    database_url: str | None = None, *, status: str | None = None, limit: int = 20
) -> list[RunView]:
    """The newest ``limit`` runs (``taskkit.db.runs.list_runs``), ready to print."""
    from taskkit.db import runs  # noqa: PLC0415

    return [_printable(view) for view in runs.list_runs(database_url, status=status, limit=limit)]


def check_run_id(run_id: int) -> None:
    """``RunNotFound`` for an id no database row can have (``taskkit.db.runs.check_run_id``)."""
    from taskkit.db import runs  # noqa: PLC0415

    runs.check_run_id(run_id)


# -- drawing ----------------------------------------------------------------------------------


def status_text(status: str, *, stale: bool = False) -> Text:
    """The status, coloured; ``running (stale)`` for a stale run."""
    text = Text(status, style=STATUS_STYLES.get(status, ""))
    if stale:
        text.append(" (stale)", style="bold red")
    return text


def _ago(seconds: float) -> str:
    whole = int(seconds)
    if whole < 120:
        return f"{whole} s ago"
    if whole < 7200:
        return f"{whole // 60} min ago"
    return f"{whole // 3600} h ago"


def _number(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _epochs(view: RunView) -> str:
    if view.total_epochs is None:
        return "-" if view.epoch is None else str(view.epoch)
    return f"{view.epoch or 0}/{view.total_epochs}"


def runs_table(views: list[RunView]) -> Table:
    """The ``runs list`` table."""
    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in ("ID", "NAME", "STATUS", "EPOCH", "PROGRESS", "BEST", "UPDATED"):
        numeric = column in ("ID", "EPOCH", "PROGRESS", "BEST")
        table.add_column(column, justify="right" if numeric else "left", overflow="fold")
    now = datetime.now(UTC)
    for view in views:
        best = view.best_score
        table.add_row(
            str(view.id),
            Text(view.name),
            status_text(view.status, stale=view.is_stale(now)),
            _epochs(view),
            f"{view.percent:.0f}%",
            "-" if best is None else _number(best),
            when(view.updated_at),
        )
    return table


def stale_notes(views: list[RunView], now: datetime | None = None) -> list[str]:
    """One line per stale run, printed under the ``runs list`` table: its last heartbeat and
    what to do. (A heartbeat column would not fit 80 columns beside ``running (stale)``.)

    Example::

        stale_notes(list_runs())   # ['run 7 is stale: last heartbeat 90 s ago (lease ...']
    """
    now = now or datetime.now(UTC)
    return [
        f"run {view.id} is stale: {_last_beat(view, now)} (lease ttl {view.lease_ttl:g} s); "
        f"its worker is gone or cut off; resume it: taskkit resume {view.id}"
        for view in views
        if view.is_stale(now)
    ]


def _last_beat(view: RunView, now: datetime) -> str:
    what = "last heartbeat" if view.heartbeat_at is not None else "no heartbeat; last update"
    age = view.heartbeat_age(now)
    return f"{what} {'-' if age is None else _ago(age)}"


def _elapsed(view: RunView, now: datetime | None = None) -> str:
    """Start to completion; to ``now`` while the run goes on; to its last sign of life when it
    is stale (the clock of a dead run does not tick)."""
    if view.started_at is None:
        return "-"
    now = now or datetime.now(UTC)
    if view.completed_at is not None:
        end: datetime | None = view.completed_at
    elif view.finished:
        end = None
    elif view.is_stale(now):
        end = view.last_seen
    else:
        end = now
    if end is None:
        return "-"
    seconds = max(0, int((end - view.started_at).total_seconds()))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


def _heartbeat_row(view: RunView, now: datetime, stale: bool) -> list[tuple[str, Text]]:
    if view.status not in ("running", "retrying"):
        return []
    if view.last_seen is None:
        return [("heartbeat", Text("-"))]
    text = Text(_last_beat(view, now))
    if stale:
        text.append(f" (stale: lease ttl {view.lease_ttl:g} s)", style="bold red")
    return [("heartbeat", text)]


def run_panel(view: RunView, now: datetime | None = None) -> RenderableType:
    """The ``runs show`` view: fields, a progress bar, metrics; a running or retrying run
    also its last heartbeat, and ``stale`` once the lease has expired."""
    now = now or datetime.now(UTC)
    stale = view.is_stale(now)
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    best = view.best_score
    rows: list[tuple[str, str | Text | RenderableType]] = [
        ("run", f"{view.id} {view.name}"),
        ("status", status_text(view.status, stale=stale)),
        ("task", f"{view.task_name or '-'} [{view.task_id or '-'}]"),
        ("started", when(view.started_at)),
        ("completed", when(view.completed_at)),
        ("elapsed", _elapsed(view, now)),
        *_heartbeat_row(view, now, stale),
        *([("error", Text(view.error, style="red"))] if view.error else []),
        ("epoch", _epochs(view)),
        ("progress", _bar(view)),
        ("best score", "-" if best is None else _number(best)),
        ("metrics", _metrics(view.metrics)),
    ]
    for label, value in rows:  # plain strings are the run's data: never read as markup
        grid.add_row(label, Text(value) if isinstance(value, str) else value)
    parts: list[RenderableType] = [grid]
    if view.note:
        parts.append(Text(view.note, style="yellow"))
    return Group(*parts)


def run_record(view: RunView, now: datetime | None = None) -> dict[str, Any]:
    """A run as JSON data (``runs list --json``, ``runs show --json``): its fields, times in
    ISO 8601 UTC, ``stale`` and the heartbeat's age.

    Example::

        echo_json(run_record(read_run(7)))
    """
    now = now or datetime.now(UTC)
    age = view.heartbeat_age(now)
    return {
        "id": view.id,
        "name": view.name,
        "status": view.status,
        "stale": view.is_stale(now),
        "task_id": view.task_id,
        "task_name": view.task_name,
        "model_type": view.model_type,
        "error": view.error,
        "created_at": iso(view.created_at),
        "started_at": iso(view.started_at),
        "completed_at": iso(view.completed_at),
        "updated_at": iso(view.updated_at),
        "heartbeat_at": iso(view.heartbeat_at),
        "heartbeat_age": None if age is None else round(age, 1),
        "lease_ttl": view.lease_ttl,
        "epoch": view.epoch,
        "total_epochs": view.total_epochs,
        "percent": view.percent,
        "best_score": view.best_score,
        "final_score": view.final_score,
        "accuracy": view.accuracy,
        "metrics": view.metrics,
        "message": view.message,
        "stop_requested_at": iso(view.stop_requested_at),
        "parent_run_id": view.parent_run_id,
        "parent_step": view.parent_step,
    }


def _bar(view: RunView) -> RenderableType:
    bar = Table.grid(padding=(0, 1))
    bar.add_row(
        ProgressBar(total=100.0, completed=view.percent, width=40),
        f"{view.percent:.0f}%",
    )
    return bar


def _metrics(metrics: dict[str, Any]) -> str:
    if not metrics:
        return "-"
    return "  ".join(f"{key}={_number(value)}" for key, value in sorted(metrics.items()))


def _line(view: RunView) -> str:
    """One line per change when the output is not a terminal (a log, a pipe)."""
    # No heartbeat age here: it changes every second, and this prints a line per change.
    status = f"{view.status} (stale)" if view.stale else view.status
    line = f"run {view.id}: {status}, epoch {_epochs(view)}, {view.percent:.0f}%"
    return f"{line} ({view.note})" if view.note else line


# -- following a run --------------------------------------------------------------------------


def watch(
    read: Callable[[], RunView],
    console: Console,
    interval: float,
    *,
    clock: Callable[[], float] | None = None,
    sleep: Callable[[float], None] | None = None,
) -> RunView:
    """Show ``read()`` once per ``interval`` seconds until the run is completed or failed;
    returns the last view. A terminal gets a live view; other outputs (a log, a pipe) a line
    per change, then the full view.

    The first read's errors are raised; later database errors are shown and the next
    interval reads again (a short outage does not end the watch).
    """
    clock = clock or _clock
    sleep = sleep or _sleep
    if console.is_terminal:
        with Live(Text("reading the run..."), console=console, auto_refresh=False) as live:
            return _follow(
                read, interval, clock, sleep, lambda v: live.update(run_panel(v), refresh=True)
            )
    final = _follow(read, interval, clock, sleep, _line_printer(console))
    console.print(run_panel(final))
    return final


def _line_printer(console: Console) -> Callable[[RunView], None]:
    last = [""]

    def show(view: RunView) -> None:
        line = _line(view)
        if line != last[0]:
            last[0] = line
            console.print(line, markup=False, highlight=False)

    return show


def _follow(
    read: Callable[[], RunView],
    interval: float,
    clock: Callable[[], float],
    sleep: Callable[[float], None],
    show: Callable[[RunView], None],
) -> RunView:
    view: RunView | None = None
    while True:
        started = clock()
        view = _read_again(read, view)
        show(view)
        if view.finished:
            return view
        sleep(max(0.0, interval - (clock() - started)))


def _read_again(read: Callable[[], RunView], last: RunView | None) -> RunView:
    from sqlalchemy.exc import SQLAlchemyError  # noqa: PLC0415 - loaded by read() already

    try:
        return replace(read(), note=None)
    except (DatabaseUnavailable, SQLAlchemyError) as exc:
        if last is None:
            raise
        return replace(last, note=f"database did not answer ({short(exc)}); retrying")


# -- what the run commands share --------------------------------------------------------------


@contextmanager
def run_reported(db: Database, broker: str | None = None) -> Iterator[None]:
    """``reported``, and an unknown run id: exit 3, naming the database.

    Example::

        with run_reported(db):
            view = read_run(7, db.url)
    """
    with reported(db, broker):
        try:
            yield
        except RunNotFound as exc:
            raise CliError(f"{exc} in {db.name}; see: taskkit runs list", 3) from None


def follow(run_id: int, db: Database, interval: float, *, as_json: bool = False) -> None:
    """``--watch``: follow the run until it ends; exit 0 completed, 1 failed or stopped, 130
    Ctrl-C. ``as_json``: nothing while it runs, the run as JSON when it ends.

    Example::

        follow(7, database(None), 1.0)
    """
    console = Console(file=io.StringIO()) if as_json else out
    try:
        final = watch(partial(read_run, run_id, db.url), console, interval)
    except KeyboardInterrupt:
        raise fail(f"interrupted; run {run_id} goes on without you watching it", 130) from None
    if as_json:
        echo_json(run_record(final))
    if final.status == "failed":
        raise fail(f"run {run_id} failed: {final.error or 'no error message'}", 1)
    if final.status == "stopped":
        raise fail(f"run {run_id} was stopped; continue it with: taskkit resume {run_id}", 1)
