"""``taskkit doctor``: every check of ``taskkit.doctor``, as a table or as JSON.

::

    taskkit doctor [--app workers.app] [--tasks-module myproject.tasks ...] [--json]

The exit status is the overall verdict: 0 when every check is ok, 1 with warnings, 2 with
errors. ``--json`` prints the report (``{"verdict", "exit_code", "checks": [{"name",
"verdict", "reason", "fix", "details"}]}``), the schema ``GET /doctor`` answers too. No
secret is ever printed: keys and tokens are ``***``, URL passwords masked.

Example::

    $ taskkit doctor --app myproject.celery --tasks-module myproject.reports
    $ taskkit doctor --json | jq '.checks[] | select(.verdict != "ok")'
"""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.markup import escape

from taskkit.cli import _common
from taskkit.cli._common import DEFAULT_APP, AppOption, out

__all__ = ["doctor_app", "report_table"]

doctor_app = typer.Typer(cls=_common.Group)

_STYLE = {"ok": "green", "warning": "yellow", "error": "bold red"}


@doctor_app.command("doctor")
def _doctor_command(
    app_spec: AppOption = DEFAULT_APP,
    tasks_modules: Annotated[
        list[str] | None,
        typer.Option(
            "--tasks-module",
            help="A module holding tasks the worker must register (repeatable).",
            show_default=False,
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Check the deployment: services, app and tasks, settings, keys, clocks (exit 0/1/2)."""
    from taskkit.doctor import diagnose  # noqa: PLC0415 - heavy: only for this command

    report = diagnose(app_spec=app_spec, tasks_modules=tasks_modules or ())
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
    else:
        out.print(report_table(report))
        summary = {"ok": "every check is ok", "warning": "warnings", "error": "errors"}
        verdict = report.verdict
        out.print(
            f"[{_STYLE[verdict]}]{summary[verdict]}[/] (exit {report.exit_code})", highlight=False
        )
    raise typer.Exit(report.exit_code)


def report_table(report: Any) -> Any:
    """A rich table of a ``taskkit.doctor.Report``: check, verdict, reason and fix.

    Example::

        out.print(report_table(diagnose()))
    """
    from rich.table import Table  # noqa: PLC0415

    table = Table(show_lines=True, expand=False)
    table.add_column("check", no_wrap=True)
    table.add_column("verdict", no_wrap=True)
    table.add_column("reason", ratio=3, overflow="fold")
    table.add_column("fix", ratio=2, overflow="fold")
    for check in report.checks:
        style = _STYLE[check.verdict]
        table.add_row(
            escape(check.name),
            f"[{style}]{check.verdict}[/]",
            escape(check.reason),
            escape(check.fix or ""),
        )
    return table
