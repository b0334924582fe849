"""``DeadLetterStore``: the ``dead_letters`` table: record, list, count, mark, discard, purge.

Recording is an upsert on (task, batch, item) for items and on (task, task id) for whole
tasks, so an item or a task that fails again after a crash updates its letter instead of adding
a second one. Every letter stored is one WARNING log record (``taskkit_event="dead_letter"``)
and, while someone listens, a ``DeadLettered`` event on ``taskkit.recovery.events``. Sending
letters again is ``taskkit.tasks.replay_dead_letters``; this module selects and marks them and
imports no Celery.
"""

from __future__ import annotations

import builtins
import logging
import traceback as tb
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple, cast

from sqlalchemy import Connection, Engine, Table, delete, func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import OperationalError, ProgrammingError
from sqlalchemy.orm import Session
from sqlalchemy.sql import Select

from taskkit._utils import fits_row_id
from taskkit.config import get_settings
from taskkit.db import db_retry, get_engine
from taskkit.db.classify import describe_database, sqlstate
from taskkit.db.models import DeadLetter
from taskkit.deadletter._json import jsonable
from taskkit.deadletter._publish import publish_letters
from taskkit.errors import ConfigurationError, DeadLetterNotFound, ReplayRejected
from taskkit.recovery import events

__all__ = [
    "STATUSES",
    "DeadLetterEntry",
    "DeadLetterStore",
    "ReplayResult",
    "SentReplay",
    "write_rows",
]

logger = logging.getLogger("taskkit.deadletter")

#: The states of a letter: waiting, sent again, put aside for the record.
STATUSES = ("dead", "replayed", "discarded")
_TABLE = cast(Table, DeadLetter.__table__)


def _letter_ids(ids: Sequence[int]) -> list[int]:
    """``ids`` as ints; ``DeadLetterNotFound`` at once for those no row can have."""
    wanted = [int(i) for i in ids]
    impossible = sorted(i for i in wanted if not fits_row_id(i))
    if impossible:
        raise DeadLetterNotFound(impossible)
    return wanted


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
        store.discard([7])
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
        """Announce letters just stored (``DeadLetterEntry.row()`` dicts, once committed): one
        log record and one ``DeadLettered`` event each; then publish them to the dead-letter
        broker queue, if one is set (failures are logged, never raised)."""
        _announce(rows)
        if self.queue and rows:
            publish_letters(self.app, self.queue, rows)

    # -- reading --------------------------------------------------------------------------------

    def get(self, letter_id: int) -> DeadLetter:
        """The letter with this id; ``DeadLetterNotFound`` if there is none."""
        with Session(self.engine, expire_on_commit=False) as session:
            letter = session.get(DeadLetter, letter_id) if fits_row_id(int(letter_id)) else None
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
        newest_first: bool = False,
        before_id: int | None = None,
    ) -> list[DeadLetter]:
        """Letters matching every filter given, oldest failure first. ``status=None``: any.

        ``older_than``/``newer_than`` compare the last failure with now. ``newest_first``
        orders by id, newest letter first, and ``before_id`` keeps only letters with a smaller
        id: cursor paging (the HTTP service's ``GET /dead-letters``), stable while letters are
        added.
        """
        query = self._select(task, batch_id, error_type, older_than, newer_than, status, ids)
        if before_id is not None:
            query = query.where(DeadLetter.id < before_id)
        if newest_first or before_id is not None:
            query = query.order_by(DeadLetter.id.desc())
        else:
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

    # -- replay (``taskkit.tasks.replay_dead_letters`` sends; the store selects and marks) ------

    @contextmanager
    def letters_for_replay(
        self,
        ids: Sequence[int] | None = None,
        *,
        task: str | None = None,
        batch_id: str | None = None,
        error_type: str | None = None,
        older_than: timedelta | None = None,
    ) -> Iterator[tuple[Session, builtins.list[DeadLetter]]]:
        """The waiting letters with these ``ids`` (or matching the filters), locked in a
        transaction that commits when the block ends; mark them with ``mark_replayed`` inside it.

        ``DeadLetterNotFound`` for an unknown id, ``ReplayRejected`` for a letter that is not
        waiting; both before anything is yielded.
        """
        with Session(self._writer(), expire_on_commit=False) as session, session.begin():
            if ids is not None:
                wanted = _letter_ids(ids)
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
            yield session, letters

    def _writer(self) -> Engine:
        """The engine for a transaction that reads, then writes: on SQLite it takes the write
        lock at BEGIN (and so also serialises two replays, which ``FOR UPDATE`` cannot there)."""
        if self.engine.dialect.name == "sqlite":
            return self.engine.execution_options(taskkit_sqlite_begin="BEGIN IMMEDIATE")
        return self.engine

    def mark_replayed(self, sent: Sequence[SentReplay], session: Session | None = None) -> None:
        """Mark the letters of each message ``replayed`` (in ``session``'s transaction if given,
        else in one of their own)."""
        if session is None:
            with Session(self._writer()) as own, own.begin():
                self.mark_replayed(sent, own)
            return
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
        wanted = _letter_ids(ids)
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
                wanted = _letter_ids(ids)
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
            query = query.where(DeadLetter.id.in_([i for i in map(int, ids) if fits_row_id(i)]))
        return query


