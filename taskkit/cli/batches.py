"""``taskkit batches``: where a batch is, from its row and the item ledger.

::

    taskkit batches show BATCH_ID [--watch] [--interval S] [--timeout S] [--window S] [--json]

``show`` reads ``taskkit.deadletter.batch_report``: the batch's task, total and chunks (a batch
``submit_batch`` sent; a single task's items have ledger rows only, and no total), its items
done, dead-lettered and pending, the rate (items finished per second over the last
``--window`` seconds, 60 by default) and the ETA at that rate. ``--watch`` follows it until
every item is done or dead (exit 0) or ``--timeout`` passes (exit 7); Ctrl-C is exit 130 and
the batch goes on. An unknown batch id is exit 3.

Example::

    $ taskkit batches show 3f2a... --watch
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console, RenderableType
from rich.console import Group as RenderGroup
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from taskkit.cli._common import (
    CliError,
    Group,
    UrlOption,
    database,
    echo_json,
    fail,
    out,
    printable,
    reported,
    short,
    when,
)
from taskkit.cli._watch import watch

if TYPE_CHECKING:
    from taskkit.deadletter import BatchReport

__all__ = ["batch_panel", "batches_app"]

batches_app = typer.Typer(
    cls=Group,
    help="Batches sent with submit_batch: show one (done, dead, pending, rate, ETA).",
    no_args_is_help=True,
)

#: A read of the batch, and a note to show under it (a database that did not answer).
Seen = tuple["BatchReport", str | None]

#: ``--watch --timeout`` ran out before the batch ended.
TIMED_OUT = 7


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    whole = round(seconds)
    if whole < 60:
        return f"{whole} s"
    if whole < 3600:
        return f"{whole // 60} min {whole % 60:02d} s"
    return f"{whole // 3600} h {whole % 3600 // 60:02d} min"


def batch_panel(report: BatchReport, note: str | None = None) -> RenderableType:
    """The ``batches show`` view: task, a progress bar, done/dead/pending, rate and ETA.

    Example::

        out.print(batch_panel(batch_report("batch-42")))
    """
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    total = "-" if report.total is None else str(report.total)
    chunks = "" if report.chunks is None else f" in {report.chunks} chunks"
    bar = Table.grid(padding=(0, 1))
    if report.percent is not None:
        bar.add_row(
            ProgressBar(total=100.0, completed=report.percent, width=40),
            Text(f"{report.percent:.0f}%  {report.finished}/{total}"),
        )
    else:
        bar.add_row(
            Text(
                f"{report.finished} finished (total unknown: not sent by submit_batch, "
                "or its items are still being sent)"
            )
        )
    dead = Text(str(report.dead), style="bold red" if report.dead else "")
    if report.dead:
        dead.append(f"  (see: taskkit dlq list --batch {report.batch_id})", style="dim")
    pending = "-" if report.pending is None else str(report.pending)
    rows: list[tuple[str, str | RenderableType]] = [
        ("batch", report.batch_id),
        ("task", report.task_name or "-"),
        ("items", f"{total}{chunks}"),
        ("progress", bar),
        ("done", str(report.done)),
        ("dead", dead),
        ("pending", f"{pending} ({report.claimed} claimed by a running chunk)"),
        ("rate", f"{report.rate:.3g} items/s over the last {report.window:g} s"),
        ("eta", "done" if report.complete else _duration(report.eta)),
        ("created", when(report.created_at)),
        ("last change", when(report.last_change)),
    ]
    for label, value in rows:  # plain strings are the batch's data: never read as markup
        grid.add_row(label, Text(printable(value)) if isinstance(value, str) else value)
    parts: list[RenderableType] = [grid]
    if note:
        parts.append(Text(note, style="yellow"))
    return RenderGroup(*parts)


def _line(report: BatchReport) -> str:
    total = "?" if report.total is None else str(report.total)
    return (
        f"batch {report.batch_id}: {report.finished}/{total} "
        f"(done {report.done}, dead {report.dead}), {report.rate:.3g} items/s, "
        f"eta {'done' if report.complete else _duration(report.eta)}"
    )


@batches_app.command("show")
def _show_command(
    batch_id: Annotated[str, typer.Argument(help="The batch id (submit_batch's batch_id).")],
    watch_batch: Annotated[
        bool, typer.Option("--watch", help="Follow the batch live until every item is finished.")
    ] = False,
    interval: Annotated[
        float, typer.Option(min=0.05, help="Seconds between two reads with --watch.")
    ] = 1.0,
    timeout: Annotated[
        float,
        typer.Option(min=0.0, help="With --watch: stop watching after this many seconds (exit 7)."),
    ] = 3600.0,
    window: Annotated[
        float, typer.Option(min=1.0, help="Seconds of recent work the rate is measured over.")
    ] = 60.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON (for scripts).")] = False,
    url: UrlOption = None,
) -> None:
    """One batch: task, done, dead and pending items, rate and ETA, with a progress bar."""
    from taskkit.deadletter import batch_report  # noqa: PLC0415 - SQLAlchemy: only here

    db = database(url)

    def read() -> Seen:
        report = batch_report(batch_id, db.url, window=window)
        if report is None:
            raise CliError(
                f"no batch {batch_id!r} in {db.name} (no batches row, no ledger rows); "
                "see: taskkit dlq list --status any",
                3,
            )
        return report, None

    def failed_read(last: Seen, exc: BaseException) -> Seen:
        from sqlalchemy.exc import SQLAlchemyError  # noqa: PLC0415 - loaded by read()

        if not isinstance(exc, SQLAlchemyError):
            raise exc
        return last[0], f"database did not answer ({short(exc)}); retrying"

    with reported(db):
        if not watch_batch:
            report, _ = read()
            if as_json:
                echo_json(report.record())
            else:
                out.print(batch_panel(report))
            return
        try:
            watched = watch(
                read,
                panel=lambda seen: batch_panel(*seen),
                line=lambda seen: _line(seen[0]),
                ended=lambda seen: seen[0].complete,
                failed_read=failed_read,
                console=Console(file=io.StringIO()) if as_json else out,
                interval=interval,
                timeout=timeout,
            )
        except KeyboardInterrupt:
            raise fail(
                f"interrupted; batch {batch_id} goes on without you watching it", 130
            ) from None
    final, _ = watched.view
    if as_json:
        echo_json(final.record())
    if watched.timed_out:
        raise fail(
            f"batch {batch_id} is not finished after {timeout:g} s "
            f"({final.finished}/{final.total or '?'}); stopped watching "
            "(it goes on)",
            TIMED_OUT,
        )
