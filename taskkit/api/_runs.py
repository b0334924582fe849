"""The runs: ``POST /train``, ``GET /models/{id}``, ``GET /runs``, ``GET /runs/{id}``,
``GET /runs/{id}/events``.

Decisions:

- ``POST /train`` takes the seed's body, a config mapping (``name``, ``model_type`` and anything
  the task reads), stores it whole as the run's config and sends the training task: the
  config's ``task``, else ``workers.training.train_model`` (``taskkit train``'s default); a
  name the app does not register as a ``TrainingTask`` is a 422, so the endpoint sends nothing
  but the app's own training tasks. The answer is the seed's, ``{"model_run_id", "status":
  "queued"}``, with 200 as in the seed.
- ``Idempotency-Key`` (IETF draft ``httpapi-idempotency-key``, Stripe's behaviour): the first
  request with a key makes the run; a later one with the same key and the same body gets the
  same answer (200, header ``Idempotent-Replayed: true``) without making or sending anything,
  even while the broker is down; the same key with another body is a 422 naming the run. The
  key is a unique column (``model_runs.idempotency_key``), so two racing requests make one run:
  the loser of the insert answers with the winner's run (possibly before the winner has sent
  its task; if that send then fails for an outage, the run is deleted and a retry with the key
  makes a new one). Keys are kept as long as their runs.
- ``GET /runs`` lists newest first (highest id), filtered by ``status`` and ``name``, paged by
  an opaque cursor (``next_cursor``; None on the last page): a page is the same cost at any
  depth and neither skips nor repeats a run when new ones arrive.
- ``GET /runs/{id}`` lists the run's epochs (``epochs``: the latest ``RUN_EPOCHS``, 1000, of
  a longer run, oldest first) and the checkpoints where the run's task keeps them (its
  ``checkpoint_store``, when the service's Celery app registers the task; else the default
  store of the service's settings). When they cannot be read the answer still comes, with
  ``checkpoints_error`` saying why.
- ``GET /runs/{id}/events`` is a Server-Sent Events stream read from the database, one read per
  ``app.state.events_interval`` seconds (0.5): an event ``epoch`` for every epoch of the run's
  history (``training_epochs``), in order, each once, however fast the epochs end (its ``id``
  is the epoch number); then an event ``progress`` whenever the status, epoch, metrics or
  staleness changed (its ``id`` is ``<last epoch sent>-<digest of the state>``); then, once the
  run is completed, failed or stopped, an event ``end`` and the stream closes. A comment line
  every ``app.state.events_keepalive`` seconds (15) of silence keeps proxies from closing it. A
  client reconnecting with ``Last-Event-ID`` gets nothing it has seen: the epochs after the
  one the id names, and the current state only if it differs. An epoch a resumed run trains
  again after the stream sent it is not sent twice (a resumed run repeats its epochs bit for
  bit); a run trained before the history existed sends ``progress`` events only.
- Metrics that are not finite numbers (a diverged loss) are answered as null: JSON has no NaN.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import math
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, Header, HTTPException, Query, Request, Response, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator

from taskkit.api._auth import require_token
from taskkit.api._deps import service_settings
from taskkit.api._models import (
    NO_NUL,
    CheckpointOut,
    EpochOut,
    ModelOut,
    Problem,
    RunOut,
    RunPage,
    TrainOut,
    has_nul,
    run_out,
    run_summary,
)
from taskkit.config import Settings
from taskkit.db.runs import RunView, list_runs, read_epochs, read_run
from taskkit.errors import DatabaseUnavailable, RunNotFound

__all__ = [
    "DEFAULT_TASK",
    "EPOCH_BATCH",
    "EVENTS_GRACE",
    "EVENTS_INTERVAL",
    "EVENTS_KEEPALIVE",
    "RUN_EPOCHS",
    "TrainRequest",
    "decode_cursor",
    "encode_cursor",
    "event_stream",
    "router",
]

router = APIRouter(tags=["runs"])

#: The training task ``POST /train`` sends when the config names none (as ``taskkit train``).
DEFAULT_TASK = "workers.training.train_model"
#: Epochs ``GET /runs/{id}`` lists at most (the latest; the event stream sends them all).
RUN_EPOCHS = 1000
#: Epochs an event stream reads from the database at a time.
EPOCH_BATCH = 1000
#: Seconds between two database reads of an event stream (``app.state.events_interval``).
EVENTS_INTERVAL = 0.5
#: Seconds an event stream waits for the last progress write of a completed run
#: (``app.state.events_grace``).
EVENTS_GRACE = 5.0
#: Seconds of silence after which an event stream sends a comment (``app.state.events_keepalive``).
EVENTS_KEEPALIVE = 15.0

_NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"model": Problem, "description": "No run has this id."}
}


class TrainRequest(BaseModel):
    """``POST /train``'s body: the run's config. Every key is stored and given to the task;
    these three are read by the service too."""

    model_config = ConfigDict(
        extra="allow",
        json_schema_extra={"examples": [{"name": "baseline", "model_type": "sgd", "epochs": 20}]},
    )

    name: str | None = Field(
        None, min_length=1, max_length=255, description="The run's name (default: the task's)."
    )
    model_type: str | None = Field(None, min_length=1, max_length=100)
    task: str | None = Field(
        None,
        min_length=1,
        max_length=255,
        description=f"The training task to send (default: {DEFAULT_TASK}).",
    )

    @model_validator(mode="after")
    def _no_nul(self) -> TrainRequest:
        # PostgreSQL stores no NUL character in text or JSON: refused here, not a 500 there.
        if has_nul(self.model_dump()):
            raise ValueError("the config holds a NUL character (\\u0000), which is not stored")
        return self


def _not_found(run_id: int, what: str = "run") -> HTTPException:
    return HTTPException(status.HTTP_404_NOT_FOUND, f"{what} {run_id} not found")


def _read(run_id: int, settings: Settings, what: str = "run") -> RunView:
    try:
        return read_run(run_id, settings.database_url, lease_ttl=settings.lease_ttl)
    except RunNotFound:
        raise _not_found(run_id, what) from None


# -- POST /train -------------------------------------------------------------------------------


@router.post(
    "/train",
    response_model=TrainOut,
    dependencies=[Depends(require_token)],
    responses={
        401: {"model": Problem},
        422: {"model": Problem, "description": "Not a training task, or a reused key."},
        503: {"model": Problem, "description": "The broker or the database is down."},
    },
)
def start_training(
    body: TrainRequest,
    request: Request,
    response: Response,
    settings: Annotated[Settings, Depends(service_settings)],
    idempotency_key: Annotated[
        str | None,
        Header(
            min_length=1,
            max_length=255,
            description="Makes retries safe: the same key returns the same run.",
        ),
    ] = None,
) -> TrainOut:
    """Start a training run (the seed's ``POST /train``)."""
    config = body.model_dump(exclude_unset=True)
    url = settings.database_url
    if idempotency_key is not None:
        known = _keyed_run(idempotency_key, url)
        if known is not None:
            _same_request(idempotency_key, known, config)
            response.headers["Idempotent-Replayed"] = "true"
            return TrainOut(model_run_id=known[0], status="queued")
    task = _training_task(request.app.state.celery_app(), body.task or DEFAULT_TASK)
    from taskkit.tasks import submit_run  # noqa: PLC0415 - celery loads with the app above

    run_id, _ = submit_run(
        task,
        config,
        name=body.name,
        model_type=body.model_type,
        database_url=url,
        idempotency_key=idempotency_key,
    )
    if idempotency_key is not None:
        # A request that raced this one with the key may have made the run: same body only.
        known = _keyed_run(idempotency_key, url)
        if known is not None:
            _same_request(idempotency_key, known, config)
    return TrainOut(model_run_id=run_id, status="queued")


def _training_task(app: Any, name: str) -> Any:
    from taskkit.tasks import TrainingTask  # noqa: PLC0415

    task = app.tasks.get(name)
    if not isinstance(task, TrainingTask):
        known = sorted(n for n, t in app.tasks.items() if isinstance(t, TrainingTask))
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            f"task {name!r} is not a training task of this service's app; "
            f"it has: {', '.join(known) or 'none'}",
        )
    return task


