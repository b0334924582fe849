"""The batch item ledger: which items of a batch are claimed, done, or dead-lettered.

A ``BatchTask`` claims all the items of its chunk before it runs any (one transaction), marks
the ones that succeed ``done`` every few hundred items (one statement), and at the end marks
the failed ones ``dead`` in the same transaction that stores their dead letters. A chunk that
is delivered again, after its worker died or after a retry, claims again: what is ``done`` or
``dead`` is skipped, so successful + dead-lettered = total and an item runs again only if its
worker died between running it and the next flush (the item function must be idempotent per
key; taskkit's ``Prediction`` rows are unique per item key for that reason).

Decisions: rows are keyed by (batch id, item key) with no surrogate id; a claim inserts the
missing rows with ``ON CONFLICT DO NOTHING`` first and reads afterwards, so on SQLite the
transaction takes the write lock at once (a read that later wants to write cannot wait for the
lock, it fails); ``claims`` counts how many deliveries claimed an item, which shows the items
that were in flight when a worker died. Writes are retried on transient database errors.

Example::

    ledger = ItemLedger("batch-42", engine)
    finished = ledger.claim(["a", "b", "c"])       # {"b": "done"} on a redelivery
    ledger.finish(done=["a", "c"])
    batch_progress("batch-42")                      # BatchProgress(total=None, done=3, ...)
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import NamedTuple, cast

from sqlalchemy import (
    Connection,
    Engine,
    String,
    Table,
    any_,
    func,
    literal,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.sql.elements import ColumnElement

from taskkit.db import db_retry, get_engine
from taskkit.db.models import Batch, BatchItem
from taskkit.deadletter._store import DeadLetterEntry, DeadLetterStore, write_rows
from taskkit.errors import ConfigurationError

__all__ = ["BatchProgress", "ItemLedger", "batch_progress"]

_TABLE = cast(Table, BatchItem.__table__)
#: Keys per statement: well under SQLite's bound-parameter limit.
_CHUNK = 900


class BatchProgress(NamedTuple):
    """Where a batch is, from its ledger. ``total`` is known for batches sent by
    ``submit_batch``; ``pending`` counts items not yet claimed."""

    batch_id: str
    total: int | None
    done: int
    dead: int
    claimed: int

    @property
    def finished(self) -> int:
        """Items done or dead-lettered."""
        return self.done + self.dead

    @property
    def pending(self) -> int | None:
        """Items not yet claimed by any chunk (None when the total is unknown)."""
        return None if self.total is None else self.total - self.done - self.dead - self.claimed


class ItemLedger:
    """The ledger rows of one batch (``batch_id``) in the database of ``engine``.

    Example::

        ledger = ItemLedger("batch-42", get_engine())
        skip = ledger.claim(keys)
    """

    def __init__(self, batch_id: str, engine: Engine | None = None) -> None:
        if not batch_id or len(batch_id) > 64:
            raise ValueError(f"batch id must be 1 to 64 characters, not {batch_id!r}")
        self.batch_id = batch_id
        self.engine = engine if engine is not None else get_engine()
        #: Done keys written by ``durable=False`` finishes since the last durable one (a
        #: PostgreSQL crash could lose them; the next durable finish writes them again).
        self._unsure: list[str] = []
        #: A ``durable=False`` claim was made (a crash could lose its rows).
        self._unsure_claim = False

    @db_retry(max_attempts=5)
    def claim(self, keys: Sequence[str], *, durable: bool = True) -> dict[str, str]:
        """Claim ``keys`` for this delivery; returns ``{key: "done" | "dead"}`` for the keys
        already finished (skip them). Every other key is now claimed.

        ``durable=False``: on PostgreSQL the claim commits without waiting for its WAL flush
        (``synchronous_commit = off``); a crash of the server itself (not of a worker) may lose
        it, and the next durable ``finish`` of this ledger object writes the rows it needs
        anyway. Elsewhere it changes nothing."""
        now = datetime.now(UTC)
        finished: dict[str, str] = {}
        with _transaction(self.engine, durable=durable) as connection:
            if not durable and connection.dialect.name == "postgresql":
                self._unsure_claim = True
            for part in _parts(connection, keys):
                inserted = _insert_missing(connection, self.batch_id, part, now)
                if len(inserted) == len(part):
                    continue  # the first delivery: nothing else to read or count
                existing = [key for key in part if key not in inserted]
                connection.execute(
                    update(BatchItem)
                    .where(
                        BatchItem.batch_id == self.batch_id,
                        _among(connection, existing),
                        BatchItem.status == "claimed",
                    )
                    .values(claims=BatchItem.claims + 1, updated_at=now)
                )
                rows = connection.execute(
                    select(BatchItem.item_key, BatchItem.status).where(
                        BatchItem.batch_id == self.batch_id,
                        _among(connection, existing),
                        BatchItem.status != "claimed",
                    )
                )
                finished.update((key, status) for key, status in rows)
        return finished

    @db_retry(max_attempts=5)
    def finish(
        self,
        done: Sequence[str] = (),
        dead: Sequence[DeadLetterEntry] = (),
        *,
        store: DeadLetterStore | None = None,
        record: bool = True,
        durable: bool = True,
    ) -> None:
        """In one transaction: mark ``done`` keys done, mark the keys of the ``dead`` entries
        dead and (``record``) store the entries as dead letters; then publish them through
        ``store`` (its broker queue, if set).

        ``durable=False`` (``done`` keys only): on PostgreSQL the marks commit without waiting
        for their WAL flush; a worker that dies keeps them (the server has them), a crash of
        the server within its WAL writer's delay may lose them. Such keys are remembered and
        written again by this object's next durable finish, whose commit flushes the WAL up to
        itself: it checks that they are still there (one read) and writes those a crash lost
        again, so a chunk whose last finish returned has all its marks stored. Example::

            ledger.finish(done=keys[:500], durable=False)   # mid-chunk flush
            ledger.finish(done=keys[500:])                  # the chunk's end: durable
        """
        if not durable and dead:
            raise ConfigurationError("dead items are always written durably (durable=True)")
        if not done and not dead and not (durable and self._unsure):
            if durable:
                self._unsure_claim = False  # nothing to write: the claim alone may be lost
            return
        keyless = [entry.task_name for entry in dead if entry.item_key is None]
        if keyless:  # str(None) would mark an item named "None" dead
            raise ConfigurationError(
                f"a dead item of batch {self.batch_id!r} has no item_key ({keyless[0]})"
            )
        now = datetime.now(UTC)
        rows = [entry.row() for entry in dead] if record else []
        with _transaction(self.engine, durable=durable) as connection:
            postgres = connection.dialect.name == "postgresql"
            if not durable and postgres:
                self._mark(connection, done, "done", now)
                unsure: list[str] = list(done)
            elif postgres and (self._unsure or self._unsure_claim):
                # This commit flushes the WAL up to itself, so the earlier writes that are still
                # there become durable with it; those a crash of the server lost (not done, no
                # row) are written again, in this transaction.
                marked = self._mark(connection, done, "done", now)
                sure_of = set(self._unsure)
                if marked < len(done) or _count_done(connection, self.batch_id, sure_of) < len(
                    sure_of
                ):
                    _upsert_done(connection, self.batch_id, list(sure_of.union(done)), now)
            else:
                self._mark(connection, done, "done", now)
            if dead:
                dead_keys = [str(entry.item_key) for entry in dead]
                _insert_missing(connection, self.batch_id, dead_keys, now)
                self._mark(connection, dead_keys, "dead", now)
            if rows:
                write_rows(connection, rows)
        if durable:
            self._unsure.clear()
            self._unsure_claim = False
        elif postgres:
            self._unsure.extend(unsure)  # committed (not flushed): written again when durable
        if store is not None and rows:
            store.publish(rows)

    def statuses(self, keys: Sequence[str]) -> dict[str, str]:
        """``{key: status}`` of the keys that have a ledger row."""
        found: dict[str, str] = {}
        with _transaction(self.engine) as connection:
            for part in _parts(connection, keys):
                rows = connection.execute(
                    select(BatchItem.item_key, BatchItem.status).where(
                        BatchItem.batch_id == self.batch_id, _among(connection, part)
                    )
                )
                found.update((key, status) for key, status in rows)
        return found

    def _mark(self, connection: Connection, keys: Sequence[str], status: str, now: datetime) -> int:
        """Set the status of ``keys``; the number of rows found."""
        found = 0
        for part in _parts(connection, keys):
            found += connection.execute(
                update(BatchItem)
                .where(BatchItem.batch_id == self.batch_id, _among(connection, part))
                .values(status=status, updated_at=now)
            ).rowcount
        return found


@contextmanager
def _transaction(engine: Engine, *, durable: bool = True) -> Iterator[Connection]:
    """A transaction for ledger statements. On PostgreSQL, plans are made for each statement's
    keys: psycopg prepares a statement after 5 runs, and PostgreSQL's generic plan for
    ``item_key = ANY($2)`` made the ledger's writes 1.7x slower. Not ``durable``: the commit
    does not wait for the WAL flush (one fsync, the larger part of a mid-chunk write)."""
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            settings = "SET LOCAL plan_cache_mode = force_custom_plan"
            if not durable:
                settings += "; SET LOCAL synchronous_commit = off"
            connection.exec_driver_sql(settings)
        yield connection


def _parts(connection: Connection, keys: Sequence[str]) -> Iterator[list[str]]:
    """``keys`` in statement-sized parts: all at once as one array on PostgreSQL, a few
    hundred bound parameters elsewhere."""
    size = len(keys) if connection.dialect.name == "postgresql" else _CHUNK
    for start in range(0, len(keys), max(size, 1)):
        yield list(keys[start : start + size])


def _among(connection: Connection, keys: list[str]) -> ColumnElement[bool]:
    """``item_key`` is one of ``keys``: ``= ANY(array)`` on PostgreSQL (one parameter, however
    many keys), ``IN (...)`` elsewhere."""
    if connection.dialect.name == "postgresql":
        return BatchItem.item_key == any_(literal(keys, postgresql.ARRAY(String)))
    return BatchItem.item_key.in_(keys)


def _insert_missing(
    connection: Connection, batch_id: str, keys: list[str], now: datetime
) -> set[str]:
    """Insert a claimed row for each key that has none; returns the keys inserted."""
    if not keys:
        return set()
    if connection.dialect.name == "postgresql":
        # One statement over an array: executemany would send a statement per row.
        inserted = connection.scalars(
            text(
                "INSERT INTO batch_items (batch_id, item_key, status, claims, updated_at) "
                "SELECT :batch_id, k, 'claimed', 1, :now "
                "FROM unnest(CAST(:keys AS VARCHAR[])) AS k "
                "ON CONFLICT DO NOTHING RETURNING item_key"
            ),
            {"batch_id": batch_id, "now": now, "keys": keys},
        )
        return set(inserted)
    rows = [
        {"batch_id": batch_id, "item_key": key, "status": "claimed", "claims": 1, "updated_at": now}
        for key in keys
    ]
    statement = sqlite.insert(_TABLE).on_conflict_do_nothing().returning(_TABLE.c.item_key)
    return set(connection.scalars(statement, rows))


def _count_done(connection: Connection, batch_id: str, keys: set[str]) -> int:
    """PostgreSQL: how many of ``keys`` are done."""
    if not keys:
        return 0
    return int(
        connection.scalar(
            select(func.count()).where(
                BatchItem.batch_id == batch_id,
                _among(connection, list(keys)),
                BatchItem.status == "done",
            )
        )
        or 0
    )


def _upsert_done(connection: Connection, batch_id: str, keys: list[str], now: datetime) -> None:
    """PostgreSQL: every key ``done``, its row inserted if it has none (one statement); rows
    already done are not written again."""
    if not keys:
        return
    connection.execute(
        text(
            "INSERT INTO batch_items AS b (batch_id, item_key, status, claims, updated_at) "
            "SELECT :batch_id, k, 'done', 1, :now FROM unnest(CAST(:keys AS VARCHAR[])) AS k "
            "ON CONFLICT (batch_id, item_key) DO UPDATE SET status = 'done', "
            "updated_at = EXCLUDED.updated_at WHERE b.status <> 'done'"
        ),
        {"batch_id": batch_id, "now": now, "keys": keys},
    )


def batch_progress(batch_id: str, database_url: str | None = None) -> BatchProgress:
    """Counts of a batch's ledger: done, dead, claimed (and the total, if ``submit_batch`` sent
    it). Cheap enough to poll.

    Example::

        progress = batch_progress(submission.batch_id)
        print(f"{progress.finished}/{progress.total}")
    """
    engine = get_engine(database_url)
    with engine.connect() as connection:
        counts = dict(
            connection.execute(
                select(BatchItem.status, func.count())
                .where(BatchItem.batch_id == batch_id)
                .group_by(BatchItem.status)
            ).all()
        )
        total = connection.scalar(select(Batch.total).where(Batch.id == batch_id))
    return BatchProgress(
        batch_id,
        None if total is None else int(total),
        int(counts.get("done", 0)),
        int(counts.get("dead", 0)),
        int(counts.get("claimed", 0)),
    )
