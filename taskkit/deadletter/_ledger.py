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

    @db_retry(max_attempts=5)
    def claim(self, keys: Sequence[str]) -> dict[str, str]:
        """Claim ``keys`` for this delivery; returns ``{key: "done" | "dead"}`` for the keys
        already finished (skip them). Every other key is now claimed."""
        now = datetime.now(UTC)
        finished: dict[str, str] = {}
        with _transaction(self.engine) as connection:
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
    ) -> None:
        """In one transaction: mark ``done`` keys done, mark the keys of the ``dead`` entries
        dead and (``record``) store the entries as dead letters; then publish them through
        ``store`` (its broker queue, if set)."""
        if not done and not dead:
            return
        keyless = [entry.task_name for entry in dead if entry.item_key is None]
        if keyless:  # str(None) would mark an item named "None" dead
            raise ConfigurationError(
                f"a dead item of batch {self.batch_id!r} has no item_key ({keyless[0]})"
            )
        now = datetime.now(UTC)
        rows = [entry.row() for entry in dead] if record else []
        with _transaction(self.engine) as connection:
            self._mark(connection, done, "done", now)
            if dead:
                dead_keys = [str(entry.item_key) for entry in dead]
                _insert_missing(connection, self.batch_id, dead_keys, now)
                self._mark(connection, dead_keys, "dead", now)
            if rows:
                write_rows(connection, rows)
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

    def _mark(
        self, connection: Connection, keys: Sequence[str], status: str, now: datetime
    ) -> None:
        for part in _parts(connection, keys):
            connection.execute(
                update(BatchItem)
                .where(BatchItem.batch_id == self.batch_id, _among(connection, part))
                .values(status=status, updated_at=now)
            )


@contextmanager
def _transaction(engine: Engine) -> Iterator[Connection]:
    """A transaction for ledger statements. On PostgreSQL, plans are made for each statement's
    keys: psycopg prepares a statement after 5 runs, and PostgreSQL's generic plan for
    ``item_key = ANY($2)`` made the ledger's writes 1.7x slower."""
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.exec_driver_sql("SET LOCAL plan_cache_mode = force_custom_plan")
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
