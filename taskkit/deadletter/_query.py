"""Read-side queries for the shell and scripts: dead letters selected by one set of filters
(list, count, discard, purge them alike) and where a batch is (its ledger counts, rate).

``LetterQuery`` is what ``taskkit dlq list``, ``discard`` and ``purge`` share: the same filters
select the same letters in each, so what ``list`` shows is what ``discard`` or ``purge`` touches.
A command that asks first counts with the query, then acts with ``upto`` set to the newest id
it counted and the store's clock fixed, so a letter recorded while the question was on the
screen is not touched without being counted.

``batch_report`` reads a batch's row and ledger in one connection: counts per status, and how
many items finished in the recent window (the rate; ``updated_at`` of the ledger rows, which a
chunk sets when it marks items done, every ``ledger_flush_every`` items, and at its end).

Example::

    from taskkit.deadletter import DeadLetterStore, LetterQuery, batch_report

    store = DeadLetterStore()
    query = LetterQuery(task="jobs.score_items", error_type="KeyError")
    print(query.count(store), [letter.id for letter in query.letters(store, limit=20)])
    report = batch_report("batch-42")          # None: no such batch
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, delete, func, select, update
from sqlalchemy.orm import Session

from taskkit._utils import fits_row_id
from taskkit.db import get_engine
from taskkit.db.models import Batch, BatchItem, DeadLetter
from taskkit.deadletter._store import STATUSES, DeadLetterStore
from taskkit.errors import ConfigurationError

__all__ = ["BatchReport", "LetterQuery", "batch_report"]

#: Ids per statement: well under SQLite's bound-parameter limit.
_ID_CHUNK = 900


@dataclass(frozen=True)
class LetterQuery:
    """The dead letters matching every filter given (None: no filter on that field).

    ``statuses`` None means any status; ``older_than``/``newer_than`` compare the last failure
    with the store's clock; ``upto`` keeps letters whose id is at most that (what was counted).

    Example::

        query = LetterQuery(batch_id="b-7", statuses=("dead",))
        print(query.count(store))
        query.discard(store)
    """

    task: str | None = None
    batch_id: str | None = None
    error_type: str | None = None
    older_than: timedelta | None = None
    newer_than: timedelta | None = None
    statuses: tuple[str, ...] | None = ("dead",)
    ids: tuple[int, ...] | None = None
    upto: int | None = None

    def __post_init__(self) -> None:
        for status in self.statuses or ():
            if status not in STATUSES:
                raise ConfigurationError(
                    f"unknown dead-letter status {status!r}; one of {STATUSES}"
                )

    def _where(self, now: datetime) -> list[ColumnElement[bool]]:
        where: list[ColumnElement[bool]] = []
        if self.task is not None:
            where.append(DeadLetter.task_name == self.task)
        if self.batch_id is not None:
            where.append(DeadLetter.batch_id == self.batch_id)
        if self.error_type is not None:
            where.append(DeadLetter.error_type == self.error_type)
        if self.older_than is not None:
            where.append(DeadLetter.last_failed_at < now - self.older_than)
        if self.newer_than is not None:
            where.append(DeadLetter.last_failed_at >= now - self.newer_than)
        if self.statuses is not None:
            where.append(DeadLetter.status.in_(self.statuses))
        if self.ids is not None:
            where.append(DeadLetter.id.in_([i for i in self.ids if fits_row_id(i)]))
        if self.upto is not None:
            where.append(DeadLetter.id <= self.upto)
        return where

    def letters(self, store: DeadLetterStore, limit: int | None = None) -> list[DeadLetter]:
        """The matching letters, newest failure first (then newest id)."""
        query = (
            select(DeadLetter)
            .where(*self._where(store.clock()))
            .order_by(DeadLetter.last_failed_at.desc(), DeadLetter.id.desc())
        )
        if limit is not None:
            query = query.limit(limit)
        with Session(store.engine, expire_on_commit=False) as session:
            return list(session.scalars(query))

    def count(self, store: DeadLetterStore) -> int:
        """How many letters match."""
        query = select(func.count()).select_from(DeadLetter).where(*self._where(store.clock()))
        with store.engine.connect() as connection:
            return int(connection.scalar(query) or 0)

    def newest_id(self, store: DeadLetterStore) -> int | None:
        """The largest id among the matching letters (None: none match)."""
        query = select(func.max(DeadLetter.id)).where(*self._where(store.clock()))
        with store.engine.connect() as connection:
            found = connection.scalar(query)
        return None if found is None else int(found)

    def counted(self, store: DeadLetterStore) -> tuple[int, LetterQuery]:
        """``(count, query)``: how many letters match now, and this query bounded to them
        (``upto`` the newest id counted), to act on after asking."""
        newest = self.newest_id(store)
        bounded = replace(self, upto=newest if self.upto is None else min(self.upto, newest or 0))
        if newest is None:
            return 0, bounded
        return bounded.count(store), bounded

    def discard(self, store: DeadLetterStore) -> int:
        """Mark the matching letters ``discarded``; returns how many changed."""
        statement = update(DeadLetter).where(
            *self._where(store.clock()), DeadLetter.status != "discarded"
        )
        with store.engine.begin() as connection:
            return int(connection.execute(statement.values(status="discarded")).rowcount)

    def purge(self, store: DeadLetterStore) -> int:
        """Delete the matching letters for good; returns how many."""
        with store.engine.begin() as connection:
            return int(
                connection.execute(delete(DeadLetter).where(*self._where(store.clock()))).rowcount
            )

    def missing_ids(self, store: DeadLetterStore) -> list[int]:
        """The ``ids`` of this query that no letter has (any status)."""
        if not self.ids:
            return []
        found: set[int] = set()
        wanted = [i for i in dict.fromkeys(self.ids) if fits_row_id(i)]
        with store.engine.connect() as connection:
            for start in range(0, len(wanted), _ID_CHUNK):
                part = wanted[start : start + _ID_CHUNK]
                found.update(
                    connection.scalars(select(DeadLetter.id).where(DeadLetter.id.in_(part)))
                )
        return sorted(set(self.ids) - found)


@dataclass(frozen=True)
class BatchReport:
    """A batch as its row and ledger show it now.

    ``total`` is None for a batch that ``submit_batch`` did not send (a single task's items),
    or one it is still sending from an iterator (its row is written with the last chunk): its
    ledger has rows but no ``batches`` row. ``recent`` items finished (done or dead) in the
    last ``window`` seconds before ``at``.
    """

    batch_id: str
    task_name: str | None
    total: int | None
    chunks: int | None
    created_at: datetime | None
    done: int
    dead: int
    claimed: int
    recent: int
    window: float
    at: datetime
    #: The last time a ledger row of the batch changed (None: no row yet).
    last_change: datetime | None

    @property
    def finished(self) -> int:
        """Items done or dead-lettered."""
        return self.done + self.dead

    @property
    def pending(self) -> int | None:
        """Items not finished (claimed by a running chunk, or not yet claimed); None when the
        total is unknown."""
        return None if self.total is None else max(0, self.total - self.finished)

    @property
    def complete(self) -> bool:
        """Every item of a batch with a known total is done or dead."""
        return self.total is not None and self.finished >= self.total

    @property
    def rate(self) -> float:
        """Items finished per second over the recent window (0.0: none finished in it)."""
        return self.recent / self.window if self.window > 0 else 0.0

    @property
    def eta(self) -> float | None:
        """Seconds until every item is finished at the recent rate; None when it cannot be
        told (unknown total, nothing finished recently), 0.0 when complete."""
        pending = self.pending
        if pending is None:
            return None
        if pending == 0:
            return 0.0
        rate = self.rate
        return None if rate <= 0 else pending / rate

    @property
    def percent(self) -> float | None:
        """0-100; None with an unknown or zero total."""
        if not self.total:
            return None
        return round(min(100.0, 100.0 * self.finished / self.total), 2)

    def record(self) -> dict[str, Any]:
        """JSON data: every field, times in ISO 8601 UTC, and the derived numbers."""
        return {
            "batch_id": self.batch_id,
            "task_name": self.task_name,
            "total": self.total,
            "chunks": self.chunks,
            "created_at": _iso(self.created_at),
            "done": self.done,
            "dead": self.dead,
            "claimed": self.claimed,
            "pending": self.pending,
            "finished": self.finished,
            "percent": self.percent,
            "complete": self.complete,
            "rate": round(self.rate, 3),
            "window_seconds": self.window,
            "eta_seconds": None if self.eta is None else round(self.eta, 1),
            "last_change": _iso(self.last_change),
            "at": _iso(self.at),
        }


def _iso(moment: datetime | None) -> str | None:
    if moment is None:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).isoformat()


def _aware(moment: datetime | None) -> datetime | None:
    if moment is None or moment.tzinfo is not None:
        return moment
    return moment.replace(tzinfo=UTC)


def batch_report(
    batch_id: str,
    database_url: str | None = None,
    *,
    window: float = 60.0,
    now: datetime | None = None,
) -> BatchReport | None:
    """Batch ``batch_id`` now: its row (task, total, chunks) and ledger counts, with the items
    finished in the last ``window`` seconds; None when neither a row nor a ledger row has it.

    Example::

        report = batch_report("batch-42", window=30)
        print(f"{report.finished}/{report.total} at {report.rate:.1f}/s, eta {report.eta}")
    """
    at = now or datetime.now(UTC)
    since = at - timedelta(seconds=window)
    engine = get_engine(database_url)
    with engine.connect() as connection:
        row = connection.execute(
            select(Batch.task_name, Batch.total, Batch.chunks, Batch.created_at).where(
                Batch.id == batch_id
            )
        ).first()
        counts = {
            status: (int(count), last)
            for status, count, last in connection.execute(
                select(BatchItem.status, func.count(), func.max(BatchItem.updated_at))
                .where(BatchItem.batch_id == batch_id)
                .group_by(BatchItem.status)
            )
        }
        recent = connection.scalar(
            select(func.count())
            .select_from(BatchItem)
            .where(
                BatchItem.batch_id == batch_id,
                BatchItem.status.in_(("done", "dead")),
                BatchItem.updated_at > since,
                BatchItem.updated_at <= at,
            )
        )
    if row is None and not counts:
        return None
    changes = [_aware(last) for _, last in counts.values() if last is not None]
    return BatchReport(
        batch_id=batch_id,
        task_name=None if row is None else row.task_name,
        total=None if row is None else int(row.total),
        chunks=None if row is None else int(row.chunks),
        created_at=None if row is None else _aware(row.created_at),
        done=counts.get("done", (0, None))[0],
        dead=counts.get("dead", (0, None))[0],
        claimed=counts.get("claimed", (0, None))[0],
        recent=int(recent or 0),
        window=float(window),
        at=at,
        last_change=max((c for c in changes if c is not None), default=None),
    )
