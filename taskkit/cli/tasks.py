"""``taskkit tasks``: one Celery task as the result backend and the lease store see it.

::

    taskkit tasks show TASK_ID [--watch] [--interval S] [--timeout S] [--json] [--app APP]

``show`` reads the task's state from the app's result backend (taskkit's apps store extended
results: the task's name, arguments, worker and Celery retries), and, for a taskkit task with a
lease, the lease's holder and heartbeat from the lease store:

- state (``PENDING`` when the backend has no record: exit 3, unless ``--watch`` waits for it);
- attempts by layer: ``outer`` = the delivery (Celery ``retries`` + 1, of ``max_retries`` + 1),
  ``inner`` = the in-process attempt of this delivery, from the ``attempts`` record a task
  writes into its state meta once an inner retry happened (no record: the first attempt);
- progress: current/total, percent, message and metrics of the last ``self.progress(...)``;
- lease: its key (the task's ``lease_name`` of the stored arguments), who holds it and, on
  Redis, how long ago its holder's heartbeat renewed it;
- result, or the error and its traceback.

``--watch`` follows the task until it ends (``SUCCESS`` exit 0, ``FAILURE`` or ``REVOKED`` exit
1, ``IGNORED``: a duplicate another delivery runs, exit 0) or ``--timeout`` passes (exit 7);
Ctrl-C is exit 130 and the task goes on. ``--json`` prints one JSON document. URL passwords in
what the task stored (arguments, result, error) are shown as ``***``; arguments a task marks
``sensitive_args`` were stored redacted.

Example::

    $ taskkit tasks show 0b6c2e4f-... --watch
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console, RenderableType
from rich.console import Group as RenderGroup
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from taskkit._utils import mask_password
from taskkit.cli._common import (
    DEFAULT_APP,
    AppOption,
    CliError,
    Group,
    echo_json,
    fail,
    out,
    short,
    unreachable,
)
from taskkit.cli._launch import load_app
from taskkit.cli._watch import watch
from taskkit.errors import ConfigurationError, TaskkitError

if TYPE_CHECKING:
    from celery import Celery

__all__ = ["LeaseView", "TaskView", "read_task", "task_panel", "tasks_app"]

tasks_app = typer.Typer(
    cls=Group,
    help="Celery tasks: show one (state, attempts by layer, progress, lease, result).",
    no_args_is_help=True,
)

#: States after which a task changes no more (IGNORED: a duplicate dropped by the lease).
ENDED = frozenset({"SUCCESS", "FAILURE", "REVOKED", "IGNORED"})
STATE_STYLES = {
    "PENDING": "dim",
    "RECEIVED": "cyan",
    "STARTED": "bold blue",
    "PROGRESS": "bold blue",
    "RETRY": "yellow",
    "SUCCESS": "bold green",
    "FAILURE": "bold red",
    "REVOKED": "magenta",
    "IGNORED": "magenta",
}
#: ``--watch --timeout`` ran out before the task ended.
TIMED_OUT = 7
#: Characters of a result or an argument list in the table (``--json`` has all of it).
SHOWN = 200


@dataclass(frozen=True)
class LeaseView:
    """A task's lease: its key and, when someone holds it, who and their last heartbeat."""

    key: str
    holder: str | None = None
    #: Seconds since the holder last renewed it (Redis leases; None on a file lease).
    heartbeat_age: float | None = None
    #: Seconds until it expires unless renewed (Redis leases).
    expires_in: float | None = None
    ttl: float | None = None
    #: Why the lease store could not be read.
    problem: str | None = None

    def record(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "holder": self.holder,
            "heartbeat_age": _rounded(self.heartbeat_age),
            "expires_in": _rounded(self.expires_in),
            "ttl": self.ttl,
            "problem": self.problem,
        }