def _keyed_run(key: str, database_url: str | None) -> tuple[int, dict[str, Any]] | None:
    from sqlalchemy import select  # noqa: PLC0415

    from taskkit.db.models import ModelRun  # noqa: PLC0415
    from taskkit.db.session import session_scope  # noqa: PLC0415

    with session_scope(database_url, readonly=True) as session:
        row = session.execute(
            select(ModelRun.id, ModelRun.config).where(ModelRun.idempotency_key == key)
        ).one_or_none()
    return None if row is None else (row.id, dict(row.config or {}))


def _same_request(key: str, known: tuple[int, dict[str, Any]], config: dict[str, Any]) -> None:
    run_id, stored = known
    if stored != config:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            f"Idempotency-Key {key!r} was used for another request (run {run_id}); "
            "use a new key for a new run",
        )


# -- GET /models/{id} --------------------------------------------------------------------------


@router.get("/models/{model_id}", response_model=ModelOut, responses=_NOT_FOUND)
def get_model(model_id: int, settings: Annotated[Settings, Depends(service_settings)]) -> ModelOut:
    """A training run as the seed's ``GET /models/{id}`` shows it."""
    view = _read(model_id, settings, "model run")
    return ModelOut(
        id=view.id,
        name=view.name,
        status=view.status,
        accuracy=_finite(view.accuracy),
        final_score=_finite(view.final_score),
        model_type=view.model_type,
    )


