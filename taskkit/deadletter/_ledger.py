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
flags alone and write the row whole only if a crash of the server lost the claim. A chunk
costs four statements: a lookup of its position (``probe``), the claim, a flush every
``ledger_flush_every`` items (no WAL flush awaited) and the durable end. With psycopg they skip
SQLAlchemy's execute (``_Raw``: prepared once per connection, their results read from libpq;
``statement_hooks`` sees them), and ``BatchTask`` waits for few of their answers: the probe is
sent before the chunk's keys are computed, a claim the probe found nothing for (a first
delivery) is sent without waiting, the flushes too (``finish(wait=False)``: the write is on its
way to the server when ``finish`` returns, its answer read before the next statement), and the
durable end is settled (``settle``) after the chunk's summary is built. A first delivery's
chunk waits for its end's WAL flush and little else.

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
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, NamedTuple, cast

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
        #: ... and with psycopg, the claim and the flag updates take its raw path (``_Raw``).
        self._raw = False
        #: A durable write was sent without waiting and its answer has not said it landed
        #: (``settle``).
        self._unsettled = False
        #: The chunk's position in its batch (``claim(position=...)``), and the lookup
        #: ``probe`` sent for a position, until ``claim`` reads it.
        self._position: int | None = None
        self._probe: _Probe | None = None
        #: The claim was ``fenced`` (its count, ``_fence``, may come with a later answer).
        self._fenced = False
        #: A claim sent without waiting whose answer has not been read (``_claimed``), and one
        #: whose answer was an error or found per-item rows to move: either way the next write
        #: claims again, waited for (``_answer_claim``).
        self._claim_unread = False
        self._unclaimed = False

    def __enter__(self) -> ItemLedger:
        """Inside the block, the ledger's one-statement writes use this thread's kept
        connection (PostgreSQL; elsewhere nothing changes): no pool checkout, ping and return
        per statement or per chunk. See ``_kept_connection``."""
        self._holding = self.engine.dialect.name == "postgresql"
        self._raw = self._holding and self.engine.dialect.driver == "psycopg"
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        try:
            if kind is None:
                self.settle()
            elif self._raw:
                _collect_kept()  # a write sent without waiting: its answer, read and dropped
        finally:
            self._holding = self._raw = False

    def settle(self) -> None:
        """Read the answer of a write sent without waiting (``finish(wait=False)``), and make
        sure a durable one landed: one that failed, or found nothing to update, is written
        again now, waited for (retried on transient errors; ``LeaseLost`` if a newer delivery
        claimed the chunk). The end of the ``with`` block calls it when the block raised
        nothing; call it yourself where its errors must be handled inside the block (a write
        that did not land is tried again by every later ``settle``, the block's end included).

        Example::

            with ItemLedger("batch-42") as ledger:
                ledger.claim(keys)
                ledger.finish(done=keys, wait=False)   # durable, its round trip not waited for
                summary = summarise(keys)              # runs while the write is on its way
                ledger.settle()                        # the write has landed, or this raised
        """
        self._answer_claim()  # and any other answer goes to its handler (``_landed``...)
        if self._unsettled:  # until a durable write of every flag lands: raised, tried again
            self.finish()  # the flags are this object's: written whole, waited for

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

    def probe(self, position: int) -> None:
        """Look up the chunks of this batch at ``position`` (the position of a chunk's first
        item in its batch: its message's ``offset``) before the chunk's keys are known: sent
        now, its answer read by ``claim``. A ``claim(keys, durable=False, position=position)``
        whose keys it did not find there (a chunk's first delivery) is then sent without
        waiting for its answer, so the chunk's first items run during the claim's round trip;
        a chunk found there (a redelivery), or a batch with per-item rows, is claimed as usual
        and skips what it finished. On PostgreSQL with psycopg, inside ``with``; elsewhere this
        does nothing and the claim waits as usual. A probe that fails is forgotten (the claim
        waits). ``BatchTask`` probes before it computes its chunk's keys.

        Decision (issue 18): a chunk of cheap items waited for two round trips, its claim and
        its durable end; the claim's now overlaps the keys' computation. The lookup reads rows
        of no position too (claimed before migration 0013, or by a caller that named none), so
        a chunk claimed by either is still found. Not found: the same keys claimed at another
        position (a message that sends a finished chunk's keys again under another offset);
        its items run again (item functions are idempotent per key) and the claim's answer
        merges the flags already stored, so nothing is lost. Example::

            with ItemLedger("batch-42") as ledger:
                ledger.probe(0)                          # on its way during the next line
                keys = [key_of(item) for item in items]
                skip = ledger.claim(keys, durable=False, position=0)
        """
        self._probe = None
        if not self._raw:
            return
        probe = _Probe(position)
        statement, name = _raw_statement("probe", True, False)
        raw = None
        try:
            raw = _kept_raw(self.engine)  # may connect: a failure here is the claim's to retry
            parameters = [self.batch_id.encode(raw.encoding), str(position).encode()]
            raw.send(self.engine, statement, name, parameters, probe.answered)
        except BaseException as error:
            if raw is not None:  # its answer may be in flight
                _drop_kept(raw.connection)
            if isinstance(error, DBAPIError):  # forgotten: the claim waits, and retries
                return
            raise  # interrupted (a time limit)
        self._probe = probe

    @db_retry(max_attempts=5)
    def claim(
        self,
        keys: Sequence[str],
        *,
        durable: bool = True,
        fenced: bool = False,
        position: int | None = None,
    ) -> dict[str, str]:
        """Claim the chunk of ``keys`` (in this order) for this delivery; returns
        ``{key: "done" | "dead"}`` for the keys already finished (skip them).

        One statement: the chunk's row is inserted, or its claims counted. ``durable=False``:
        on PostgreSQL the claim commits without waiting for its WAL flush; a crash of the
        server itself may lose it, and every ``finish`` of this object writes the whole row
        again if it is missing. ``position``: where the chunk starts in its batch, stored with
        it for ``probe``; a claim that a ``probe`` of its position found nothing for is sent
        without waiting (returns ``{}``: nothing of a chunk no delivery claimed is finished),
        its answer read by this object's next statement, which claims again, waited for, if
        that answer was an error.

        ``fenced``: this claim is the chunk's only live one (its caller holds the chunk's
        lease), and a later claim means another delivery took the chunk over. Every ``finish``
        of this object then lands only while the chunk's claim count is still this claim's, in
        the same statement: otherwise it writes nothing (neither flags nor dead letters), logs
        one error and raises ``LeaseLost``. A write that sat in a cut-off host's connection is
        refused where it lands. Example::

            finished = ledger.claim(keys, fenced=True)
            ledger.finish(done=keys)          # LeaseLost if another delivery claimed since
        """
        keys = list(keys)
        try:  # str keys (BatchTask's are) need no conversion: 1,000 str() calls took ~50 µs
            keys_json = _keys_json(keys)
        except TypeError:  # a key that is not a str: stored as its str()
            keys = list(map(str, keys))
            keys_json = _keys_json(keys)
        if len(set(keys)) != len(keys):
            raise ConfigurationError(f"repeated keys in a chunk of batch {self.batch_id!r}")
        encoded = keys_json.encode()
        chunk = hashlib.sha256(encoded).hexdigest()
        self._position, self._fenced = position, fenced
        if self._probed(chunk, position) and not durable:
            self._claim_unanswered(keys, keys_json, encoded, chunk)
            return {}
        return self._claim_answered(keys, keys_json, encoded, chunk, durable)

    def _probed(self, chunk: str, position: int | None) -> bool:
        """A ``probe`` of ``position`` was answered, and found neither the chunk nor per-item
        rows of the batch: the claim need not be waited for. Reads (and forgets) the probe."""
        probe, self._probe = self._probe, None
        if probe is None or position is None or probe.position != position:
            return False
        _collect_kept()  # the probe's answer, if no statement read it yet
        found = probe.found
        return found is not None and chunk not in found and "" not in found

    def _claim_unanswered(
        self, keys: list[str], keys_json: str, encoded: bytes, chunk: str
    ) -> None:
        """The claim's statement sent without waiting (see ``probe``); ``_claimed`` takes its
        answer. Until then this object knows the flags of a chunk no delivery claimed."""
        raw = _kept_raw(self.engine)
        statement, name = _raw_statement("claim", False, False)
        parameters = self._claim_parameters(raw, chunk, encoded, len(keys))
        try:
            raw.send(self.engine, statement, name, parameters, self._claimed)
        except BaseException:  # interrupted too (a time limit): its answer may be in flight
            _drop_kept(raw.connection)  # the retry (db_retry) connects again
            raise
        self._chunk, self._keys_json, self._stored = chunk, keys_json, True
        self._keys, self._positions = keys, None
        self._done, self._dead = bytearray(b"0" * len(keys)), bytearray(b"0" * len(keys))
        self._fence = None  # the answer brings it
        self._claim_unread, self._unclaimed = True, False

    def _claimed(self, result: Any, error: DBAPIError | None) -> None:
        """The answer of a claim sent without waiting: the claim count (the fence), and the
        flags of a delivery that claimed the chunk since the probe (merged: flags only add).
        An error, or per-item rows to move, leave the claim to be made again, waited for."""
        self._claim_unread = False
        if error is not None:
            self._unclaimed = True
            return
        value = result.get_value
        if self._fenced:
            self._fence = int(value(0, 3))
        if value(0, 2) == b"t":  # per-item rows came since the probe: the waited claim moves them
            self._unclaimed = True
        _merge_flags(self._done, value(0, 0))
        _merge_flags(self._dead, value(0, 1))

    def _answer_claim(self) -> None:
        """Before a write: whatever waits on the kept connection read (a claim sent without
        waiting among it), and the claim made again, waited for, if its answer was an error,
        asks for it, or was never read (dropped with its connection by an interruption): no
        write of a fenced delivery goes out without its claim's count. The flags stay
        ``_claim_unread`` or ``_unclaimed`` until that claim succeeds, so a claim that fails
        again is tried again by the next write (a flush's failure is logged by ``BatchTask``,
        which goes on)."""
        if self._raw:
            _collect_kept()
        if not (self._claim_unread or self._unclaimed):
            return
        assert self._chunk is not None
        done, dead = self._done, self._dead
        self._claim_answered(
            self._keys, self._keys_json, self._keys_json.encode(), self._chunk, False
        )
        self._claim_unread = self._unclaimed = False
        _merge_flags(self._done, done)  # this delivery's own flags, not written yet
        _merge_flags(self._dead, dead)

    def _claim_answered(
        self, keys: list[str], keys_json: str, encoded: bytes, chunk: str, durable: bool
    ) -> dict[str, str]:
        """The claim, its answer waited for: see ``claim``."""
        now = datetime.now(UTC)
        if self._raw:
            done, dead, moved, claims = self._claim_raw(chunk, encoded, len(keys), durable)
        else:
            with self._statement(durable=durable) as connection:
                row = connection.execute(
                    _sql(
                        "INSERT INTO batch_chunks AS c (batch_id, chunk, keys, size, done, dead, "
                        "claims, updated_at, position) VALUES (:batch_id, :chunk, :keys, :size, "
                        ":zeros, :zeros, 1, :now, :position) ON CONFLICT (batch_id, chunk) DO "
                        "UPDATE SET claims = c.claims + 1, updated_at = excluded.updated_at, "
                        "position = coalesce(c.position, excluded.position) "
                        "RETURNING done, dead, EXISTS (SELECT 1 FROM batch_item_rows r "
                        f"WHERE r.batch_id = :batch_id), claims{_asynchronous(connection, durable)}"
                    ),
                    {
                        "batch_id": self.batch_id,
                        "chunk": chunk,
                        "keys": keys_json,
                        "size": len(keys),
                        "zeros": "0" * len(keys),
                        "now": now,
                        "position": self._position,
                    },
                ).one()
            done, dead = bytearray(row[0].encode()), bytearray(row[1].encode())
            moved, claims = bool(row[2]), int(row[3])
        if moved:  # rows of the old ledger (or of loose keys): move them into the chunk
            with _transaction(self.engine) as connection:
                moved_rows = _take_rows(connection, self.batch_id, keys)
                if moved_rows:
                    for position, key in enumerate(keys):
                        status = moved_rows.get(key)
                        if status == "done":
                            done[position] = ord("1")
                        elif status == "dead":
                            dead[position] = ord("1")
                    _write_flags(
                        connection,
                        self.batch_id,
                        chunk,
                        keys_json,
                        done,
                        dead,
                        now,
                        position=self._position,
                    )
        self._chunk, self._keys_json, self._stored = chunk, keys_json, True
        self._keys, self._positions = keys, None  # positions: on the first finish by key
        self._done, self._dead = done, dead
        self._fence = claims if self._fenced else None
        finished: dict[str, str] = {}
        if b"1" in done or b"1" in dead:  # a first delivery finds nothing: skip the walk
            for position, key in enumerate(keys):
                if dead[position] == ord("1"):
                    finished[key] = "dead"
                elif done[position] == ord("1"):
                    finished[key] = "done"
        return finished

    def _claim_parameters(
        self, raw: _Raw, chunk: str, keys: bytes, size: int
    ) -> list[bytes | None]:
        """The claim statement's parameters on the raw path; ``keys``: their JSON in UTF-8."""
        text_of = raw.encoding
        if text_of != "utf-8":
            keys = keys.decode().encode(text_of)
        return [
            self.batch_id.encode(text_of),
            chunk.encode(),
            keys,
            str(size).encode(),
            b"0" * size,
            datetime.now(UTC).isoformat().encode(),
            None if self._position is None else str(self._position).encode(),
        ]

    def _claim_raw(
        self, chunk: str, keys: bytes, size: int, durable: bool
    ) -> tuple[bytearray, bytearray, bool, int]:
        """The claim's statement on the raw path: (done, dead, old rows exist, claims).
        ``keys``: the keys' JSON in UTF-8."""
        raw = _kept_raw(self.engine)
        statement, name = _raw_statement("claim", durable, False)
        try:
            result = raw.run(
                self.engine, statement, name, self._claim_parameters(raw, chunk, keys, size)
            )
        except BaseException:  # interrupted too (a time limit): its answer may be in flight
            _drop_kept(raw.connection)  # the retry (db_retry) connects again
            raise
        value = result.get_value
        return (
            bytearray(value(0, 0)),
            bytearray(value(0, 1)),
            value(0, 2) == b"t",
            int(value(0, 3)),
        )

    def _write_raw(
        self, done: bytearray, dead: bytearray, now: datetime, durable: bool, wait: bool
    ) -> bool:
        """``_write_flags`` for the claimed chunk, its flags-only update on the raw path; not
        ``wait``: sent without waiting for its answer (``_flushed`` takes it later)."""
        assert self._chunk is not None
        raw = _kept_raw(self.engine)  # first: a write sent before may have found the row gone
        if self._stored:
            fence = self._fence
            statement, name = _raw_statement("flags", durable, fence is not None)
            parameters = [
                bytes(dead),
                bytes(done),
                now.isoformat().encode(),
                self.batch_id.encode(raw.encoding),
                self._chunk.encode(),
            ]
            if fence is not None:
                parameters.append(str(fence).encode())
            try:
                if not wait:
                    raw.send(
                        self.engine,
                        statement,
                        name,
                        parameters,
                        self._landed if durable else self._flushed,
                    )
                    self._unsettled = self._unsettled or durable
                    return True
                if raw.run(self.engine, statement, name, parameters).command_tuples:
                    self._unsettled = self._unsettled and not durable  # every flag, durably
                    return True
            except BaseException:  # interrupted too (a time limit): its answer may be in flight
                _drop_kept(raw.connection)  # the retry (db_retry) connects again
                raise
        # The row is gone (a crash of the server lost the claim) or the fence refused the
        # update: the whole-row statement decides, keys included.
        with self._statement(durable=durable) as connection:
            written = _write_flags(
                connection,
                self.batch_id,
                self._chunk,
                self._keys_json,
                done,
                dead,
                now,
                durable=durable,
                fence=self._fence,
                position=self._position,
            )
        self._unsettled = self._unsettled and not (written and durable)
        return written

    def _finish_at(self, done_at: Sequence[int], durable: bool, wait: bool) -> None:
        """``finish(done_at=...)`` alone on the raw path (``BatchTask``'s every write without
        dead items): the flags-only update and nothing around it. A chunk of cheap items spends
        as long in the ledger's Python as in its statements' round trips, so this path skips
        the general one's per-key bookkeeping (issue 18)."""
        self._answer_claim()
        flags = self._done  # finished whatever becomes of this write: see ``finish``
        if done_at:
            _set_flags(flags, done_at)
        elif not (durable and (b"1" in flags or b"1" in self._dead)):
            return  # nothing finished: nothing to make durable
        if not self._write_raw(flags, self._dead, datetime.now(UTC), durable, wait):
            raise self._refused(len(done_at), 0)

    def _flushed(self, result: Any, error: DBAPIError | None) -> None:
        """The answer of a flag update sent without waiting (``finish(wait=False)``), read
        before this thread's next ledger statement. Its flags are this object's already, so
        the next write sends them again whatever happened to this one."""
        if error is not None:
            logger.warning(
                "taskkit: batch %s: a ledger write of done items failed (%s); the next write "
                "carries its flags",
                self.batch_id,
                error,
            )
        elif not result.command_tuples:  # the row is gone, or the fence refused the update
            self._stored = False  # the next write decides: the whole row, or LeaseLost

    def _landed(self, result: Any, error: DBAPIError | None) -> None:
        """The answer of a durable write sent without waiting: landed, or left for ``settle``
        to write again (no log: ``settle`` raises if that fails too)."""
        if error is None and result.command_tuples:
            self._unsettled = False
        elif error is None:  # the row is gone, or the fence refused the update
            self._stored = False

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
        wait: bool = True,
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

        ``wait=False`` (PostgreSQL with psycopg, inside ``with``, flags of the claimed chunk
        only; elsewhere it waits as usual): the write is sent (it is in the socket, on its way
        to the server, when ``finish`` returns: a worker that dies then keeps it) and its answer
        is read by this thread's next ledger statement, by ``settle``, or at the end of the
        ``with`` block, so the round trip overlaps the caller's next work. Not ``durable``, what
        the answer says is handled there: a failed write is logged and its flags go again with
        the next write (they are this object's already); a write the fence refused wrote
        nothing, and the next write of this object is refused too, in its own statement, and
        raises ``LeaseLost``. A ``durable`` one is not finished until ``settle`` (or the end of
        the block) has read that it landed, or written it again, raising what a waited write
        would have raised. ``BatchTask`` sends its mid-chunk flushes this way, and its chunk's
        end, which it settles after building its summary.
        """
        if not durable and dead:
            raise ConfigurationError("dead items are always written durably (durable=True)")
        if self._raw and not (done or dead) and self._chunk is not None:
            self._finish_at(done_at, durable, wait)
            return
        keyless = [entry.task_name for entry in dead if entry.item_key is None]
        if keyless:  # str(None) would mark an item named "None" dead
            raise ConfigurationError(
                f"a dead item of batch {self.batch_id!r} has no item_key ({keyless[0]})"
            )
        in_chunk = self._chunk is not None
        if done_at and not in_chunk:
            raise ConfigurationError("done_at names positions of a claimed chunk: claim it first")
        self._answer_claim()  # what a write sent without waiting said comes first
        finished = in_chunk and (b"1" in self._done or b"1" in self._dead)
        if not (done or dead or done_at) and not (durable and finished):
            return
        now = datetime.now(UTC)
        rows = [entry.row() for entry in dead] if record else []
        done_flags, dead_flags = bytearray(self._done), bytearray(self._dead)
        if done_at:
            _set_flags(done_flags, done_at)
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
        if alone and self._chunk is not None:
            # These items are finished whatever becomes of this write (no letter depends on
            # it): one interrupted or failed after it was sent may or may not land, one before
            # did not, so every later write of this object carries them again (flags merge).
            self._done, self._dead = done_flags, dead_flags
        if self._raw and alone and self._chunk is not None:
            if not self._write_raw(done_flags, dead_flags, now, durable, wait):
                raise self._refused(len(done) + len(done_at), len(dead))
            return
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
                position=self._position,
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
        self._unsettled = self._unsettled and not durable  # every flag written, and durably
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


def _set_flags(flags: bytearray, positions: Sequence[int]) -> None:
    """Set ``flags`` at ``positions`` to ``1``: as one slice when they are a run of adjacent
    positions in order (``BatchTask``'s items finish in order unless one is retried), which
    costs a third of the loop's time. The run is recognised by comparing with a slice of
    ``_RUN`` (the integers in order), not a new ``list(range(...))``, whose integers above 256
    are each allocated: that made the check cost as much as the loop."""
    count = len(positions)
    first = positions[0]
    if (
        positions[-1] - first + 1 == count
        and first >= 0
        and first + count <= min(len(flags), _RUN_LIMIT)
    ):
        run = _RUN[0]
        if len(run) < first + count:  # replaced, never grown in place: threads share it
            run = _RUN[0] = list(range(min(max(len(flags), 2 * len(run)), _RUN_LIMIT)))
        if type(positions) is range or positions == run[first : first + count]:
            flags[first : first + count] = b"1" * count
            return
    for position in positions:
        flags[position] = 49  # ord("1")


def _merge_flags(flags: bytearray, more: bytes | bytearray) -> None:
    """Set ``flags`` where ``more`` (the same chunk's flags) has a ``1``."""
    if len(more) == len(flags) and b"1" in more:
        for position, flag in enumerate(more):
            if flag == 49:  # ord("1")
                flags[position] = 49


class _Probe:
    """A lookup sent by ``ItemLedger.probe``: its position, and once answered, the chunk ids
    found there (``""``: the batch has per-item rows). None: not answered, or failed."""

    def __init__(self, position: int) -> None:
        self.position = position
        self.found: set[str] | None = None

    def answered(self, result: Any, error: DBAPIError | None) -> None:
        if error is None and result.ntuples < _PROBE_LIMIT:  # all of them, or not known
            self.found = {result.get_value(row, 0).decode() for row in range(result.ntuples)}


#: ``[0, 1, 2, ...]`` as long as the longest chunk flagged so far (``_set_flags``), up to
#: ``_RUN_LIMIT`` positions (2.4 MB); beyond, the loop.
_RUN_LIMIT = 1 << 16
_RUN: list[list[int]] = [list(range(1024))]


def _keys_json(keys: list[str]) -> str:
    """``json.dumps(keys, separators=(",", ":"), ensure_ascii=False)``, the same text (the
    chunk's id is its hash), joined directly when no key needs escaping: 3x cheaper. A key
    that is not a ``str`` raises ``TypeError`` (``claim`` converts them then)."""
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
    position: int | None = None,
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
        "position": position,
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
                "updated_at, position) VALUES (:batch_id, :chunk, :keys, :size, :done, :dead, 1, "
                ":now, :position) ON CONFLICT (batch_id, chunk) DO UPDATE SET "
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
            position=position,
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
    """This thread's kept ledger connection, the engine it is of, the process it was opened
    in, and its raw handle (``_Raw``, made on first use)."""

    pid = 0
    engine: Engine | None = None
    connection: Connection | None = None
    raw: _Raw | None = None


_KEPT = _Kept()


def _kept_connection(engine: Engine) -> Connection:
    """An autocommit connection to ``engine`` that this thread keeps between chunks.

    Decision: a chunk of cheap items costs about as much as three round trips, and checking a
    connection out of the pool (with its ping) and returning it cost a fourth. One connection
    per thread stays open instead, for the last engine used only (another engine closes it
    first), so at most one idle connection per worker thread. It is never pinged: a connection
    the server dropped fails its next statement, is dropped (``_drop_kept``) and the ledger's
    retry opens another. After a fork the child forgets the parent's without closing it.
    A statement sent on it without waiting (``_Raw.send``) has its answer read first; if that
    fails, the connection is dropped and another opened (the failure went to the statement's
    own handler).
    """
    kept = _KEPT
    pid = os.getpid()
    if kept.pid != pid:
        kept.pid, kept.engine, kept.connection, kept.raw = pid, None, None, None
    connection = kept.connection
    if connection is not None:
        _collect_kept()  # dropped if that failed
        connection = kept.connection
    if connection is not None and kept.engine is engine and not connection.invalidated:
        return connection
    if connection is not None:  # back to its pool, with no answer left unread
        connection.close()
    connection = engine.connect().execution_options(isolation_level="AUTOCOMMIT")
    kept.engine, kept.connection, kept.raw = engine, connection, None
    return connection


def _drop_kept(connection: Connection) -> None:
    """Forget (and invalidate) a kept connection whose statement failed."""
    if _KEPT.connection is connection:
        _KEPT.engine, _KEPT.connection, _KEPT.raw = None, None, None
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


# -- the raw PostgreSQL path of the hot statements (issue 18) ------------------------------------

#: Called with ``(engine, statement)`` for each statement the ledger sends on its raw PostgreSQL
#: path (the probe, the claim and the flag updates of a ``with`` block), which skips
#: SQLAlchemy's execute and so its ``before_cursor_execute`` events; once per statement, also
#: when it is sent again because its connection lost it prepared. Empty unless someone listens
#: (tests count the chunk's statements here).
statement_hooks: list[Callable[[Engine, str], None]] = []

_CLAIM_SQL = (
    "INSERT INTO batch_chunks AS c (batch_id, chunk, keys, size, done, dead, claims, updated_at, "
    "position) VALUES ($1, $2, $3, $4, $5, $5, 1, $6, $7) ON CONFLICT (batch_id, chunk) DO UPDATE "
    "SET claims = c.claims + 1, updated_at = excluded.updated_at, "
    "position = coalesce(c.position, excluded.position) "
    "RETURNING done, dead, EXISTS (SELECT 1 FROM batch_item_rows r WHERE r.batch_id = $1), claims"
)
#: Chunks a probe reads at most: more (a batch of many chunks claimed with no position)
#: and the claim waits, as if there had been no probe.
_PROBE_LIMIT = 256
#: The chunks of a batch at a position (or of none), and ``''`` if per-item rows exist.
_PROBE_SQL = (
    "SELECT chunk FROM (SELECT chunk FROM batch_chunks WHERE batch_id = $1 "
    f"AND (position = $2 OR position IS NULL) LIMIT {_PROBE_LIMIT}) AS here "
    "UNION ALL SELECT '' WHERE EXISTS (SELECT 1 FROM batch_item_rows r WHERE r.batch_id = $1)"
)
_FLAGS_SQL = (
    "UPDATE batch_chunks AS c SET "
    "dead = CAST(CAST(c.dead AS VARBIT) | CAST($1 AS VARBIT) AS TEXT), "
    "done = CAST((CAST(c.done AS VARBIT) | CAST($2 AS VARBIT)) "
    "& ~(CAST(c.dead AS VARBIT) | CAST($1 AS VARBIT)) AS TEXT), "
    "updated_at = $3 WHERE c.batch_id = $4 AND c.chunk = $5"
)
_SYNC_OFF = "set_config('synchronous_commit', 'off', true)"


@functools.lru_cache(maxsize=16)
def _raw_statement(kind: str, durable: bool, fenced: bool) -> tuple[str, bytes]:
    """The text of a raw-path statement and the name it is prepared under on a connection."""
    if kind == "claim":
        statement = _CLAIM_SQL + ("" if durable else f", {_SYNC_OFF}")
    elif kind == "probe":
        statement = _PROBE_SQL
    else:
        statement = (
            _FLAGS_SQL
            + (" AND c.claims = $6" if fenced else "")
            + ("" if durable else f" RETURNING {_SYNC_OFF}")
        )
    name = f"taskkit_ledger_{kind}_{int(durable)}{int(fenced)}"
    return statement, name.encode()


#: The ledger's statements prepared on each psycopg connection (by the connection).
_PREPARED: weakref.WeakKeyDictionary[Any, set[bytes]] = weakref.WeakKeyDictionary()


class _Raw:
    """The libpq handle of this thread's kept connection (psycopg's ``PGconn``), for the
    ledger's hot one-row statements: prepared once per connection under names of their own
    (one-row primary-key statements: the generic plan is the right one), sent with text
    parameters, their results read from libpq without SQLAlchemy's execute and result machinery
    or psycopg's cursor (the Python around a statement, not its round trip, was most of what
    separated a chunk's ledger time from its three round trips). A statement may be sent
    without waiting for its answer (``send``): ``collect`` reads that answer, and
    ``_kept_connection`` calls it before anything else uses the connection. Errors are raised
    as SQLAlchemy raises them (``DBAPIError``, invalidated on a disconnect), so ``db_retry``
    classifies them the same. A connection whose psycopg ``prepare_threshold`` is None (a
    pooler that cannot keep prepared statements) gets them unprepared; a ``DEALLOCATE ALL`` run
    on it is survived (prepared again)."""

    def __init__(self, connection: Connection) -> None:
        # psycopg is the ``postgres`` extra: imported once the raw path is taken.
        import psycopg  # noqa: PLC0415
        import psycopg.errors  # noqa: PLC0415
        from psycopg import generators  # noqa: PLC0415
        from psycopg.pq import ExecStatus  # noqa: PLC0415

        self._psycopg, self._generators = psycopg, generators
        self._fatal = ExecStatus.FATAL_ERROR
        self.connection = connection
        self.driver: Any = cast(Any, connection.connection).driver_connection  # psycopg's
        self.pgconn: Any = self.driver.pgconn
        self.encoding: str = self.driver.info.encoding
        self.prepare = self.driver.prepare_threshold is not None
        #: The names prepared on the server's session: the connection may have been kept
        #: before (a kept connection closed goes back to its pool, and out again).
        self.prepared: set[bytes] = _PREPARED.setdefault(self.driver, set())
        #: A statement sent without waiting: its text, and what to do with its result (or
        #: with the ``DBAPIError`` it failed with).
        self.pending: tuple[str, Callable[[Any, DBAPIError | None], None]] | None = None

    def run(
        self, engine: Engine, statement: str, name: bytes, parameters: Sequence[bytes | None]
    ) -> Any:
        """Run the statement prepared as ``name``; its result (a ``PGresult``)."""
        self._send(engine, statement, name, parameters)
        try:
            return self._answer(statement)
        except DBAPIError as error:
            if getattr(error.orig, "sqlstate", None) != "26000":
                raise
        # "prepared statement ... does not exist": a DEALLOCATE ALL ran on this connection.
        self._send(engine, statement, name, parameters, again=True)
        return self._answer(statement)

    def send(
        self,
        engine: Engine,
        statement: str,
        name: bytes,
        parameters: Sequence[bytes | None],
        then: Callable[[Any, DBAPIError | None], None],
    ) -> None:
        """Send the statement prepared as ``name`` (all of it is in the socket, on its way to
        the server, when this returns) and leave its answer to ``collect``, which calls
        ``then(result, None)``, or ``then(None, error)`` before raising ``error``."""
        self._send(engine, statement, name, parameters)
        self.pending = (statement, then)

    def collect(self) -> None:
        """Read the answer of the statement sent without waiting, if any, and hand it on."""
        if self.pending is None:
            return
        statement, then = self.pending
        self.pending = None
        try:
            result = self._answer(statement)
        except DBAPIError as error:
            then(None, error)
            raise
        then(result, None)

    def _send(
        self,
        engine: Engine,
        statement: str,
        name: bytes,
        parameters: Sequence[bytes | None],
        *,
        again: bool = False,
    ) -> None:
        assert self.pending is None, "collect() the statement sent before"
        if not again:  # the hooks count statements, not their sends
            for hook in statement_hooks:
                hook(engine, statement)
        try:
            if not self.prepare:
                self.pgconn.send_query_params(statement.encode(), parameters)
            else:
                if name not in self.prepared:
                    self._prepare(statement, name)
                self.pgconn.send_query_prepared(name, parameters)
            self.driver.wait(self._generators.send(self.pgconn))
        except self._psycopg.Error as error:
            raise self._wrapped(statement, error) from error

    def _prepare(self, statement: str, name: bytes) -> None:
        self.pgconn.send_prepare(name, statement.encode())
        try:
            self._check(statement, self.driver.wait(self._generators.execute(self.pgconn)))
        except DBAPIError as error:
            # "already exists": prepared by this code on this session, and not known here (the
            # names are this module's own; each one's text fixed by it).
            if getattr(error.orig, "sqlstate", None) != "42P05":
                raise
        self.prepared.add(name)

    def _answer(self, statement: str) -> Any:
        try:
            results = self.driver.wait(self._generators.fetch_many(self.pgconn))
        except self._psycopg.Error as error:
            raise self._wrapped(statement, error) from error
        return self._check(statement, results)

    def _check(self, statement: str, results: list[Any]) -> Any:
        for result in results:
            if result.status == self._fatal:
                error = self._psycopg.errors.error_from_result(result, encoding=self.encoding)
                if error.sqlstate == "26000":  # our prepared statements are gone
                    self.prepared.clear()
                raise self._wrapped(statement, error) from error
        return results[-1]

    def _wrapped(self, statement: str, error: Any) -> DBAPIError:
        """``error`` as SQLAlchemy raises it (classified the same way by ``db_retry``)."""
        dialect = self.connection.dialect
        return cast(
            DBAPIError,
            DBAPIError.instance(
                statement,
                None,
                error,
                self._psycopg.Error,
                connection_invalidated=dialect.is_disconnect(error, self.driver, None),
                dialect=dialect,
            ),
        )


def _collect_kept() -> None:
    """Read the answer of a statement sent without waiting on this thread's kept connection,
    if any: it goes to its handler; a failure drops the connection (the next statement opens
    another)."""
    raw = _KEPT.raw
    if raw is not None and raw.pending is not None:
        try:
            raw.collect()
        except DBAPIError:
            _drop_kept(raw.connection)
        except BaseException:  # interrupted (a time limit): the answer may still be in flight
            _drop_kept(raw.connection)
            raise


def _kept_raw(engine: Engine) -> _Raw:
    """The raw handle of this thread's kept connection to ``engine`` (``_kept_connection``),
    with the answer of a statement sent on it without waiting read first."""
    kept = _KEPT
    raw = kept.raw
    if (  # the common case, checked without a call: nothing to read, nothing to reopen
        raw is not None
        and raw.pending is None
        and kept.engine is engine
        and raw.connection is kept.connection
        and not raw.connection.invalidated
        and kept.pid == os.getpid()
    ):
        return raw
    connection = _kept_connection(engine)
    raw = _KEPT.raw
    if raw is None or raw.connection is not connection:
        raw = _KEPT.raw = _Raw(connection)
    return raw


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
