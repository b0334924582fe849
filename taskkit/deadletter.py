"""The dead-letter queue: items and tasks that exhausted their retries, kept in the database.

Celery has no dead-letter queue on Redis (and RabbitMQ's needs broker policy); taskkit keeps
one in its own database, so it works on every broker and survives a broker flush. Each
``DeadLetter`` row holds the task name, the batch and item key (for a batch item), the
payload as JSON (the item, or ``{"args": [...], "kwargs": {...}}`` of a whole task), the
error's type, message and traceback, the attempts, the first and last failure time, and a
status: ``dead`` (waiting), ``replayed`` (sent again: ``replayed_into``, ``replay_task_id``)
or ``discarded``.

``DeadLetterStore`` lists them (filter by task, batch, error type and age), counts them per
task (``depth``, for monitoring), replays them into the original task or another, discards
and purges them. ``taskkit dlq list|show|replay|purge|depth`` is the same from a shell.

Decisions:

- Recording is an upsert on (task, batch, item): an item that fails again after a crash
  updates its letter (attempts add up, last failure moves) instead of adding a second one.
- A replay is all or nothing. Every selected letter is checked first (still ``dead``, the
  target task registered, a batch item going into a ``BatchTask``, the payload still valid
  for the target: the task's signature for a whole task, ``BatchTask.validate_item`` for an
  item); if one fails, ``ReplayRejected`` names it and nothing is sent or changed. Items are
  sent as one new batch per target task (batch id ``replay-<hex>``, the original item keys;
  another batch when a key repeats, from letters of different batches, since keys are unique
  in a batch), so a replayed item that fails again is dead-lettered again under the new batch.
- The letters are marked ``replayed`` in the transaction that sent them; if the database
  fails after the send, the letters stay ``dead`` and can be replayed again, which the
  batch's ledger and an idempotent item function absorb.
- A payload that is not JSON (an object, a NaN) is stored as ``{"__unserializable__":
  repr}`` so the failure is still recorded; such a letter cannot be replayed (``ReplayRejected``).
- With ``TASKKIT_DEAD_LETTER_QUEUE`` set, each new letter is also published, as JSON with its
  ``id``, to that broker queue (after the database commit; a publish failure is logged, the row
  is the record).

Example::

    from taskkit.deadletter import DeadLetterStore
    from workers.app import app

    store = DeadLetterStore()
    for letter in store.list(task="jobs.score_items", error_type="KeyError"):
        print(letter.id, letter.item_key, letter.error_message)
    store.replay(task="jobs.score_items", app=app)    # after fixing the cause
    store.purge()                                     # older than the retention setting
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import traceback as tb
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple, cast

from kombu import Queue
from sqlalchemy import Connection, Engine, Table, delete, func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import OperationalError, ProgrammingError
from sqlalchemy.orm import Session
from sqlalchemy.sql import Select

from taskkit.config import get_settings
from taskkit.db._classify import describe_database, sqlstate
from taskkit.db._recovery import db_retry
from taskkit.db.models import DeadLetter
from taskkit.db.session import get_engine
from taskkit.errors import ConfigurationError, DeadLetterNotFound, ReplayRejected

__all__ = [
    "UNSERIALIZABLE",
    "DeadLetter",
    "DeadLetterEntry",
    "DeadLetterStore",
    "ReplayResult",
    "SentReplay",
    "jsonable",
    "write_rows",
]

logger = logging.getLogger("taskkit.deadletter")

#: Key of the stand-in stored for a payload that is not JSON.
UNSERIALIZABLE = "__unserializable__"

STATUSES = ("dead", "replayed", "discarded")
_TABLE = cast(Table, DeadLetter.__table__)


def jsonable(value: Any) -> Any:
    """``value`` as plain JSON data (numpy and pandas scalars, datetimes, tuples converted), or
    ``{"__unserializable__": repr(value)}`` when it cannot be.

    Example::

        jsonable({"x": numpy.int64(3)})   # {"x": 3}
    """
    try:
        return json.loads(json.dumps(value, default=_to_json, allow_nan=False))
    except (TypeError, ValueError, OverflowError):
        return {UNSERIALIZABLE: repr(value)[:10_000]}


def _to_json(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    # numpy / pandas arrays and scalars (tolist first: an array's item() needs size 1)
    for convert in ("tolist", "item", "isoformat"):
        method = getattr(value, convert, None)
        if callable(method):
            converted = method()
            if isinstance(converted, float) and not math.isfinite(converted):
                raise ValueError("not a finite number")
            return converted
    if isinstance(value, set | frozenset):
        return sorted(value, key=repr)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


@dataclass(frozen=True)
class DeadLetterEntry:
    """One failure to record: what ran, how it failed, how often.

    Example::

        DeadLetterEntry.from_exception("jobs.score", payload=item, error=exc, attempts=3,
                                       batch_id="b1", item_key="42")
    """

    task_name: str
    payload: Any
    error_type: str
    error_message: str
    traceback: str | None = None
    attempts: int = 1
    batch_id: str | None = None
    item_key: str | None = None
    task_id: str | None = None
    failed_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    @classmethod
    def from_exception(
        cls,
        task_name: str,
        payload: Any,
        error: BaseException,
        *,
        attempts: int = 1,
        batch_id: str | None = None,
        item_key: str | None = None,
        task_id: str | None = None,
    ) -> DeadLetterEntry:
        """An entry for ``error``, with its traceback."""
        return cls(
            task_name=task_name,
            payload=payload,
            error_type=type(error).__name__,
            error_message=str(error),
            traceback="".join(tb.format_exception(error)),
            attempts=attempts,
            batch_id=batch_id,
            item_key=item_key,
            task_id=task_id,
        )

    def row(self) -> dict[str, Any]:
        """The column values of this entry's ``dead_letters`` row."""
        return {
            "task_name": self.task_name,
            "batch_id": self.batch_id,
            "item_key": self.item_key,
            "task_id": self.task_id,
            "payload": jsonable(self.payload),
            "error_type": self.error_type[:255],
            "error_message": self.error_message,
            "traceback": self.traceback,
            "attempts": self.attempts,
            "first_failed_at": self.failed_at,
            "last_failed_at": self.failed_at,
            "status": "dead",
            "replays": 0,
        }