def _announce(rows: Sequence[dict[str, Any]]) -> None:
    """One log record per stored letter, and its ``DeadLettered`` event while someone listens."""
    observed = events.active()
    for row in rows:
        letter_id = row.get("id")
        logger.warning(
            "taskkit: dead letter %s stored: %s%s%s failed with %s after %d attempt(s)",
            letter_id if letter_id is not None else "(no id)",
            row["task_name"],
            "" if row["task_id"] is None else f"[{row['task_id']}]",
            ""
            if row["item_key"] is None
            else f" item {row['item_key']!r} of batch {row['batch_id']}",
            row["error_type"],
            row["attempts"],
            extra={
                "taskkit_event": "dead_letter",
                "attempt": row["attempts"],
                "layer": None,
                "task": row["task_name"],
                "task_id": row["task_id"],
            },
        )
        if observed:
            events.emit(
                events.DeadLettered(
                    row["task_name"],
                    letter_id,
                    row["error_type"],
                    task_id=row["task_id"],
                    batch_id=row["batch_id"],
                    item_key=row["item_key"],
                )
            )


def write_rows(connection: Connection, rows: list[dict[str, Any]]) -> None:
    """Upsert letters: an item on (task, batch, item key), a whole task on (task, task id). A
    repeat adds its attempts and moves the last failure; a letter that was replayed or
    discarded is dead again. In the caller's transaction.

    Decision: a whole task's letter has no batch and no item key (NULL), and SQL unique
    constraints treat NULLs as distinct, so the table's constraint never merges two failures of
    one task; every redelivered failure was a new letter, and replaying them all ran the task
    once per copy. Rather than a sentinel in those columns (which every reader would have to
    know about) or a schema change, a whole task's letter is keyed by its task id here: an
    update of the letter with that task id, else an insert, under a lock on that key
    (PostgreSQL: a transaction advisory lock; SQLite: its single writer). A failure without a
    task id (recorded by hand) has nothing to merge on and stays a letter of its own.

    Example::

        with engine.begin() as connection:
            write_rows(connection, [entry.row() for entry in entries])
    """
    whole = [row for row in rows if _whole_task(row)]
    if whole:
        _write_whole_tasks(connection, whole)
        rows = [row for row in rows if not _whole_task(row)]
        if not rows:
            return
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


def _whole_task(row: dict[str, Any]) -> bool:
    return row["batch_id"] is None and row["item_key"] is None and row["task_id"] is not None


def _write_whole_tasks(connection: Connection, rows: list[dict[str, Any]]) -> None:
    """Upsert the letters of whole tasks on (task name, task id); see ``write_rows``."""
    for row in rows:
        key = (row["task_name"], row["task_id"])
        if connection.dialect.name == "postgresql":
            # Two failures of one task id at once: the second waits for the first's commit.
            connection.execute(
                select(func.pg_advisory_xact_lock(func.hashtextextended(f"{key!r}", 0)))
            )
        letter_id = connection.scalar(
            update(DeadLetter)
            .where(
                DeadLetter.task_name == row["task_name"],
                DeadLetter.task_id == row["task_id"],
                DeadLetter.batch_id.is_(None),
                DeadLetter.item_key.is_(None),
            )
            .values(
                attempts=DeadLetter.attempts + row["attempts"],
                last_failed_at=row["last_failed_at"],
                error_type=row["error_type"],
                error_message=row["error_message"],
                traceback=row["traceback"],
                payload=row["payload"],
                status="dead",
            )
            .returning(DeadLetter.id)
        )
        if letter_id is None:
            letter_id = connection.scalar(_TABLE.insert().values(row).returning(_TABLE.c.id))
        row["id"] = letter_id


def _missing_table(error: BaseException) -> bool:
    """A database that was never migrated: SQLite's "no such table", PostgreSQL's 42P01."""
    return sqlstate(error) == "42P01" or "no such table" in str(error)


def _check_status(status: str) -> None:
    if status not in STATUSES:
        raise ConfigurationError(f"unknown dead-letter status {status!r}; one of {STATUSES}")


def _locked(query: Select[Any]) -> Select[Any]:
    # Two replays of the same letters at once: the second waits, then sees them replayed.
    return query.with_for_update()
