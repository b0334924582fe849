"""The HTML dashboard at ``/``: runs, one run, dead letters, circuit breakers.

Pages: ``/`` (runs, a "New run" form, live progress), ``/ui/runs/{id}`` (a run: facts, the
curve of its metrics by epoch, checkpoints, error, Resume and Stop), ``/ui/dead-letters``
(filters, tracebacks, Replay, Discard, replay of everything the filters select) and
``/ui/breakers`` (state, failures, Reset). Scripts and styles are ``/ui/static/dashboard.js``
and ``dashboard.css``.

Decisions:

- Server-rendered with Jinja2, autoescape on, from the same reads the JSON endpoints use, so a
  page shows what the API answers. Pages are out of the OpenAPI schema.
- Reading needs no token, as with the JSON endpoints. Every change is a button whose script
  POSTs to the JSON endpoint with ``Authorization: Bearer`` from a field the operator fills
  in. The token stays in the tab's ``sessionStorage``: never in a URL, a cookie or a page the
  service renders, and a form on another site cannot send that header (no CSRF).
- Live: a run that can still change gets its ``/runs/{id}/events`` stream (Server-Sent Events;
  at most 4 a page, a browser opens 6 connections to a host) for its bar, epoch and curve; a
  change of status or staleness, and every 3 seconds while a run on the page can change, reads
  the parts of the page marked ``data-refresh`` again (the rows without a stream, heartbeats,
  checkpoints).
- The curve: every epoch of the run's history (``training_epochs``, the latest ``CURVE_EPOCHS``
  of a longer run), and the latest progress; the script adds each ``epoch`` event of the
  stream while the page is open. A run trained before the history existed has no rows: its
  points are then the epochs of its kept checkpoints (each manifest holds its epoch's metrics).
- Status is a word and a symbol, colour only helps: ``✓ completed``, ``⚠ stale``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, Response
from fastapi.templating import Jinja2Templates
from jinja2 import Environment, FileSystemLoader, select_autoescape

from taskkit.api._deps import service_settings
from taskkit.api._models import NoNul
from taskkit.config import Settings
from taskkit.db.runs import RunView, list_runs, read_epochs, read_run
from taskkit.errors import RunNotFound

__all__ = ["CURVE_EPOCHS", "CurvePoint", "curve_points", "router", "status_label"]

_HERE = Path(__file__).parent
_STATIC = {"dashboard.js": "text/javascript", "dashboard.css": "text/css"}

templates = Jinja2Templates(
    env=Environment(
        loader=FileSystemLoader(_HERE / "templates"),
        autoescape=select_autoescape(default=True, default_for_string=True),
    )
)

router = APIRouter(include_in_schema=False)


def _number(value: Any) -> Any:
    """Floats to 4 significant digits; anything else as it is."""
    return f"{value:.4g}" if isinstance(value, float) else value


def _when(moment: datetime | str | None) -> str:
    """A time as ``2026-12-01 15:50:22 UTC`` (the database's and manifests' are UTC)."""
    if moment is None or moment == "":
        return "-"
    if isinstance(moment, str):
        try:
            moment = datetime.fromisoformat(moment)
        except ValueError:
            return str(moment)
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


templates.env.filters["number"] = _number
templates.env.filters["when"] = _when

#: Statuses in which a run still changes by itself (its page streams and refreshes).
ACTIVE = ("created", "queued", "running", "retrying")

_SYMBOLS = {
    "created": "○",
    "queued": "◷",
    "running": "▶",
    "retrying": "↻",
    "completed": "✓",
    "failed": "✗",
    "stopped": "■",
    "stale": "⚠",
    "dead": "✗",
    "replayed": "↻",
    "discarded": "⊘",
    "closed": "✓",
    "open": "✗",
    "half_open": "◐",
}

#: Epochs a run's curve shows at most: the latest ones (the page carries every point).
CURVE_EPOCHS = 5000

#: Rows a page shows at most (runs and dead letters).
PAGE = 50


def status_label(status: str, *, stale: bool = False) -> str:
    """The status as a page shows it: a symbol and the word, readable without colour.

    Example::

        status_label("completed")              # '✓ completed'
        status_label("running", stale=True)    # '⚠ running (stale)'
    """
    if stale:
        return f"{_SYMBOLS['stale']} {status} (stale)"
    return f"{_SYMBOLS.get(status, '•')} {status}"


@dataclass(frozen=True)
class CurvePoint:
    """One epoch's numeric metrics, a point of a run's curve.

    Example::

        CurvePoint(epoch=3, metrics={"loss": 0.41, "score": 0.87})
    """

    epoch: int
    metrics: Mapping[str, float]


def curve_points(
    epochs: Iterable[tuple[int, Mapping[str, Any]]],
    latest: tuple[int, Mapping[str, Any]] | None = None,
) -> list[CurvePoint]:
    """The points of a run's curve, by epoch: one per ``(epoch, metrics)`` of ``epochs`` and
    the ``latest`` progress ``(epoch, metrics)``, finite numbers only (``best_score``, a
    running best, is left out: it is not that epoch's value; so is a metric named ``epoch``,
    which would move its point). An entry of ``epochs`` wins over
    the latest progress of the same epoch (the history row is that epoch's own report).
    Epochs are 1-based, as ``runs`` shows them (the history's epochs are; a checkpoint's
    0-based step ``s`` is epoch ``s + 1``).

    Example::

        curve_points([(1, {"loss": 0.9}), (2, {"loss": 0.7})], latest=(3, {"loss": 0.5}))
        # [CurvePoint(1, {'loss': 0.9}), CurvePoint(2, {'loss': 0.7}), CurvePoint(3, ...)]
    """
    by_epoch: dict[int, dict[str, float]] = {}
    for epoch, metrics in epochs:
        by_epoch[int(epoch)] = _numbers(metrics)
    if latest is not None and latest[0] > 0:
        by_epoch.setdefault(int(latest[0]), _numbers(latest[1]))
    return [CurvePoint(epoch, metrics) for epoch, metrics in sorted(by_epoch.items()) if metrics]


def _numbers(metrics: Mapping[str, Any]) -> dict[str, float]:
    return {
        str(key): float(value)
        for key, value in metrics.items()
        if key not in ("best_score", "epoch")  # a metric named "epoch" would move its point
        and isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
    }


# -- pages --------------------------------------------------------------------------------------


@router.get("/", response_class=HTMLResponse)
def runs_page(
    request: Request,
    settings: Annotated[Settings, Depends(service_settings)],
    status: Annotated[Annotated[str, NoNul] | None, Query(max_length=32)] = None,
    name: Annotated[Annotated[str, NoNul] | None, Query(max_length=255)] = None,
    before: Annotated[int | None, Query(ge=1)] = None,
) -> Response:
    """Runs, newest first, with filters, paging and the New run form."""
    views = list_runs(
        settings.database_url,
        status=status or None,
        name=name or None,
        limit=PAGE + 1,
        before_id=before,
    )
    more = len(views) > PAGE
    views = views[:PAGE]
    now = datetime.now(UTC)
    rows = [_run_row(view, now) for view in views]
    return _page(
        request,
        "runs.html",
        "Runs",
        rows=rows,
        status=status or "",
        name=name or "",
        statuses=("queued", "running", "retrying", "completed", "failed", "stopped"),
        older=views[-1].id if more and views else None,
        live=any(row["active"] for row in rows),
    )


@router.get("/ui/runs/{run_id}", response_class=HTMLResponse)
def run_page(
    request: Request, run_id: int, settings: Annotated[Settings, Depends(service_settings)]
) -> Response:
    """One run: facts, curve, checkpoints, error, Resume and Stop."""
    try:
        view = read_run(run_id, settings.database_url)
    except RunNotFound:
        return _page(
            request, "missing.html", "Not found", what=f"run {run_id} not found", status_code=404
        )
    now = datetime.now(UTC)
    checkpoints, checkpoints_error = _checkpoints(view, request, settings)
    latest = (view.epoch, view.metrics) if view.epoch else None
    history = read_epochs(run_id, settings.database_url, limit=CURVE_EPOCHS, latest=True)
    if not history:  # trained before the history existed: its kept checkpoints' epochs
        history = [(c["epoch"], c["metrics"]) for c in checkpoints]
    points = curve_points(history, latest)
    names = sorted({key for point in points for key in point.metrics})
    row = _run_row(view, now)
    return _page(
        request,
        "run.html",
        f"Run {view.id}",
        run=row,
        view=view,
        checkpoints=checkpoints,
        checkpoints_error=checkpoints_error,
        points=[{"epoch": p.epoch, **p.metrics} for p in points],
        metric_names=names,
        live=row["active"],
        can_resume=row["stale"] or view.status in ("failed", "stopped"),
        can_stop=view.status in ACTIVE and not row["stale"],
    )


@router.get("/ui/static/{name}")
def static_file(name: str) -> Response:
    """The dashboard's own script and style sheet."""
    media = _STATIC.get(name)
    if media is None:
        raise HTTPException(404, f"no static file {name!r}")
    return FileResponse(_HERE / "static" / name, media_type=media)


# -- what the pages share -------------------------------------------------------------------


def _page(
    request: Request, template: str, title: str, *, status_code: int = 200, **context: Any
) -> Response:
    root = request.scope.get("root_path", "").rstrip("/")
    return templates.TemplateResponse(
        request,
        template,
        {"title": title, "root": root, "status_label": status_label, **context},
        status_code=status_code,
        headers={"Cache-Control": "no-store"},
    )


def _run_row(view: RunView, now: datetime) -> dict[str, Any]:
    stale = view.is_stale(now)
    best = view.best_score
    return {
        "id": view.id,
        "name": view.name,
        "status": view.status,
        "stale": stale,
        "label": status_label(view.status, stale=stale),
        "css": "stale" if stale else view.status,
        "active": view.status in ACTIVE,
        "epoch": _epochs(view),
        "percent": round(view.percent, 1),
        "best": "-" if best is None else f"{best:.4g}",
        "updated": _ago(view.updated_at, now),
        "heartbeat": _ago(view.last_seen, now) if view.status in ("running", "retrying") else "",
    }


def _epochs(view: RunView) -> str:
    if view.total_epochs is None:
        return "-" if view.epoch is None else str(view.epoch)
    return f"{view.epoch or 0}/{view.total_epochs}"


def _ago(moment: datetime | None, now: datetime) -> str:
    if moment is None:
        return "-"
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    seconds = max(0, int((now - moment).total_seconds()))
    if seconds < 120:
        return f"{seconds} s ago"
    if seconds < 7200:
        return f"{seconds // 60} min ago"
    if seconds < 172800:
        return f"{seconds // 3600} h ago"
    return moment.strftime("%Y-%m-%d %H:%M UTC")


def _checkpoints(
    view: RunView, request: Request, settings: Settings
) -> tuple[list[dict[str, Any]], str | None]:
    """The run's kept checkpoints, oldest first, read where ``GET /runs/{id}`` reads them (the
    task's own store), and why they could not be read, if so."""
    from taskkit.api._runs import _checkpoints as read  # noqa: PLC0415 - the run page only

    found, error = read(view, request, settings)
    return [
        {
            "step": info.step,
            "epoch": info.step + 1,
            "metrics": dict(info.metrics or {}),
            "is_best": info.is_best,
            "created": info.created_at,
        }
        for info in sorted(found, key=lambda info: info.step)
    ], error


#: The dead-letter page's time filter: its choices and how far back each reaches.
SINCE = {"hour": timedelta(hours=1), "day": timedelta(days=1), "week": timedelta(weeks=1)}
LETTER_STATUSES = ("dead", "replayed", "discarded", "any")


@router.get("/ui/dead-letters", response_class=HTMLResponse)
def dead_letters_page(
    request: Request,
    settings: Annotated[Settings, Depends(service_settings)],
    task: Annotated[Annotated[str, NoNul] | None, Query(max_length=255)] = None,
    batch: Annotated[Annotated[str, NoNul] | None, Query(max_length=64)] = None,
    error_type: Annotated[Annotated[str, NoNul] | None, Query(max_length=255)] = None,
    status: Annotated[str, Query(pattern="^(dead|replayed|discarded|any)$")] = "dead",
    since: Annotated[str | None, Query(pattern="^(|hour|day|week)$")] = None,
) -> Response:
    """Dead letters with the CLI's filters, tracebacks, Replay, Discard and batch replay."""
    from taskkit.deadletter import DeadLetterStore  # noqa: PLC0415 - this page only

    filters = {"task": task or None, "batch_id": batch or None, "error_type": error_type or None}
    store = DeadLetterStore(settings.database_url, queue="")
    letters = store.list(
        task=filters["task"],
        batch_id=filters["batch_id"],
        error_type=filters["error_type"],
        newer_than=SINCE.get(since or ""),
        status=None if status == "any" else status,
        limit=PAGE + 1,
    )
    now = datetime.now(UTC)
    rows = [
        {
            "id": letter.id,
            "task": letter.task_name,
            "batch": letter.batch_id,
            "key": letter.item_key,
            "error": f"{letter.error_type}: {letter.error_message}".rstrip(": "),
            "traceback": letter.traceback,
            "payload": _payload(letter.payload),
            "attempts": letter.attempts,
            "failed": _ago(letter.last_failed_at, now),
            "status": letter.status,
            "label": status_label(letter.status),
            "replayed_into": letter.replayed_into,
        }
        for letter in letters[:PAGE]
    ]
    chosen: dict[str, Any] = {key: value for key, value in filters.items() if value}
    what = ", ".join(f"{k}={v}" for k, v in chosen.items()) or "every waiting letter"
    if since:  # the replay endpoint has no "newer than": name the letters shown instead
        chosen = {"ids": [row["id"] for row in rows if row["status"] == "dead"]}
        what = f"the {len(chosen['ids'])} letters shown"
    return _page(
        request,
        "dead_letters.html",
        "Dead letters",
        rows=rows,
        more=len(letters) > PAGE,
        task=task or "",
        batch=batch or "",
        error_type=error_type or "",
        status=status,
        since=since or "",
        statuses=LETTER_STATUSES,
        sinces=tuple(SINCE),
        # Batch replay sends what the filters select (every waiting letter when none is set).
        replay_body=json.dumps(chosen or {"all": True}),
        replay_what=what,
        depth=store.depth(),
    )


@router.get("/ui/breakers", response_class=HTMLResponse)
def breakers_page(request: Request) -> Response:
    """Every breaker the service knows: state, failures, Reset."""
    from taskkit.api._breakers import list_breakers  # noqa: PLC0415 - this page only

    breakers = [
        {
            **breaker.model_dump(),
            "label": status_label(breaker.state),
            # A name (from Redis too) may hold "/", which Jinja's urlencode keeps.
            "reset_url": f"/breakers/{quote(breaker.name, safe='')}/reset",
        }
        for breaker in list_breakers(request).breakers
    ]
    return _page(request, "breakers.html", "Circuit breakers", breakers=breakers)


def _payload(payload: Any) -> str:
    text = json.dumps(payload, indent=1, sort_keys=True, default=str)
    return text if len(text) <= 4000 else text[:4000] + "\n…"