# -- GET /runs, GET /runs/{id} -----------------------------------------------------------------


def encode_cursor(last_id: int) -> str:
    """The opaque cursor of the page after one whose last run is ``last_id``.

    Example::

        decode_cursor(encode_cursor(41))   # 41
    """
    return base64.urlsafe_b64encode(f"before:{last_id}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    """The run id a cursor of ``encode_cursor`` pages below; ``ValueError`` for any other text.

    Example::

        decode_cursor("YmVmb3JlOjQx")   # 41
    """
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("ascii")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise ValueError(f"not a cursor: {cursor!r}") from None
    prefix, _, number = text.partition(":")
    if prefix != "before" or not number.isdigit() or len(number) > 19:
        raise ValueError(f"not a cursor: {cursor!r}")
    return int(number)


@router.get(
    "/runs",
    response_model=RunPage,
    responses={400: {"model": Problem, "description": "A cursor this service did not give."}},
)
def get_runs(
    settings: Annotated[Settings, Depends(service_settings)],
    status_: Annotated[
        str | None,
        Query(
            alias="status", max_length=32, pattern=NO_NUL, description="Only runs in this status."
        ),
    ] = None,
    name: Annotated[
        str | None, Query(max_length=255, pattern=NO_NUL, description="Only runs of this name.")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=500, description="Runs per page.")] = 50,
    cursor: Annotated[
        str | None, Query(max_length=64, description="next_cursor of the previous page.")
    ] = None,
) -> RunPage:
    """Training runs, newest first, a page at a time."""
    before = None
    if cursor is not None:
        try:
            before = decode_cursor(cursor)
        except ValueError:
            raise HTTPException(
                status.HTTP_400_BAD_REQUEST,
                f"cursor {cursor!r} is not one this service gave: pass next_cursor of a page",
            ) from None
    views = list_runs(
        settings.database_url,
        status=status_,
        name=name,
        limit=limit + 1,
        before_id=before,
        lease_ttl=settings.lease_ttl,
    )
    page, more = views[:limit], len(views) > limit
    now = _now()
    return RunPage(
        runs=[_safe(run_summary(view, now)) for view in page],
        next_cursor=encode_cursor(page[-1].id) if more else None,
    )


@router.get("/runs/{run_id}", response_model=RunOut, responses=_NOT_FOUND)
def get_run(
    run_id: int, request: Request, settings: Annotated[Settings, Depends(service_settings)]
) -> RunOut:
    """One run: status, progress, last heartbeat and staleness, checkpoints, error."""
    view = _read(run_id, settings)
    checkpoints, error = _checkpoints(view, request, settings)
    history = read_epochs(run_id, settings.database_url, limit=RUN_EPOCHS, latest=True)
    epochs = [EpochOut(epoch=epoch, metrics=metrics) for epoch, metrics in history]
    return _safe(run_out(view, checkpoints, error, _now(), epochs=epochs))


def _checkpoints(
    view: RunView, request: Request, settings: Settings
) -> tuple[list[CheckpointOut], str | None]:
    try:
        with _store(view, request, settings) as store:
            infos = store.list()
    except Exception as exc:  # storage down, a task's own store failing: the run still shows
        return [], f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return [
        CheckpointOut(
            step=info.step,
            created_at=info.created_at,
            is_best=info.is_best,
            metrics=_finite_tree(info.metrics),
        )
        for info in infos
    ], None


def _store(view: RunView, request: Request, settings: Settings) -> Any:
    """The run's checkpoint store: its task's own (``checkpoint_store``) when the service's app
    registers the task, else the default one under the service's settings."""
    from taskkit.checkpoint import CheckpointStore  # noqa: PLC0415

    uid = view.uid or None
    try:
        task = request.app.state.celery_app().tasks.get(view.task_name or "")
    except Exception:  # the app does not import here: the default store is still readable
        task = None
    opener = getattr(task, "checkpoint_store", None)
    if opener is not None:
        return opener(view.id, run_uid=uid)
    return CheckpointStore(view.id, run_uid=uid, settings=settings)


# -- GET /runs/{id}/events ---------------------------------------------------------------------

_EVENT_SCHEMA = {
    "type": "object",
    "properties": {
        "event": {"type": "string", "enum": ["epoch", "progress", "end"]},
        "data": {"type": "string", "description": "JSON text"},
        "id": {"type": "string"},
        "retry": {"type": "integer"},
    },
}


@router.get(
    "/runs/{run_id}/events",
    response_class=StreamingResponse,
    responses={
        200: {
            # OpenAPI 3.1: the schema of an event stream describes one event.
            "content": {"text/event-stream": {"schema": _EVENT_SCHEMA}},
            "description": "Events 'epoch' (one per epoch, in order) and 'progress' (JSON "
            "data), then 'end' when the run ends.",
        },
        **_NOT_FOUND,
    },
)
async def run_events(
    run_id: int,
    request: Request,
    settings: Annotated[Settings, Depends(service_settings)],
    last_event_id: Annotated[
        str | None, Header(alias="Last-Event-ID", max_length=100, include_in_schema=False)
    ] = None,
) -> StreamingResponse:
    """Live progress of a run as Server-Sent Events, until it is completed, failed or stopped."""
    url = settings.database_url
    first = await run_in_threadpool(_read, run_id, settings)
    state = request.app.state
    stream = event_stream(
        lambda: read_run(run_id, url, lease_ttl=settings.lease_ttl),
        first,
        epochs=lambda after: read_epochs(run_id, url, after=after, limit=EPOCH_BATCH),
        last_event_id=last_event_id,
        interval=float(getattr(state, "events_interval", EVENTS_INTERVAL)),
        keepalive=float(getattr(state, "events_keepalive", EVENTS_KEEPALIVE)),
        grace=float(getattr(state, "events_grace", EVENTS_GRACE)),
    )
    return StreamingResponse(
        stream,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def event_stream(
    read: Callable[[], RunView],
    first: RunView,
    *,
    epochs: Callable[[int], list[tuple[int, dict[str, Any]]]] | None = None,
    last_event_id: str | None = None,
    interval: float = EVENTS_INTERVAL,
    keepalive: float = EVENTS_KEEPALIVE,
    grace: float = EVENTS_GRACE,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Any] = asyncio.sleep,
) -> AsyncIterator[str]:
    """The text of a run's event stream: ``first``, then ``read()`` every ``interval`` seconds
    (in a worker thread), an event per change, until the run ends. After each read,
    ``epochs(after)`` gives the epochs after the last one sent (``(epoch, metrics)``, in
    order, empty when there is no more): each is sent as an event ``epoch`` before the state.
    A read the database does not answer is a comment, and the next interval reads again.

    A trainer marks its run completed, then writes its last progress (the writes are queued
    behind the status): a completed run whose progress row does not say completed yet is read
    again, for up to ``grace`` seconds, so the last epoch is not lost to the race.

    Example::

        async for chunk in event_stream(lambda: read_run(7), read_run(7), interval=0.1):
            print(chunk, end="")
    """
    from sqlalchemy.exc import SQLAlchemyError  # noqa: PLC0415 - loaded by read_run already

    seen, view = last_event_id, first
    sent = _epoch_of(last_event_id)
    quiet_since, ending = clock(), None
    yield f"retry: {max(1000, int(interval * 2000))}\n\n"
    while True:
        if epochs is not None:
            try:
                while batch := await run_in_threadpool(epochs, sent):
                    for epoch, metrics in batch:
                        sent, quiet_since = epoch, clock()
                        row = {"run_id": view.id, "epoch": epoch, "metrics": _finite_tree(metrics)}
                        yield f"id: {epoch}\nevent: epoch\ndata: {json.dumps(row)}\n\n"
            except (DatabaseUnavailable, SQLAlchemyError) as exc:
                reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
                yield f": database did not answer ({reason}); reading again\n\n"
                await sleep(interval)
                continue
        event_id, data = _event(view, sent)
        if event_id != seen:
            seen, quiet_since = event_id, clock()
            yield f"id: {event_id}\nevent: progress\ndata: {data}\n\n"
        if view.finished:
            ending = ending if ending is not None else clock()
            if _caught_up(view) or clock() - ending >= grace:
                end = {"run_id": view.id, "status": view.status}
                yield f"event: end\ndata: {json.dumps(end)}\n\n"
                return
        if clock() - quiet_since >= keepalive:
            quiet_since = clock()
            yield ": keep-alive\n\n"
        await sleep(interval)
        try:
            view = await run_in_threadpool(read)
        except RunNotFound:
            yield f"event: end\ndata: {json.dumps({'run_id': view.id, 'status': 'deleted'})}\n\n"
            return
        except (DatabaseUnavailable, SQLAlchemyError) as exc:
            reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            yield f": database did not answer ({reason}); reading again\n\n"


def _caught_up(view: RunView) -> bool:
    """Whether the progress row has the run's last report (see ``event_stream``)."""
    return view.status != "completed" or view.progress_status in (None, "completed")


def _epoch_of(last_event_id: str | None) -> int:
    """The last epoch a client saw, from its ``Last-Event-ID`` (``"7"`` or ``"7-<digest>"``);
    0 for none or an id this service did not give."""
    prefix = (last_event_id or "").partition("-")[0]
    return int(prefix) if prefix.isdigit() and len(prefix) <= 18 else 0


def _event(view: RunView, sent: int = 0) -> tuple[str, str]:
    """The event id (the last epoch sent and a digest of what the event shows) and data."""
    data = {
        "run_id": view.id,
        "status": view.status,
        "stale": view.stale,
        "epoch": view.epoch,
        "total_epochs": view.total_epochs,
        "percent": view.percent,
        "metrics": _finite_tree(view.metrics),
        "best_score": _finite(view.best_score),
        "error": view.error,
        "message": view.message,
    }
    text = json.dumps(data, sort_keys=True, default=str)
    digest = hashlib.sha256(text.encode()).hexdigest()[:12]
    return f"{sent}-{digest}", text


# -- JSON has no NaN ---------------------------------------------------------------------------


_M = TypeVar("_M", bound=BaseModel)


def _finite(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else value


def _finite_tree(value: Any) -> Any:
    if isinstance(value, float):
        return _finite(value)
    if isinstance(value, dict):
        return {key: _finite_tree(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_tree(item) for item in value]
    return value


def _safe(model: _M) -> _M:
    """``model`` with every non-finite float inside it null (Starlette refuses NaN in JSON)."""
    return type(model).model_validate(_finite_tree(model.model_dump()))


def _now() -> datetime:
    return datetime.now(UTC)
