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

from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any, NamedTuple, cast

from sqlalchemy import Connection, Engine, Table, func, select, update
from sqlalchemy.dialects import postgresql, sqlite

from taskkit.db._recovery import db_retry
from taskkit.db.models import Batch, BatchItem
from taskkit.db.session import get_engine
from taskkit.deadletter import DeadLetterEntry, DeadLetterStore, write_rows

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
        with self.engine.begin() as connection:
            for start in range(0, len(keys), _CHUNK):
                part = list(keys[start : start + _CHUNK])
                _insert_missing(connection, self.batch_id, part, now)
                connection.execute(
                    update(BatchItem)
                    .where(
                        BatchItem.batch_id == self.batch_id,
                        BatchItem.item_key.in_(part),
                        BatchItem.status == "claimed",
                    )
                    .values(claims=BatchItem.claims + 1, updated_at=now)
                )
                rows = connection.execute(
                    select(BatchItem.item_key, BatchItem.status).where(
                        BatchItem.batch_id == self.batch_id,
                        BatchItem.item_key.in_(part),
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
        now = datetime.now(UTC)
        rows = [entry.row() for entry in dead] if record else []
        with self.engine.begin() as connection:
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
        with self.engine.connect() as connection:
            for start in range(0, len(keys), _CHUNK):
                rows = connection.execute(
                    select(BatchItem.item_key, BatchItem.status).where(
                        BatchItem.batch_id == self.batch_id,
                        BatchItem.item_key.in_(list(keys[start : start + _CHUNK])),
                    )
                )
                found.update((key, status) for key, status in rows)
        return found

    def _mark(
        self, connection: Connection, keys: Sequence[str], status: str, now: datetime
    ) -> None:
        for start in range(0, len(keys), _CHUNK):
            connection.execute(
                update(BatchItem)
                .where(
                    BatchItem.batch_id == self.batch_id,
                    BatchItem.item_key.in_(list(keys[start : start + _CHUNK])),
                )
                .values(status=status, updated_at=now)
            )


def _insert_missing(
    connection: Connection, batch_id: str, keys: Iterable[str], now: datetime
) -> None:
    rows = [
        {"batch_id": batch_id, "item_key": key, "status": "claimed", "claims": 0, "updated_at": now}
        for key in keys
    ]
    dialect = connection.dialect.name
    insert: Any
    if dialect == "postgresql":
        insert = postgresql.insert(_TABLE).on_conflict_do_nothing()
    elif dialect == "sqlite":
        insert = sqlite.insert(_TABLE).on_conflict_do_nothing()
    else:  # pragma: no cover - taskkit supports PostgreSQL and SQLite
        insert = _TABLE.insert().prefix_with("IGNORE")
    connection.execute(insert, rows)


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
