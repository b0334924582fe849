"""The batch item ledger: which items of a batch are claimed, done, or dead-lettered.

A ``BatchTask`` delivery claims its chunk (one row of ``batch_chunks``, however many items:
the chunk's keys once and a ``0``/``1`` flag per position for done and dead), writes the done
flags every few hundred items (one statement updating that row), and at the end writes the
dead flags in the same transaction that stores their dead letters. A chunk delivered again,
after its worker died or after a retry, claims the same row (it is keyed by the batch and the
sha256 of its keys, which its message fixes): what is ``done`` or ``dead`` is skipped, so
successful + dead-lettered = total and an item runs again only if its worker died between
running it and the next flush (the item function must be idempotent per key).

Decisions: one row per chunk, not per item (issue 18): a chunk of 1,000 items made 1,000 rows
twice (claimed, then done), ~5 ms of server time against ~1 ms for the chunk's own messaging.
The flags are merged, never overwritten (``|`` of bit strings on PostgreSQL), so a stale writer
cannot unset what another delivery finished. A claim made under the chunk's lease (``fenced``)
also fences the chunk: ``claims`` counts its claims, and that claim's writes land only while no
later claim came, checked in the write's own statement (a stale delivery, on a host that was cut
off while another took its chunk over, would otherwise set dead flags over the new holder's done
ones, and add its letters). Keys finished outside the claimed chunk (an API caller's own keys)
get per-item rows in ``batch_item_rows``, where the rows of the old ledger live too; the view
``batch_items`` shows both, one row per item, and a chunk claimed while old rows of its batch
exist moves their flags into its row. Writes are retried on transient errors.

Cost on PostgreSQL (issue 18): used as a context manager (``with ItemLedger(...) as ledger``, as
``BatchTask`` does for each chunk), the ledger's one-statement writes go to a connection the
thread keeps between chunks, not a pool checkout (and its ping) per statement; only the claim
sends the chunk's keys (stored lz4-compressed, migration 0012), the writes after it update the
flags alone and write the row whole only if a crash of the server lost the claim. A chunk costs
three round trips: the claim, a flush every ``ledger_flush_every`` items (no WAL flush awaited)
and the durable end.

Example::

    ledger = ItemLedger("batch-42", engine)
    finished = ledger.claim(["a", "b", "c"])       # {"b": "done"} on a redelivery
    ledger.finish(done=["a", "c"])
    batch_progress("batch-42")                      # BatchProgress(total=None, done=3, ...)
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from types import TracebackType
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
from sqlalchemy.exc import DBAPIError
from sqlalchemy.sql.elements import ColumnElement, TextClause

from taskkit.db import db_retry, get_engine
from taskkit.db.models import Batch, BatchChunk, BatchItem, BatchItemRow
from taskkit.deadletter._store import DeadLetterEntry, DeadLetterStore, write_rows
from taskkit.errors import ConfigurationError, LeaseLost

__all__ = ["BatchProgress", "ItemLedger", "batch_progress"]

logger = logging.getLogger("taskkit.deadletter")

_TABLE = cast(Table, BatchItemRow.__table__)
_CHUNKS = cast(Table, BatchChunk.__table__)
#: Keys per statement: well under SQLite's bound-parameter limit.
_CHUNK = 900
#: The control characters, deleted by ``str.translate`` (see ``_keys_json``).
_CONTROL = dict.fromkeys(range(32))


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
    """The ledger of one batch (``batch_id``) in the database of ``engine``; after ``claim``,
    of the chunk of the claimed keys.

    Example::

        with ItemLedger("batch-42", get_engine()) as ledger:   # one connection for the chunk
            skip = ledger.claim(keys)
            ledger.finish(done=[key for key in keys if key not in skip])
    """

    def __init__(self, batch_id: str, engine: Engine | None = None) -> None:
        if not batch_id or len(batch_id) > 64:
            raise ValueError(f"batch id must be 1 to 64 characters, not {batch_id!r}")
        self.batch_id = batch_id
        self.engine = engine if engine is not None else get_engine()
        #: The claimed chunk: its id, its keys' JSON, each key's position, and its flags as
        #: this object knows them (those read by the claim, then those it finished).
        self._chunk: str | None = None
        self._keys_json = ""
        self._keys: list[str] = []
        self._positions: dict[str, int] | None = None
        self._done: bytearray = bytearray()
        self._dead: bytearray = bytearray()
        #: The chunk's claim count after this object's claim, when the claim is ``fenced``.
        self._fence: int | None = None
        #: The chunk's row is known to exist: later writes send its flags, not its keys.
        self._stored = False
        #: PostgreSQL, inside ``with``: statements go to this thread's kept connection.
        self._holding = False

    def __enter__(self) -> ItemLedger:
        """Inside the block, the ledger's one-statement writes use this thread's kept
        connection (PostgreSQL; elsewhere nothing changes): no pool checkout, ping and return
        per statement or per chunk. See ``_kept_connection``."""
        self._holding = self.engine.dialect.name == "postgresql"
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self._holding = False

    @contextmanager
    def _statement(self, *, durable: bool = True) -> Iterator[Connection]:
        """The connection for one ledger statement: the kept one inside ``with``, else one
        from the pool (``_statement`` below)."""
        if not self._holding:
            with _statement(self.engine, durable=durable) as connection:
                yield connection
            return
        connection = _kept_connection(self.engine)
        try:
            yield connection
        except DBAPIError:
            _drop_kept(connection)  # the retry (db_retry) connects again
            raise

    def _key_positions(self) -> dict[str, int]:
        if self._positions is None:
            self._positions = {key: position for position, key in enumerate(self._keys)}
        return self._positions

    @db_retry(max_attempts=5)
    def claim(
        self, keys: Sequence[str], *, durable: bool = True, fenced: bool = False
    ) -> dict[str, str]:
        """Claim the chunk of ``keys`` (in this order) for this delivery; returns
        ``{key: "done" | "dead"}`` for the keys already finished (skip them).

        One statement: the chunk's row is inserted, or its claims counted. ``durable=False``:
        on PostgreSQL the claim commits without waiting for its WAL flush; a crash of the
        server itself may lose it, and every ``finish`` of this object writes the whole row
        again if it is missing.

        ``fenced``: this claim is the chunk's only live one (its caller holds the chunk's
        lease), and a later claim means another delivery took the chunk over. Every ``finish``
        of this object then lands only while the chunk's claim count is still this claim's, in
        the same statement: otherwise it writes nothing (neither flags nor dead letters), logs
        one error and raises ``LeaseLost``. A write that sat in a cut-off host's connection is
        refused where it lands. Example::

            finished = ledger.claim(keys, fenced=True)
            ledger.finish(done=keys)          # LeaseLost if another delivery claimed since
        """
        keys = [str(key) for key in keys]
        if len(set(keys)) != len(keys):
            raise ConfigurationError(f"repeated keys in a chunk of batch {self.batch_id!r}")
        keys_json = _keys_json(keys)
        chunk = hashlib.sha256(keys_json.encode()).hexdigest()
        now = datetime.now(UTC)
        zeros = "0" * len(keys)
        with self._statement(durable=durable) as connection:
            row = connection.execute(
                _sql(
                    "INSERT INTO batch_chunks AS c (batch_id, chunk, keys, size, done, dead, "
                    "claims, updated_at) VALUES (:batch_id, :chunk, :keys, :size, :zeros, "
                    ":zeros, 1, :now) ON CONFLICT (batch_id, chunk) DO UPDATE SET "
                    "claims = c.claims + 1, updated_at = excluded.updated_at "
                    "RETURNING done, dead, EXISTS (SELECT 1 FROM batch_item_rows r "
                    f"WHERE r.batch_id = :batch_id), claims{_asynchronous(connection, durable)}"
                ),
                {
                    "batch_id": self.batch_id,
                    "chunk": chunk,
                    "keys": keys_json,
                    "size": len(keys),
                    "zeros": zeros,
                    "now": now,
                },
            ).one()
        done, dead = bytearray(row[0].encode()), bytearray(row[1].encode())
        if row[2]:  # rows of the old ledger (or of loose keys): move them into the chunk
            with _transaction(self.engine) as connection:
                moved = _take_rows(connection, self.batch_id, keys)
                if moved:
                    for position, key in enumerate(keys):
                        status = moved.get(key)
                        if status == "done":
                            done[position] = ord("1")
                        elif status == "dead":
                            dead[position] = ord("1")
                    _write_flags(connection, self.batch_id, chunk, keys_json, done, dead, now)
        self._chunk, self._keys_json, self._stored = chunk, keys_json, True
        self._keys, self._positions = keys, None  # positions: on the first finish by key
        self._done, self._dead = done, dead
        self._fence = int(row[3]) if fenced else None
        finished: dict[str, str] = {}
        if b"1" in done or b"1" in dead:  # a first delivery finds nothing: skip the walk
            for position, key in enumerate(keys):
                if dead[position] == ord("1"):
                    finished[key] = "dead"
                elif done[position] == ord("1"):
                    finished[key] = "done"
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
        done_at: Sequence[int] = (),
    ) -> None:
        """In one transaction: mark ``done`` keys (and the keys at positions ``done_at`` of the
        claimed chunk: cheaper than naming them) done, mark the keys of the ``dead`` entries
        dead and (``record``) store the entries as dead letters; then publish them through
        ``store`` (its broker queue, if set).

        Keys of the claimed chunk are flags of its row, written in one statement that merges
        every flag this object knows with those stored (and writes the row again if a crash of
        the server lost it); other keys get rows of their own in ``batch_item_rows``.

        ``durable=False`` (``done`` keys only): on PostgreSQL the write commits without waiting
        for its WAL flush; a worker that dies keeps it (the server has it), a crash of the
        server within its WAL writer's delay may lose it, and the next durable finish writes
        all of this object's flags again, so a chunk whose last finish returned has all its
        marks stored. After a ``fenced`` claim, ``LeaseLost`` (nothing written) once another
        delivery has claimed the chunk. Example::

            ledger.finish(done=keys[:500], durable=False)   # mid-chunk flush
            ledger.finish(done=keys[500:])                  # the chunk's end: durable
        """
        if not durable and dead:
            raise ConfigurationError("dead items are always written durably (durable=True)")
        keyless = [entry.task_name for entry in dead if entry.item_key is None]
        if keyless:  # str(None) would mark an item named "None" dead
            raise ConfigurationError(
                f"a dead item of batch {self.batch_id!r} has no item_key ({keyless[0]})"
            )
        in_chunk = self._chunk is not None
        if done_at and not in_chunk:
            raise ConfigurationError("done_at names positions of a claimed chunk: claim it first")
        if not (done or dead or done_at) and not (durable and in_chunk and b"1" in self._done):
            return
        now = datetime.now(UTC)
        rows = [entry.row() for entry in dead] if record else []
        done_flags, dead_flags = bytearray(self._done), bytearray(self._dead)
        for at in done_at:
            done_flags[at] = 49  # ord("1")
        positions = self._key_positions() if done or dead else {}
        loose_done: list[str] = []
        loose_dead: list[str] = []
        for key in done:
            position = positions.get(key)
            if position is None:
                loose_done.append(key)
            else:
                done_flags[position] = ord("1")
        for entry in dead:
            key = str(entry.item_key)
            position = positions.get(key)
            if position is None:
                loose_dead.append(key)
            else:
                dead_flags[position] = ord("1")
                done_flags[position] = ord("0")
        alone = not (loose_done or loose_dead or rows)  # one statement: no transaction needed
        scope = (
            self._statement(durable=durable)
            if alone
            else _transaction(self.engine, durable=durable)
        )
        with scope as connection:
            if self._chunk is not None and not _write_flags(
                connection,
                self.batch_id,
                self._chunk,
                self._keys_json,
                done_flags,
                dead_flags,
                now,
                durable=durable,
                fence=self._fence,
                stored=self._stored,
            ):
                raise self._refused(len(done) + len(done_at), len(dead))
            if loose_done:
                _insert_missing(connection, self.batch_id, loose_done, now)
                _mark(connection, self.batch_id, loose_done, "done", now)
            if loose_dead:
                _insert_missing(connection, self.batch_id, loose_dead, now)
                _mark(connection, self.batch_id, loose_dead, "dead", now)
            if rows:
                write_rows(connection, rows)
        self._done, self._dead = done_flags, dead_flags
        if store is not None and rows:
            store.publish(rows)

    def _refused(self, done: int, dead: int) -> LeaseLost:
        """The ``LeaseLost`` of a write refused by the fence (logged once, as an error)."""
        assert self._chunk is not None
        assert self._fence is not None
        logger.error(
            "taskkit: batch %s chunk %s: a ledger write (%d done, %d dead) refused: a newer "
            "delivery claimed the chunk (claim %d is stale); this delivery stops",
            self.batch_id,
            self._chunk[:12],
            done,
            dead,
            self._fence,
        )
        return LeaseLost(f"batch {self.batch_id} chunk {self._chunk[:12]}", self._fence)

    def statuses(self, keys: Sequence[str]) -> dict[str, str]:
        """``{key: status}`` of the keys the ledger knows (claimed, done or dead)."""
        found: dict[str, str] = {}
        with _transaction(self.engine) as connection:
            for part in _parts(connection, keys):
                rows = connection.execute(
                    select(BatchItem.item_key, BatchItem.status).where(
                        BatchItem.batch_id == self.batch_id, BatchItem.item_key.in_(part)
                    )
                )
                for key, status in rows:
                    if found.get(key) not in ("done", "dead"):
                        found[key] = status
        return found


def _keys_json(keys: list[str]) -> str:
    """``json.dumps(keys, separators=(",", ":"), ensure_ascii=False)``, the same text (the
    chunk's id is its hash), joined directly when no key needs escaping: 3x cheaper."""
    joined = '","'.join(keys)
    # JSON escapes only quotes, backslashes and control characters. Each check runs in C; a
    # regular expression over the keys took longer than json.dumps itself.
    plain = (
        keys
        and joined.count('"') == 2 * (len(keys) - 1)  # the separators' quotes only
        and "\\" not in joined
        and len(joined.translate(_CONTROL)) == len(joined)
    )
    return f'["{joined}"]' if plain else json.dumps(keys, separators=(",", ":"), ensure_ascii=False)


def _write_flags(
    connection: Connection,
    batch_id: str,
    chunk: str,
    keys_json: str,
    done: bytearray,
    dead: bytearray,
    now: datetime,
    *,
    durable: bool = True,
    fence: int | None = None,
    stored: bool = False,
) -> bool:
    """The chunk's flags merged with the stored ones (a flag once set stays set; a dead item
    is not done), its row written whole if it is missing: one statement on PostgreSQL.

    ``fence``: merged only while the row's ``claims`` is ``fence`` (no later claim); False
    when that refused the write (nothing written). ``stored``: the row is known to exist, so
    the flags alone are sent (an update); if nothing was updated (the row is gone: a server
    crash lost an undurable claim; or the fence refused it), the whole-row statement below
    decides, keys included."""
    parameters = {
        "batch_id": batch_id,
        "chunk": chunk,
        "keys": keys_json,
        "size": len(done),
        "done": done.decode(),
        "dead": dead.decode(),
        "now": now,
        "fence": fence,
    }
    if stored and connection.dialect.name == "postgresql":
        updated = connection.execute(
            _sql(
                "UPDATE batch_chunks AS c SET "
                "dead = CAST(CAST(c.dead AS VARBIT) | CAST(:dead AS VARBIT) AS TEXT), "
                "done = CAST((CAST(c.done AS VARBIT) | CAST(:done AS VARBIT)) "
                "& ~(CAST(c.dead AS VARBIT) | CAST(:dead AS VARBIT)) AS TEXT), "
                "updated_at = :now WHERE c.batch_id = :batch_id AND c.chunk = :chunk"
                + ("" if fence is None else " AND c.claims = :fence")
                + _asynchronous(connection, durable, "RETURNING")
            ),
            parameters,
        )
        if updated.rowcount:
            return True
    if connection.dialect.name == "postgresql":
        written = connection.execute(
            _sql(
                "INSERT INTO batch_chunks AS c (batch_id, chunk, keys, size, done, dead, claims, "
                "updated_at) VALUES (:batch_id, :chunk, :keys, :size, :done, :dead, 1, :now) "
                "ON CONFLICT (batch_id, chunk) DO UPDATE SET "
                "dead = CAST(CAST(c.dead AS VARBIT) | CAST(excluded.dead AS VARBIT) AS TEXT), "
                "done = CAST((CAST(c.done AS VARBIT) | CAST(excluded.done AS VARBIT)) "
                "& ~(CAST(c.dead AS VARBIT) | CAST(excluded.dead AS VARBIT)) AS TEXT), "
                "updated_at = excluded.updated_at"
                + ("" if fence is None else " WHERE c.claims = :fence")
                + " RETURNING 1"
                + _asynchronous(connection, durable)
            ),
            parameters,
        ).first()
        return written is not None
    # Elsewhere (SQLite): take the write lock with the insert, then merge in Python.
    inserted = connection.execute(
        sqlite.insert(_CHUNKS)
        .values(
            batch_id=batch_id,
            chunk=chunk,
            keys=keys_json,
            size=len(done),
            done=parameters["done"],
            dead=parameters["dead"],
            claims=1,
            updated_at=now,
        )
        .on_conflict_do_nothing()
    ).rowcount
    stored_done, stored_dead, claims = connection.execute(
        select(BatchChunk.done, BatchChunk.dead, BatchChunk.claims).where(
            BatchChunk.batch_id == batch_id, BatchChunk.chunk == chunk
        )
    ).one()
    if fence is not None and not inserted and claims != fence:
        return False
    merged_dead = "".join(
        "1" if "1" in (a, b) else "0" for a, b in zip(stored_dead, dead.decode(), strict=True)
    )
    merged_done = "".join(
        "1" if "1" in (a, b) and d == "0" else "0"
        for a, b, d in zip(stored_done, done.decode(), merged_dead, strict=True)
    )
    connection.execute(
        update(BatchChunk)
        .where(BatchChunk.batch_id == batch_id, BatchChunk.chunk == chunk)
        .values(done=merged_done, dead=merged_dead, updated_at=now)
    )
    return True


def _take_rows(connection: Connection, batch_id: str, keys: list[str]) -> dict[str, str]:
    """Delete the per-item rows of ``keys`` (old ledger rows, loose keys); their statuses."""
    taken: dict[str, str] = {}
    for part in _parts(connection, keys):
        rows = connection.execute(
            _TABLE.delete()
            .where(_TABLE.c.batch_id == batch_id, _among(connection, part))
            .returning(_TABLE.c.item_key, _TABLE.c.status)
        )
        taken.update((key, status) for key, status in rows)
    return taken


def _mark(
    connection: Connection, batch_id: str, keys: Sequence[str], status: str, now: datetime
) -> int:
    """Set the status of the per-item rows of ``keys``; the number of rows found."""
    found = 0
    for part in _parts(connection, keys):
        found += connection.execute(
            update(BatchItemRow)
            .where(BatchItemRow.batch_id == batch_id, _among(connection, part))
            .values(status=status, updated_at=now)
        ).rowcount
    return found


@contextmanager
def _statement(engine: Engine, *, durable: bool = True) -> Iterator[Connection]:
    """A connection for one ledger statement. On PostgreSQL it runs in autocommit, so the
    statement is its own transaction and costs one round trip, not four (``BEGIN``, the
    settings, the statement, ``COMMIT``); a statement that skips the WAL flush says so itself
    (``_asynchronous``). Elsewhere, a ``_transaction``."""
    if engine.dialect.name != "postgresql":
        with _transaction(engine, durable=durable) as connection:
            yield connection
        return
    with engine.connect() as connection:
        yield connection.execution_options(isolation_level="AUTOCOMMIT")


class _Kept(threading.local):
    """This thread's kept ledger connection, the engine it is of, and the process it was
    opened in."""

    pid = 0
    engine: Engine | None = None
    connection: Connection | None = None


_KEPT = _Kept()


def _kept_connection(engine: Engine) -> Connection:
    """An autocommit connection to ``engine`` that this thread keeps between chunks.

    Decision: a chunk of cheap items costs about as much as three round trips, and checking a
    connection out of the pool (with its ping) and returning it cost a fourth. One connection
    per thread stays open instead, for the last engine used only (another engine closes it
    first), so at most one idle connection per worker thread. It is never pinged: a connection
    the server dropped fails its next statement, is dropped (``_drop_kept``) and the ledger's
    retry opens another. After a fork the child forgets the parent's without closing it.
    """
    kept = _KEPT
    pid = os.getpid()
    if kept.pid != pid:
        kept.pid, kept.engine, kept.connection = pid, None, None
    connection = kept.connection
    if connection is not None and kept.engine is engine and not connection.invalidated:
        return connection
    if connection is not None:
        connection.close()
    connection = engine.connect().execution_options(isolation_level="AUTOCOMMIT")
    kept.engine, kept.connection = engine, connection
    return connection


def _drop_kept(connection: Connection) -> None:
    """Forget (and invalidate) a kept connection whose statement failed."""
    if _KEPT.connection is connection:
        _KEPT.engine, _KEPT.connection = None, None
    connection.invalidate()
    connection.close()


@functools.lru_cache(maxsize=32)
def _sql(statement: str) -> TextClause:
    """``text(statement)``, made once: ``text`` parses its bind parameters with a regular
    expression each time, ~0.1 ms for the ledger's statements, paid on every write."""
    return text(statement)


def _asynchronous(connection: Connection, durable: bool, clause: str = ",") -> str:
    """PostgreSQL, not ``durable``: a ``RETURNING`` item that sets ``synchronous_commit = off``
    for the statement's own transaction (it is read at its commit), without a round trip of
    its own. ``clause``: what comes before it (``,`` after other items, or ``RETURNING``)."""
    if durable or connection.dialect.name != "postgresql":
        return ""
    return f" {clause} set_config('synchronous_commit', 'off', true)".replace(" ,", ",")


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
        return BatchItemRow.item_key == any_(literal(keys, postgresql.ARRAY(String)))
    return BatchItemRow.item_key.in_(keys)


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
                "INSERT INTO batch_item_rows (batch_id, item_key, status, claims, updated_at) "
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
                select(BatchItemRow.status, func.count())
                .where(BatchItemRow.batch_id == batch_id)
                .group_by(BatchItemRow.status)
            ).all()
        )
        # The chunks' flags counted without a row per item: the 1s of each flag string.
        ones = func.length(BatchChunk.done) - func.length(func.replace(BatchChunk.done, "1", ""))
        dead = func.length(BatchChunk.dead) - func.length(func.replace(BatchChunk.dead, "1", ""))
        sizes, done, dead_count = connection.execute(
            select(func.sum(BatchChunk.size), func.sum(ones), func.sum(dead)).where(
                BatchChunk.batch_id == batch_id
            )
        ).one()
        total = connection.scalar(select(Batch.total).where(Batch.id == batch_id))
    done_items = int(counts.get("done", 0)) + int(done or 0)
    dead_items = int(counts.get("dead", 0)) + int(dead_count or 0)
    chunked = int(sizes or 0) - int(done or 0) - int(dead_count or 0)
    claimed = int(counts.get("claimed", 0)) + chunked
    return BatchProgress(
        batch_id, None if total is None else int(total), done_items, dead_items, claimed
    )