class SentReplay(NamedTuple):
    """One message a replay sent: to which task, its id, its batch (items), which letters."""

    task_name: str
    task_id: str
    batch_id: str | None
    letter_ids: list[int]


class ReplayResult(NamedTuple):
    """What ``replay`` did: the letters it marked ``replayed`` and the messages it sent."""

    letter_ids: list[int]
    sent: list[SentReplay]


class DeadLetterStore:
    """Dead letters in the database at ``database_url`` (default ``TASKKIT_DATABASE_URL``).

    ``queue`` (default ``TASKKIT_DEAD_LETTER_QUEUE``) also publishes new letters to that broker
    queue through ``app``'s broker. ``clock`` gives "now" for ages (tests inject one).

    Example::

        store = DeadLetterStore("postgresql+psycopg://app@db/app")
        print(store.depth())                       # {"jobs.score_items": 12}
        letter = store.get(7)
        store.replay([7], app=app, into="jobs.score_items_v2")
    """

    def __init__(
        self,
        database_url: str | None = None,
        *,
        engine: Engine | None = None,
        queue: str | None = None,
        app: Any = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.engine = engine if engine is not None else get_engine(database_url)
        self.queue = queue if queue is not None else get_settings().dead_letter_queue
        self.app = app
        self.clock = clock

    # -- recording ------------------------------------------------------------------------------

    def record(
        self, entries: Iterable[DeadLetterEntry], *, connection: Connection | None = None
    ) -> int:
        """Store ``entries`` (one statement for all of them); returns how many.

        With ``connection`` the rows are written in the caller's transaction (the batch ledger
        marks its items dead in the same one) and published after the caller commits (the
        caller calls ``publish``); otherwise in a transaction of their own, retried on
        transient database errors, then published.
        """
        rows = [entry.row() for entry in entries]
        if not rows:
            return 0
        if connection is not None:
            write_rows(connection, rows)
            return len(rows)
        self._write(rows)
        self.publish(rows)
        return len(rows)

    @db_retry(max_attempts=5)
    def _write(self, rows: list[dict[str, Any]]) -> None:
        try:
            with self.engine.begin() as connection:
                write_rows(connection, rows)
        except (OperationalError, ProgrammingError) as exc:
            if not _missing_table(exc):
                raise
            raise ConfigurationError(
                f"the dead-letter table is missing in {describe_database(self.engine.url)}: "
                "run `taskkit db upgrade` (the failure is in the log and the result backend)"
            ) from exc

    def publish(self, rows: Sequence[dict[str, Any]]) -> None:
        """Publish letters (``DeadLetterEntry.row()`` dicts) to the dead-letter broker queue,
        if one is set; failures are logged, never raised."""
        if not self.queue or not rows:
            return
        if self.app is None:
            logger.warning(
                "taskkit: dead-letter queue %r set but no Celery app to publish", self.queue
            )
            return
        try:
            declare = [Queue(self.queue, durable=True)]
            with self.app.producer_or_acquire() as producer:
                for row in rows:
                    producer.publish(
                        _message(row),
                        exchange="",
                        routing_key=self.queue,
                        declare=declare,
                        serializer="json",
                        retry=True,
                        retry_policy={"max_retries": 3},
                    )
        except Exception:
            logger.warning(
                "taskkit: could not publish %d dead letter(s) to queue %r; they are stored",
                len(rows),
                self.queue,
                exc_info=True,
            )

    # -- reading --------------------------------------------------------------------------------

    def get(self, letter_id: int) -> DeadLetter:
        """The letter with this id; ``DeadLetterNotFound`` if there is none."""
        with Session(self.engine, expire_on_commit=False) as session:
            letter = session.get(DeadLetter, letter_id)
        if letter is None:
            raise DeadLetterNotFound(letter_id)
        return letter

    def list(
        self,
        *,
        task: str | None = None,
        batch_id: str | None = None,
        error_type: str | None = None,
        older_than: timedelta | None = None,
        newer_than: timedelta | None = None,
        status: str | None = "dead",
        ids: Sequence[int] | None = None,
        limit: int | None = None,
    ) -> list[DeadLetter]:
        """Letters matching every filter given, oldest failure first. ``status=None``: any.

        ``older_than``/``newer_than`` compare the last failure with now.
        """
        query = self._select(task, batch_id, error_type, older_than, newer_than, status, ids)
        query = query.order_by(DeadLetter.last_failed_at, DeadLetter.id)
        if limit is not None:
            query = query.limit(limit)
        with Session(self.engine, expire_on_commit=False) as session:
            return list(session.scalars(query))

    def depth(self, status: str = "dead") -> dict[str, int]:
        """Letters per task name with this status (default: waiting ones), for monitoring."""
        _check_status(status)
        query = (
            select(DeadLetter.task_name, func.count())
            .where(DeadLetter.status == status)
            .group_by(DeadLetter.task_name)
            .order_by(DeadLetter.task_name)
        )
        with self.engine.connect() as connection:
            return {name: int(count) for name, count in connection.execute(query)}

    # -- replay ---------------------------------------------------------------------------------

    def replay(
        self,
        ids: Sequence[int] | None = None,
        *,
        app: Any = None,
        into: str | None = None,
        task: str | None = None,
        batch_id: str | None = None,
        error_type: str | None = None,
        older_than: timedelta | None = None,
        all: bool = False,
    ) -> ReplayResult:
        """Send dead letters again: those in ``ids``, or those matching the filters (``all=True``
        for every waiting letter), into their own task or ``into``; mark them ``replayed``.

        ``app`` (default: the store's) is the Celery app whose registered tasks receive them.
        All or nothing: ``DeadLetterNotFound`` for an unknown id, ``ReplayRejected`` for a
        letter that is not waiting, a task that is not registered, or a payload that no
        longer validates; then nothing was sent or changed.
        """
        app = app if app is not None else self.app
        if app is None:
            raise ConfigurationError("replay needs the Celery app whose tasks receive the letters")
        filtered = any(f is not None for f in (task, batch_id, error_type, older_than))
        if ids is None and not filtered and not all:
            raise ConfigurationError(
                "replay what? give letter ids, a filter (task, batch, error type, age) or all=True"
            )
        # Eager apps (tests) run the replayed tasks inside send(), and those write to this
        # database: send after the commit there. Elsewhere send inside the transaction, so a
        # failed send leaves the letters dead (a crash after sending can repeat a replay,
        # which the item function's idempotence absorbs, but never lose one).
        eager = bool(app.conf.get("task_always_eager"))
        with Session(self._writer(), expire_on_commit=False) as session, session.begin():
            if ids is not None:
                wanted = [int(i) for i in ids]
                query = select(DeadLetter).where(DeadLetter.id.in_(wanted))
                letters = list(session.scalars(_locked(query.order_by(DeadLetter.id))))
                missing = sorted(set(wanted) - {letter.id for letter in letters})
                if missing:
                    raise DeadLetterNotFound(missing)
                not_dead = [letter.id for letter in letters if letter.status != "dead"]
                if not_dead:
                    raise ReplayRejected("only letters with status 'dead' are replayed", not_dead)
            else:
                query = self._select(task, batch_id, error_type, older_than, None, "dead", None)
                letters = list(session.scalars(_locked(query.order_by(DeadLetter.id))))
            plans = _plan(app, letters, into)
            if not eager:
                sent = [plan.send() for plan in plans]
                self._mark_replayed(session, sent)
        if eager:
            sent = [plan.send() for plan in plans]
            with Session(self._writer()) as session, session.begin():
                self._mark_replayed(session, sent)
        return ReplayResult([i for message in sent for i in message.letter_ids], sent)

    def _writer(self) -> Engine:
        """The engine for a transaction that reads, then writes: on SQLite it takes the write
        lock at BEGIN (and so also serialises two replays, which ``FOR UPDATE`` cannot there)."""
        if self.engine.dialect.name == "sqlite":
            return self.engine.execution_options(taskkit_sqlite_begin="BEGIN IMMEDIATE")
        return self.engine

    def _mark_replayed(self, session: Session, sent: Sequence[SentReplay]) -> None:
        now = self.clock()
        for message in sent:
            session.execute(
                update(DeadLetter)
                .where(DeadLetter.id.in_(message.letter_ids))
                .values(
                    status="replayed",
                    replayed_at=now,
                    replayed_into=message.task_name,
                    replay_task_id=message.task_id,
                    replays=DeadLetter.replays + 1,
                )
            )

    # -- removing -------------------------------------------------------------------------------

    def discard(self, ids: Sequence[int]) -> int:
        """Mark letters ``discarded`` (kept for the record, never replayed); returns how many.
        ``DeadLetterNotFound`` (and no change) if an id is unknown."""
        wanted = [int(i) for i in ids]
        with self.engine.begin() as connection:
            found = set(connection.scalars(select(DeadLetter.id).where(DeadLetter.id.in_(wanted))))
            missing = sorted(set(wanted) - found)
            if missing:
                raise DeadLetterNotFound(missing)
            connection.execute(
                update(DeadLetter).where(DeadLetter.id.in_(wanted)).values(status="discarded")
            )
        return len(wanted)

    def purge(
        self,
        *,
        ids: Sequence[int] | None = None,
        older_than: timedelta | None = None,
        task: str | None = None,
        status: str | None = None,
    ) -> int:
        """Delete letters; returns how many. By ``ids`` (all must exist, else
        ``DeadLetterNotFound`` and nothing is deleted), or those whose last failure is older
        than ``older_than`` (default: ``TASKKIT_DEAD_LETTER_RETENTION_DAYS``), optionally only
        of one task or status."""
        with self.engine.begin() as connection:
            if ids is not None:
                wanted = [int(i) for i in ids]
                found = set(
                    connection.scalars(select(DeadLetter.id).where(DeadLetter.id.in_(wanted)))
                )
                missing = sorted(set(wanted) - found)
                if missing:
                    raise DeadLetterNotFound(missing)
                result = connection.execute(delete(DeadLetter).where(DeadLetter.id.in_(wanted)))
                return int(result.rowcount)
            if older_than is None:
                older_than = timedelta(days=get_settings().dead_letter_retention_days)
            statement = delete(DeadLetter).where(
                DeadLetter.last_failed_at < self.clock() - older_than
            )
            if task is not None:
                statement = statement.where(DeadLetter.task_name == task)
            if status is not None:
                _check_status(status)
                statement = statement.where(DeadLetter.status == status)
            return int(connection.execute(statement).rowcount)

    # -- helpers --------------------------------------------------------------------------------

    def _select(
        self,
        task: str | None,
        batch_id: str | None,
        error_type: str | None,
        older_than: timedelta | None,
        newer_than: timedelta | None,
        status: str | None,
        ids: Sequence[int] | None,
    ) -> Select[Any]:
        query = select(DeadLetter)
        now = self.clock()
        if task is not None:
            query = query.where(DeadLetter.task_name == task)
        if batch_id is not None:
            query = query.where(DeadLetter.batch_id == batch_id)
        if error_type is not None:
            query = query.where(DeadLetter.error_type == error_type)
        if older_than is not None:
            query = query.where(DeadLetter.last_failed_at < now - older_than)
        if newer_than is not None:
            query = query.where(DeadLetter.last_failed_at >= now - newer_than)
        if status is not None:
            _check_status(status)
            query = query.where(DeadLetter.status == status)
        if ids is not None:
            query = query.where(DeadLetter.id.in_([int(i) for i in ids]))
        return query


def write_rows(connection: Connection, rows: list[dict[str, Any]]) -> None:
    """Upsert letters on (task, batch, item): a repeat adds its attempts and moves the last
    failure; a letter that was replayed or discarded is dead again. In the caller's transaction.

    Example::

        with engine.begin() as connection:
            write_rows(connection, [entry.row() for entry in entries])
    """
    dialect = connection.dialect.name
    if dialect not in ("postgresql", "sqlite"):
        connection.execute(_TABLE.insert(), rows)
        return
    insert = postgresql.insert(_TABLE) if dialect == "postgresql" else sqlite.insert(_TABLE)
    excluded = insert.excluded
    statement = insert.on_conflict_do_update(
        index_elements=["task_name", "batch_id", "item_key"],
        set_={
            "attempts": _TABLE.c.attempts + excluded.attempts,
            "last_failed_at": excluded.last_failed_at,
            "error_type": excluded.error_type,
            "error_message": excluded.error_message,
            "traceback": excluded.traceback,
            "task_id": excluded.task_id,
            "payload": excluded.payload,
            "status": "dead",
        },
    )
    returning = statement.returning(_TABLE.c.id, sort_by_parameter_order=True)
    for row, letter_id in zip(rows, connection.scalars(returning, rows), strict=True):
        row["id"] = letter_id  # published with the letter, for `taskkit dlq show/replay ID`


def _missing_table(error: BaseException) -> bool:
    """A database that was never migrated: SQLite's "no such table", PostgreSQL's 42P01."""
    return sqlstate(error) == "42P01" or "no such table" in str(error)


def _message(row: dict[str, Any]) -> dict[str, Any]:
    return {
        key: (value.isoformat() if isinstance(value, datetime) else value)
        for key, value in row.items()
    }


def _check_status(status: str) -> None:
    if status not in STATUSES:
        raise ConfigurationError(f"unknown dead-letter status {status!r}; one of {STATUSES}")


def _locked(query: Select[Any]) -> Select[Any]:
    # Two replays of the same letters at once: the second waits, then sees them replayed.
    return query.with_for_update()


# -- replay planning ------------------------------------------------------------------------------


@dataclass
class _Plan:
    task: Any
    letters: list[DeadLetter]
    items: bool

    def send(self) -> SentReplay:
        ids = [letter.id for letter in self.letters]
        if self.items:
            batch_id = f"replay-{uuid.uuid4().hex[:24]}"
            result = self.task.apply_async(
                args=([letter.payload for letter in self.letters],),
                kwargs={
                    "batch_id": batch_id,
                    "keys": [letter.item_key for letter in self.letters],
                },
            )
            return SentReplay(self.task.name, result.id, batch_id, ids)
        (letter,) = self.letters
        payload = letter.payload
        result = self.task.apply_async(
            args=tuple(payload.get("args", ())), kwargs=dict(payload.get("kwargs", {}))
        )
        return SentReplay(self.task.name, result.id, None, ids)


def _plan(app: Any, letters: list[DeadLetter], into: str | None) -> list[_Plan]:
    """Check every letter against its target task; group items per target. Raises
    ``ReplayRejected`` for the first problem, before anything is sent."""
    # per target, batches of items whose keys are unique (a batch refuses a repeated key)
    items: dict[str, list[tuple[set[str | None], list[DeadLetter]]]] = defaultdict(list)
    plans: list[_Plan] = []
    for letter in letters:
        target = into or letter.task_name
        task = app.tasks.get(target)
        if task is None:
            raise ReplayRejected(
                f"task {target!r} is not registered in app {app.main!r}", [letter.id]
            )
        if isinstance(letter.payload, dict) and UNSERIALIZABLE in letter.payload:
            raise ReplayRejected(
                "its payload was not JSON when it failed, so it cannot be sent again", [letter.id]
            )
        if letter.item_key is not None:
            validate = getattr(task, "validate_item", None)
            if validate is None:
                raise ReplayRejected(
                    f"{letter.task_name!r} failed on a batch item, and {target!r} is not a "
                    "BatchTask (items replay into batch tasks)",
                    [letter.id],
                )
            try:
                validate(letter.payload)
            except Exception as exc:
                raise ReplayRejected(
                    f"the payload no longer validates for {target!r}: {type(exc).__name__}: {exc}",
                    [letter.id],
                ) from exc
            batches = items[target]
            for keys, group in batches:
                if letter.item_key not in keys:
                    keys.add(letter.item_key)
                    group.append(letter)
                    break
            else:
                batches.append(({letter.item_key}, [letter]))
        else:
            plans.append(_Plan(task, [letter], items=False))
            _check_task_payload(task, letter)
    plans.extend(
        _Plan(app.tasks[target], group, items=True)
        for target, batches in items.items()
        for _, group in batches
    )
    return plans


def _check_task_payload(task: Any, letter: DeadLetter) -> None:
    payload = letter.payload
    if not isinstance(payload, dict) or not set(payload) <= {"args", "kwargs"}:
        raise ReplayRejected(
            "a task's payload must be {'args': [...], 'kwargs': {...}}", [letter.id]
        )
    # What the task's ladder calls with its arguments (a BatchTask's batch), else its run.
    body = task.body() if callable(getattr(task, "body", None)) else task.run
    try:
        inspect.signature(body).bind(*payload.get("args", ()), **payload.get("kwargs", {}))
    except TypeError as exc:
        raise ReplayRejected(
            f"the payload no longer fits {task.name!r}'s arguments: {exc}", [letter.id]
        ) from exc
