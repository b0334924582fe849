"""The dead letters: GET /dead-letters, /dead-letters/{id}; replay (one, or by batch or
filter) and discard, over ``taskkit.deadletter.DeadLetterStore`` and
``taskkit.tasks.replay_dead_letters``.

Decisions:

- Filters are the CLI's (``taskkit dlq list``): ``task``, ``batch``, ``error_type``,
  ``older_than``/``newer_than`` (an age such as ``30s``, ``15m``, ``2h``, ``7d``, ``2w``,
  compared with the last failure) and ``status`` (``dead``, the default, ``replayed``,
  ``discarded`` or ``any``). Pages are newest letter first, ``limit`` (1-500, default 100)
  at a time; ``next_cursor`` is passed back as ``before`` for the next page (null: the last).
- Replays are all or nothing, as the CLI's: an unknown id is a 404; a letter that is not
  waiting (already replayed or discarded) a 409; a task that is not registered in the
  service's Celery app, or a payload that no longer validates, a 422; the broker down a 503.
  Each says which letters and why; nothing was sent. A replay by filter needs at least one
  filter, or ``all: true``.
- ``discard`` keeps the letter (status ``discarded``) and answers it.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from taskkit.api._auth import require_token
from taskkit.api._models import NoNul
from taskkit.errors import ConfigurationError, DeadLetterNotFound, ReplayRejected

if TYPE_CHECKING:
    from taskkit.db.models import DeadLetter
    from taskkit.deadletter import DeadLetterStore, ReplayResult

__all__ = [
    "DeadLetterOut",
    "DeadLettersPage",
    "ReplayFilter",
    "ReplayOne",
    "ReplayOut",
    "parse_age",
    "router",
]

router = APIRouter(tags=["dead letters"])

#: Most letters one page holds.
MAX_PAGE = 500

_AGE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([smhdw])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_LONGEST_AGE = timedelta(days=365 * 1000)
_ROW_ID = Annotated[int, Path(ge=1, le=2**63 - 1, description="The letter's id.")]


class DeadLetterOut(BaseModel):
    """A dead letter; ``payload`` and ``traceback`` only in ``GET /dead-letters/{id}``."""

    id: int
    task_name: str
    batch_id: str | None
    item_key: str | None
    task_id: str | None
    error_type: str
    error_message: str
    attempts: int
    first_failed_at: datetime
    last_failed_at: datetime
    status: Literal["dead", "replayed", "discarded"]
    replayed_at: datetime | None
    replayed_into: str | None
    replay_task_id: str | None
    replays: int
    payload: Any = None
    traceback: str | None = None


class DeadLettersPage(BaseModel):
    """One page of letters, newest first; ``next_cursor`` goes in ``before`` for the next."""

    letters: list[DeadLetterOut]
    next_cursor: int | None


class ReplayOne(BaseModel):
    """Optional body of ``POST /dead-letters/{id}/replay``."""

    model_config = ConfigDict(extra="forbid")

    into: Annotated[str, NoNul] | None = Field(
        None, min_length=1, max_length=255, description="Another task to send it to."
    )


class ReplayFilter(BaseModel):
    """Which letters ``POST /dead-letters/replay`` sends again: ids, or filters, or all."""

    model_config = ConfigDict(extra="forbid")

    ids: list[Annotated[int, Field(ge=1, le=2**63 - 1)]] | None = Field(
        None, min_length=1, max_length=MAX_PAGE
    )
    task: Annotated[str, NoNul] | None = Field(None, min_length=1, max_length=255)
    batch_id: Annotated[str, NoNul] | None = Field(None, min_length=1, max_length=64)
    error_type: Annotated[str, NoNul] | None = Field(None, min_length=1, max_length=255)
    older_than: Annotated[str, NoNul] | None = Field(
        None, max_length=32, description="An age: 30s, 15m, 2h, 7d."
    )
    all: bool = Field(False, description="Every waiting letter (no filter needed).")
    into: Annotated[str, NoNul] | None = Field(None, min_length=1, max_length=255)


class SentOut(BaseModel):
    """One message a replay sent."""

    task_name: str
    task_id: str
    batch_id: str | None
    letter_ids: list[int]


class ReplayOut(BaseModel):
    """What a replay sent: the letters marked ``replayed`` and the messages."""

    letter_ids: list[int]
    sent: list[SentOut]


def parse_age(text: str, field: str = "older_than") -> timedelta:
    """``30s``, ``15m``, ``2h``, ``7d`` or ``2w`` as a ``timedelta``; else a 422 naming
    ``field``.

    Example::

        parse_age("36h")    # timedelta(days=1, seconds=43200)
    """
    match = _AGE.fullmatch(text.strip().lower())
    problem = None
    if match is None:
        problem = "is not an age: give a number and a unit, s, m, h, d or w (30s, 15m, 2h, 7d)"
    else:
        try:
            age = timedelta(seconds=float(match[1]) * _UNIT_SECONDS[match[2]])
        except OverflowError:
            age = _LONGEST_AGE * 2
        if age > _LONGEST_AGE:
            problem = "is too long ago: at most 1000 years"
    if problem is not None:
        raise HTTPException(422, f"{field} {text!r} {problem}")
    return age


@router.get("/dead-letters", response_model=DeadLettersPage)
def list_letters(
    request: Request,
    task: Annotated[Annotated[str, NoNul] | None, Query(max_length=255)] = None,
    batch: Annotated[Annotated[str, NoNul] | None, Query(max_length=64)] = None,
    error_type: Annotated[Annotated[str, NoNul] | None, Query(max_length=255)] = None,
    older_than: Annotated[Annotated[str, NoNul] | None, Query(max_length=32)] = None,
    newer_than: Annotated[Annotated[str, NoNul] | None, Query(max_length=32)] = None,
    status: Literal["dead", "replayed", "discarded", "any"] = "dead",
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
    before: Annotated[int | None, Query(ge=1, le=2**63 - 1)] = None,
) -> DeadLettersPage:
    """Dead letters matching the filters, newest first, a page at a time."""
    letters = _store(request).list(
        task=task,
        batch_id=batch,
        error_type=error_type,
        older_than=None if older_than is None else parse_age(older_than, "older_than"),
        newer_than=None if newer_than is None else parse_age(newer_than, "newer_than"),
        status=None if status == "any" else status,
        limit=limit + 1,
        newest_first=True,
        before_id=before,
    )
    page = letters[:limit]
    more = len(letters) > limit
    return DeadLettersPage(
        letters=[_out(letter) for letter in page], next_cursor=page[-1].id if more else None
    )


@router.get(
    "/dead-letters/{letter_id}",
    response_model=DeadLetterOut,
    responses={404: {"description": "No letter has this id"}},
)
def get_letter(letter_id: _ROW_ID, request: Request) -> DeadLetterOut:
    """One letter, with its payload and traceback."""
    with _answers():
        return _out(_store(request).get(letter_id), full=True)


@router.post(
    "/dead-letters/replay",
    response_model=ReplayOut,
    dependencies=[Depends(require_token)],
    responses={409: {"description": "A letter is not waiting"}, 503: {"description": "Broker"}},
)
def replay_letters(body: ReplayFilter, request: Request) -> ReplayOut:
    """Send letters again by ids, batch or filter (or ``all``): all or nothing."""
    filtered = any(
        v is not None for v in (body.task, body.batch_id, body.error_type, body.older_than)
    )
    if body.ids and (filtered or body.all):
        raise HTTPException(422, "give letter ids or filters (or all), not both")
    if body.all and filtered:
        raise HTTPException(422, "all replays every dead letter: give all or filters, not both")
    if not (body.ids or filtered or body.all):
        raise HTTPException(
            422, "replay what? give ids, task, batch_id, error_type, older_than, or all: true"
        )
    age = None if body.older_than is None else parse_age(body.older_than, "older_than")
    return _replay(
        request,
        ids=body.ids,
        into=body.into,
        task=body.task,
        batch_id=body.batch_id,
        error_type=body.error_type,
        older_than=age,
        all=body.all,
    )


@router.post(
    "/dead-letters/{letter_id}/replay",
    response_model=ReplayOut,
    dependencies=[Depends(require_token)],
    responses={
        404: {"description": "No letter has this id"},
        409: {"description": "The letter is not waiting"},
        503: {"description": "The broker does not answer"},
    },
)
def replay_letter(letter_id: _ROW_ID, request: Request, body: ReplayOne | None = None) -> ReplayOut:
    """Send one letter again, to its own task or ``into``."""
    return _replay(request, ids=[letter_id], into=body.into if body else None)


@router.post(
    "/dead-letters/{letter_id}/discard",
    response_model=DeadLetterOut,
    dependencies=[Depends(require_token)],
    responses={404: {"description": "No letter has this id"}},
)
def discard_letter(letter_id: _ROW_ID, request: Request) -> DeadLetterOut:
    """Mark a letter discarded: kept for the record, never replayed."""
    store = _store(request)
    with _answers():
        store.discard([letter_id])
        return _out(store.get(letter_id))


# -- helpers -----------------------------------------------------------------------------------


def _store(request: Request, celery_app: Any = None) -> DeadLetterStore:
    from taskkit.deadletter import DeadLetterStore  # noqa: PLC0415 - SQLAlchemy, kombu

    settings = request.app.state.settings
    return DeadLetterStore(settings.database_url, queue=settings.dead_letter_queue, app=celery_app)


def _replay(request: Request, **selection: Any) -> ReplayOut:
    from taskkit.tasks import replay_dead_letters  # noqa: PLC0415 - Celery: only here

    celery_app = request.app.state.celery_app()
    with _answers():
        result: ReplayResult = replay_dead_letters(
            app=celery_app, store=_store(request, celery_app), **selection
        )
    return ReplayOut(
        letter_ids=result.letter_ids,
        sent=[SentOut(**message._asdict()) for message in result.sent],
    )


class _answers:
    """The store's and the replay's errors as HTTP answers with their messages."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, exc: BaseException | None, tb: Any) -> None:
        if isinstance(exc, DeadLetterNotFound):
            raise HTTPException(404, str(exc)) from None
        if isinstance(exc, ReplayRejected):
            code = 409 if "status 'dead'" in exc.reason else 422
            raise HTTPException(code, str(exc)) from None
        if isinstance(exc, ConfigurationError):
            raise HTTPException(422, str(exc)) from None


def _out(letter: DeadLetter, *, full: bool = False) -> DeadLetterOut:
    return DeadLetterOut(
        id=letter.id,
        task_name=letter.task_name,
        batch_id=letter.batch_id,
        item_key=letter.item_key,
        task_id=letter.task_id,
        error_type=letter.error_type,
        error_message=letter.error_message or "",
        attempts=letter.attempts,
        first_failed_at=_utc(letter.first_failed_at),
        last_failed_at=_utc(letter.last_failed_at),
        status=letter.status,  # type: ignore[arg-type]
        replayed_at=None if letter.replayed_at is None else _utc(letter.replayed_at),
        replayed_into=letter.replayed_into,
        replay_task_id=letter.replay_task_id,
        replays=letter.replays,
        payload=letter.payload if full else None,
        traceback=letter.traceback if full else None,
    )


def _utc(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)