@dataclass(frozen=True)
class TaskView:
    """One task as read now: what the result backend stored, and its lease."""

    task_id: str
    state: str
    #: Whether the backend has a record of the task at all.
    known: bool
    name: str | None = None
    worker: str | None = None
    queue: str | None = None
    args: Any = None
    kwargs: Any = None
    date_done: str | None = None
    outer: int | None = None
    outer_max: int | None = None
    inner: int | None = None
    inner_max: int | None = None
    progress: dict[str, Any] | None = None
    result: Any = None
    error_type: str | None = None
    error: str | None = None
    traceback: str | None = None
    lease: LeaseView | None = None
    note: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ended(self) -> bool:
        return self.state in ENDED

    def record(self) -> dict[str, Any]:
        """JSON data (``--json``), secrets masked."""
        record: dict[str, Any] = _masked(
            {
                "task_id": self.task_id,
                "state": self.state,
                "known": self.known,
                "name": self.name,
                "worker": self.worker,
                "queue": self.queue,
                "args": self.args,
                "kwargs": self.kwargs,
                "date_done": self.date_done,
                "attempts": {
                    "outer": self.outer,
                    "outer_max": self.outer_max,
                    "inner": self.inner,
                    "inner_max": self.inner_max,
                },
                "progress": self.progress,
                "result": self.result,
                "error": None
                if self.error_type is None
                else {"type": self.error_type, "message": self.error},
                "traceback": self.traceback,
                "lease": None if self.lease is None else self.lease.record(),
                **self.extra,
            }
        )
        return record


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def _masked(value: Any) -> Any:
    """``value`` with every URL password in its strings shown as ``***``."""
    if isinstance(value, str):
        return mask_password(value)
    if isinstance(value, dict):
        return {key: _masked(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_masked(item) for item in value]
    return value


# -- reading ----------------------------------------------------------------------------------


def read_task(celery_app: Celery, task_id: str, *, with_lease: bool = True) -> TaskView:
    """Task ``task_id`` from ``celery_app``'s result backend (and its lease store).

    Example::

        view = read_task(load_app("workers.app"), "0b6c...")
        print(view.state, view.outer, view.inner)
    """
    meta = celery_app.backend.get_task_meta(task_id)
    state = str(meta.get("status") or "PENDING")
    known = state != "PENDING" or any(
        meta.get(key) is not None for key in ("name", "date_done", "worker")
    )
    result = meta.get("result")
    name = meta.get("name")
    task = celery_app.tasks.get(name) if name else None
    retries = meta.get("retries")
    view = TaskView(
        task_id=task_id,
        state=state,
        known=known,
        name=name,
        worker=meta.get("worker"),
        queue=meta.get("queue"),
        args=meta.get("args"),
        kwargs=meta.get("kwargs"),
        date_done=_text(meta.get("date_done")),
        outer=None if retries is None else int(retries) + 1,
        outer_max=_outer_max(task),
        inner_max=getattr(task, "inner_max_attempts", None),
        traceback=meta.get("traceback"),
    )
    if state in ("STARTED", "PROGRESS", "RETRY", "RECEIVED"):
        view = replace(view, inner=1 if state != "RETRY" else None)
    if state == "IGNORED":
        view = replace(view, extra={"ignored": result if isinstance(result, dict) else None})
    elif state in ("FAILURE", "RETRY", "REVOKED"):
        view = replace(view, **_error(result)) if result is not None else view
    elif state == "SUCCESS":
        view = replace(view, result=result)
    elif isinstance(result, dict):  # a running task's meta: progress, the attempts record
        view = _with_meta(view, result)
    if with_lease and task is not None and not view.ended and view.known:
        view = replace(view, lease=_lease(task, task_id, view.args, view.kwargs))
    return view


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return value.isoformat() if isinstance(value, datetime) else str(value)


def _outer_max(task: Any) -> int | None:
    max_retries = getattr(task, "max_retries", None)
    return None if max_retries is None else int(max_retries) + 1


def _with_meta(view: TaskView, meta: dict[str, Any]) -> TaskView:
    """The state meta of a running task: progress (``PROGRESS``), the attempts record."""
    changes: dict[str, Any] = {}
    attempts = meta.get("attempts")
    if isinstance(attempts, dict):
        if isinstance(attempts.get("inner"), int):
            changes["inner"] = attempts["inner"]
        if isinstance(attempts.get("outer"), int):
            changes["outer"] = attempts["outer"]
    if "current" in meta:
        changes["progress"] = {
            key: meta.get(key) for key in ("current", "total", "percent", "description", "metrics")
        }
    return replace(view, **changes)


def _error(result: Any) -> dict[str, Any]:
    """The stored exception (``{"exc_type", "exc_message", ...}`` with JSON results)."""
    if isinstance(result, BaseException):
        return {"error_type": type(result).__name__, "error": str(result)}
    if isinstance(result, dict) and "exc_type" in result:
        message = result.get("exc_message")
        if isinstance(message, list | tuple):
            message = " ".join(str(part) for part in message)
        return {"error_type": str(result["exc_type"]), "error": str(message or "")}
    return {"error_type": "error", "error": str(result)}


def _lease(task: Any, task_id: str, args: Any, kwargs: Any) -> LeaseView | None:
    """The lease of the task's stored arguments in its app's lease store."""
    if not getattr(task, "lease_key", None) or not hasattr(task, "lease_name"):
        return None
    task.push_request(id=task_id)  # a BatchTask's lease falls back on the task's own id
    try:
        key = task.lease_name(tuple(args or ()), dict(kwargs or {}))
    except (ConfigurationError, TypeError, ValueError, LookupError):
        return None  # arguments stored redacted, or not stored (result_extended off)
    finally:
        task.pop_request()
    ttl = float(getattr(task, "lease_ttl", 0) or 0) or None
    try:
        store = task.lease_store()
        holder = store.holder(key)
        expires_in = _expires_in(store, key)
    except Exception as exc:
        if not (unreachable(exc) or isinstance(exc, OSError | TaskkitError)):
            raise
        return LeaseView(key, ttl=ttl, problem=f"could not read the lease store: {short(exc)}")
    if holder is None:
        return LeaseView(key, ttl=ttl)
    age = None if expires_in is None or ttl is None else max(0.0, ttl - expires_in)
    return LeaseView(key, holder.describe(), age, expires_in, ttl)


def _expires_in(store: Any, key: str) -> float | None:
    """Seconds before a Redis lease expires; None for a file lease (a lock, no expiry)."""
    client, prefix = getattr(store, "client", None), getattr(store, "prefix", None)
    if client is None or prefix is None:
        return None
    remaining = client.pttl(f"{prefix}:lease:{key}")
    return None if remaining is None or remaining < 0 else remaining / 1000.0


# -- drawing ----------------------------------------------------------------------------------


def _cut(text: str, width: int = SHOWN) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _number(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _attempts(view: TaskView) -> str:
    def of(value: int | None, most: int | None) -> str:
        if value is None:
            return "-"
        return f"{value} of {most}" if most is not None else str(value)

    return f"outer {of(view.outer, view.outer_max)}, inner {of(view.inner, view.inner_max)}"


def _progress_bar(progress: dict[str, Any]) -> RenderableType:
    percent = progress.get("percent")
    current, total = progress.get("current"), progress.get("total")
    counts = f"{_number(current)}/{_number(total)}" if total is not None else _number(current)
    bar = Table.grid(padding=(0, 1))
    if isinstance(percent, int | float):
        bar.add_row(
            ProgressBar(total=100.0, completed=float(percent), width=40),
            Text(f"{percent:.0f}%  {counts}"),
        )
    else:
        bar.add_row(Text(counts))
    return bar


def _lease_text(lease: LeaseView) -> Text:
    text = Text(lease.key)
    if lease.problem:
        text.append(f" ({lease.problem})", style="yellow")
    elif lease.holder is None:
        text.append(" (free)", style="dim")
    else:
        text.append(f" held by {lease.holder}")
        if lease.heartbeat_age is not None:
            text.append(f"; heartbeat {lease.heartbeat_age:.0f} s ago")
            if lease.ttl is not None:
                text.append(f" (ttl {lease.ttl:g} s)")
        elif lease.expires_in is None:
            text.append(" (a lock file: freed when that process exits)", style="dim")
    return text


def task_panel(view: TaskView) -> RenderableType:
    """The ``tasks show`` view."""
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    state = Text(view.state, style=STATE_STYLES.get(view.state, ""))
    if not view.known:
        state.append(
            " (no record: unknown id, not started yet, or its result expired)", style="dim"
        )
    rows: list[tuple[str, str | RenderableType]] = [
        ("task", view.task_id),
        ("name", view.name or "-"),
        ("state", state),
    ]
    if view.known:
        rows += [("worker", view.worker or "-"), ("attempts", _attempts(view))]
    if view.args is not None or view.kwargs is not None:
        shown = f"{_masked(view.args)!r} {_masked(view.kwargs)!r}"
        rows.append(("arguments", _cut(shown)))
    if view.progress is not None:
        rows.append(("progress", _progress_bar(view.progress)))
        if view.progress.get("description"):
            rows.append(("message", str(view.progress["description"])))
        metrics = view.progress.get("metrics") or {}
        if metrics:
            rows.append(
                ("metrics", "  ".join(f"{k}={_number(v)}" for k, v in sorted(metrics.items())))
            )
    if view.lease is not None:
        rows.append(("lease", _lease_text(view.lease)))
    if view.state == "SUCCESS":
        rows.append(("result", _cut(repr(_masked(view.result)))))
    ignored = view.extra.get("ignored")
    if isinstance(ignored, dict) and ignored.get("duplicate_of"):
        rows.append(
            (
                "duplicate of",
                f"task {ignored['duplicate_of']} (it held lease {ignored.get('lease', '-')})",
            )
        )
    if view.error_type is not None:
        error = f"{view.error_type}: {view.error}" if view.error else view.error_type
        rows.append(("error", Text(mask_password(error), style="red")))
    if view.date_done:
        rows.append(("done", view.date_done))
    for label, value in rows:  # plain strings are the task's data: never read as markup
        grid.add_row(label, Text(value) if isinstance(value, str) else value)
    parts: list[RenderableType] = [grid]
    if view.traceback and view.state in ("FAILURE", "RETRY"):
        parts += [
            Text("traceback", style="bold"),
            Text(mask_password(view.traceback.rstrip()), style="dim"),
        ]
    if view.note:
        parts.append(Text(view.note, style="yellow"))
    return RenderGroup(*parts)


def _line(view: TaskView) -> str:
    """One line per change when the output is not a terminal."""
    line = f"task {view.task_id}: {view.state}"
    if view.known:
        line += f", {_attempts(view)}"
    if view.progress is not None and view.progress.get("percent") is not None:
        line += f", {view.progress['percent']:.0f}%"
    return f"{line} ({view.note})" if view.note else line


# -- the command ------------------------------------------------------------------------------


@contextmanager
def _reported(backend: str) -> Iterator[None]:
    """Errors as one line: the result backend or lease store not answering is exit 1."""
    try:
        yield
    except typer.Exit:
        raise
    except CliError as exc:
        raise fail(exc.message, exc.code) from None
    except KeyboardInterrupt:
        raise fail("interrupted", 130) from None
    except ConfigurationError as exc:
        raise fail(str(exc), 2) from None
    except Exception as exc:
        if unreachable(exc) or isinstance(exc, OSError):
            raise fail(f"could not reach the result backend {backend}: {short(exc)}", 1) from None
        if isinstance(exc, TaskkitError):
            raise fail(str(exc), 1) from None
        raise


def _check_backend(celery_app: Celery, backend: str) -> None:
    """A Redis result backend that does not answer is exit 1 at once (reading through it
    would retry for half a minute first: ``result_backend_always_retry``)."""
    ping = getattr(getattr(celery_app.backend, "client", None), "ping", None)
    if not callable(ping):
        return
    try:
        ping()
    except Exception as exc:
        if not (unreachable(exc) or isinstance(exc, OSError)):
            raise
        raise CliError(f"could not reach the result backend {backend}: {short(exc)}", 1) from None


def _noted(last: TaskView, exc: BaseException) -> TaskView:
    if not (unreachable(exc) or isinstance(exc, OSError)):
        raise exc
    return replace(last, note=f"the result backend did not answer ({short(exc)}); retrying")


@tasks_app.command("show")
def _show_command(
    task_id: Annotated[str, typer.Argument(help="The Celery task id.")],
    watch_task: Annotated[
        bool, typer.Option("--watch", help="Follow the task live until it ends.")
    ] = False,
    interval: Annotated[
        float, typer.Option(min=0.05, help="Seconds between two reads with --watch.")
    ] = 1.0,
    timeout: Annotated[
        float,
        typer.Option(min=0.0, help="With --watch: stop watching after this many seconds (exit 7)."),
    ] = 3600.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON (for scripts).")] = False,
    app_spec: AppOption = DEFAULT_APP,
) -> None:
    """One task: state, attempts by layer (outer: deliveries, inner: in-process tries),
    progress, lease holder and heartbeat, result or error."""
    with _reported("-"):
        celery_app = load_app(app_spec)
    backend = mask_password(str(celery_app.conf.result_backend))
    with _reported(backend):
        _check_backend(celery_app, backend)
        if not watch_task:
            view = read_task(celery_app, task_id)
            if not view.known:
                raise CliError(
                    f"no task {task_id} in the result backend {backend}: unknown id, not "
                    "started yet, or its result expired (--watch waits for it)",
                    3,
                )
            if as_json:
                echo_json(view.record())
            else:
                out.print(task_panel(view))
            return
        try:
            watched = watch(
                lambda: read_task(celery_app, task_id),
                panel=task_panel,
                line=_line,
                ended=lambda view: view.ended,
                failed_read=_noted,
                console=out if not as_json else _quiet(),
                interval=interval,
                timeout=timeout,
            )
        except KeyboardInterrupt:
            raise fail(
                f"interrupted; task {task_id} goes on without you watching it", 130
            ) from None
    view = watched.view
    if as_json:
        echo_json(view.record())
    if watched.timed_out:
        raise fail(
            f"task {task_id} is still {view.state} after {timeout:g} s; stopped watching "
            "(it goes on)",
            TIMED_OUT,
        )
    if view.state in ("FAILURE", "REVOKED"):
        raise fail(f"task {task_id} ended {view.state}: {view.error or '-'}", 1)


def _quiet() -> Console:
    """A console that prints nothing: ``--watch --json`` prints the last view only."""
    return Console(file=io.StringIO(), force_terminal=False)
