"""``DatabaseStorage``: checkpoints in taskkit's database, in chunks, one transaction each.

On PostgreSQL with psycopg (3) the chunks travel in the binary protocol both ways: written
with one ``COPY checkpoint_chunks FROM STDIN (FORMAT BINARY)`` per checkpoint, read with a
server-side cursor in binary format, one chunk at a time. Why those and not the others:

- Binary, because the default (text) protocol sends ``bytea`` as hex: twice the bytes on the
  wire, and an encode and a decode pass over them on each side. Reading in binary was about
  3x the text read here; the write gained less, because the server, not the wire, bounds it.
- ``COPY`` rather than one ``INSERT`` per chunk: one statement streams every chunk, the row
  is framed by psycopg straight from the caller's memory (no ``bytes`` copy of each slice).
- Not large objects: ``pg_largeobject`` stores 2 kB pages too (as TOAST does for ``bytea``),
  so they write the same WAL and heap, and add what this storage avoids: objects that outlive
  their row unless unlinked (``vacuumlo``), separate privileges, no ``ON DELETE CASCADE``.
- Not larger chunks: the server splits every value into 2 kB TOAST pieces whatever the chunk
  size, so 32 MB chunks measured no faster than 8 MB; they only hold more in memory.

What bounds a save is the server: each byte is written to the WAL (fsynced at commit) and to
TOAST pieces in 2 kB rows with their index entries, by one backend process. The benchmark
(docs/benchmarks.md) sets a raw psycopg binary ``COPY`` of the same bytes into a bare table
beside it. Other drivers and SQLite use plain parameterised statements.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Generator, Iterator, Sequence
from typing import Any

from sqlalchemy import delete, func, insert, select
from sqlalchemy.engine import URL, ScalarResult, make_url
from sqlalchemy.orm import Session

from taskkit.checkpoint._codec import (
    _THREAD_MIN,
    DIGEST,
    Buffer,
    Hashed,
    StreamDigest,
    writable_buffer,
)
from taskkit.checkpoint._info import CheckpointInfo, validate_run_id
from taskkit.db.models import CheckpointChunk, CheckpointRecord
from taskkit.db.session import session_scope
from taskkit.errors import CheckpointWarning

__all__ = ["CHUNK_SIZE", "DatabaseStorage"]

#: Largest piece of data in one ``checkpoint_chunks`` row. Big enough that a 1 GB checkpoint is
#: 128 rows; small enough that no single value is near PostgreSQL's 1 GB limit or has to be
#: held twice in memory by the driver.
CHUNK_SIZE = 8 * 1024 * 1024


class DatabaseStorage:
    """Checkpoints in the ``checkpoints`` and ``checkpoint_chunks`` tables (migration 0002).

    A checkpoint is written in one transaction (the record, its chunks, its manifest), so a
    crash or a lost connection leaves nothing half-written and nothing to clean up. Rewriting
    a step replaces it in the same transaction. The manifest is kept as the exact JSON text.
    Sessions come from ``taskkit.db.session`` (the process's engine for ``database_url``).

    Example::

        storage = DatabaseStorage("postgresql+psycopg://app@db:5432/app")
        store = CheckpointStore(run.id, storage=storage)
    """

    def __init__(self, database_url: str | URL | None = None, *, chunk_size: int = CHUNK_SIZE):
        #: The database (None: ``TASKKIT_DATABASE_URL``).
        self.database_url = database_url
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1 byte, got {chunk_size}")
        self.chunk_size = chunk_size

    def __repr__(self) -> str:
        if self.database_url is None:
            return "DatabaseStorage()"
        return f"DatabaseStorage({make_url(self.database_url).render_as_string()!r})"  # no password

    def write(
        self,
        run_id: str,
        step: int,
        data: Sequence[Buffer],
        manifest: Callable[[], CheckpointInfo],
    ) -> None:
        """Insert the record, the chunks, then the manifest; commit once."""
        run_id = validate_run_id(run_id)
        with session_scope(self.database_url) as db:
            db.execute(
                delete(CheckpointRecord).where(
                    CheckpointRecord.run_id == run_id, CheckpointRecord.step == step
                )
            )
            record = CheckpointRecord(run_id=run_id, step=step, size=0, manifest="")
            db.add(record)
            db.flush()
            chunks = _rechunk(data, self.chunk_size)
            driver = _psycopg(db)
            if driver is not None:
                size = _copy_in(driver, record.id, chunks)
            else:
                size = 0
                for seq, chunk in enumerate(chunks):
                    db.execute(
                        insert(CheckpointChunk).values(checkpoint_id=record.id, seq=seq, data=chunk)
                    )
                    size += len(chunk)
            info = manifest()
            record.size = size
            record.manifest = info.to_json().decode()

    def infos(self, run_id: str) -> list[CheckpointInfo]:
        """The run's manifests, oldest step first; an unreadable one, or one whose step is not
        its record's, is skipped with a warning."""
        run_id = validate_run_id(run_id)
        with session_scope(self.database_url, readonly=True) as db:
            rows = db.execute(
                select(CheckpointRecord.step, CheckpointRecord.manifest)
                .where(CheckpointRecord.run_id == run_id)
                .order_by(CheckpointRecord.step)
            ).all()
        found = []
        for step, text in rows:
            try:
                info = CheckpointInfo.from_json(text)
            except ValueError as exc:
                _warn(
                    f"checkpoint manifest of run {run_id!r}, step {step} in the database "
                    f"is unreadable, ignored: {exc}"
                )
                continue
            if info.step != step:
                _warn(
                    f"checkpoint manifest of run {run_id!r}, step {step} in the database "
                    f"describes step {info.step} (copied?); ignored"
                )
                continue
            found.append(info)
        return sorted(found, key=lambda info: info.step)

    def read(self, run_id: str, step: int) -> Buffer:
        """The chunks of a step, concatenated; ``FileNotFoundError`` when the step has none."""
        return self._read(run_id, step, None)

    def read_hashed(self, run_id: str, step: int, algorithm: str = DIGEST) -> Hashed:
        """``read``, and the digest (``algorithm``: BLAKE3 unless the manifest names another)
        of the bytes, each chunk hashed on a second thread while the next one is fetched."""
        digest: StreamDigest | None = None

        def start(size: int) -> StreamDigest:
            nonlocal digest
            digest = StreamDigest(threaded=size >= _THREAD_MIN, algorithm=algorithm)
            return digest

        try:
            data = self._read(run_id, step, start)
        finally:
            if digest is not None:
                digest.close()
        assert digest is not None
        return Hashed(data, digest.hexdigest(), algorithm)

    def _read(self, run_id: str, step: int, start: Callable[[int], StreamDigest] | None) -> Buffer:
        run_id = validate_run_id(run_id)
        with session_scope(self.database_url, readonly=True) as db:
            record_id = db.scalar(
                select(CheckpointRecord.id).where(
                    CheckpointRecord.run_id == run_id, CheckpointRecord.step == step
                )
            )
            if record_id is None:
                raise FileNotFoundError(f"no checkpoint data for run {run_id!r}, step {step}")
            total = db.scalar(
                select(func.coalesce(func.sum(func.length(CheckpointChunk.data)), 0)).where(
                    CheckpointChunk.checkpoint_id == record_id
                )
            )
            view = writable_buffer(int(total or 0))
            digest = None if start is None else start(view.nbytes)
            done = 0
            driver = _psycopg(db)
            chunks: Generator[bytes, None, None] | ScalarResult[bytes] = (
                _binary_chunks(driver, record_id)
                if driver is not None
                else db.execute(
                    select(CheckpointChunk.data)
                    .where(CheckpointChunk.checkpoint_id == record_id)
                    .order_by(CheckpointChunk.seq)
                    .execution_options(yield_per=1)  # one chunk in memory at a time
                ).scalars()
            )
            try:
                for chunk in chunks:
                    end = min(done + len(chunk), view.nbytes)
                    view[done:end] = chunk[: end - done]
                    if digest is not None:
                        digest.update(view[done:end])
                    done += len(chunk)
            finally:
                chunks.close()  # the server-side cursor, before the transaction ends
        if done != view.nbytes:  # changed while being read: the checksum will tell
            return view[: min(done, view.nbytes)]
        return view

    def delete(self, run_id: str, step: int) -> None:
        """Delete the record and its chunks in one transaction."""
        run_id = validate_run_id(run_id)
        with session_scope(self.database_url) as db:
            ids = select(CheckpointRecord.id).where(
                CheckpointRecord.run_id == run_id, CheckpointRecord.step == step
            )
            # Chunks explicitly, not only by ON DELETE CASCADE: SQLite enforces foreign keys
            # only on connections that enabled them.
            db.execute(delete(CheckpointChunk).where(CheckpointChunk.checkpoint_id.in_(ids)))
            db.execute(
                delete(CheckpointRecord).where(
                    CheckpointRecord.run_id == run_id, CheckpointRecord.step == step
                )
            )

    def runs(self) -> list[str]:
        """Run ids that have at least one checkpoint."""
        with session_scope(self.database_url, readonly=True) as db:
            return list(
                db.scalars(
                    select(CheckpointRecord.run_id).distinct().order_by(CheckpointRecord.run_id)
                )
            )

    def remove_orphans(self, run_id: str) -> int:
        """Nothing to do: a checkpoint is one transaction, so a crash leaves no partial rows."""
        validate_run_id(run_id)
        return 0


def _warn(message: str) -> None:
    warnings.warn(CheckpointWarning(message), stacklevel=3)


def _psycopg(db: Session) -> Any | None:
    """The psycopg (3) connection under ``db``'s transaction on PostgreSQL; None otherwise."""
    connection = db.connection()
    dialect = connection.dialect
    if dialect.name != "postgresql" or dialect.driver != "psycopg":
        return None
    return connection.connection.driver_connection


def _copy_in(driver: Any, record_id: int, chunks: Iterator[Buffer]) -> int:
    """Stream ``chunks`` into ``checkpoint_chunks`` with one binary ``COPY``; the byte count."""
    size = 0
    with (
        driver.cursor() as cursor,
        cursor.copy(
            "COPY checkpoint_chunks (checkpoint_id, seq, data) FROM STDIN (FORMAT BINARY)"
        ) as copy,
    ):
        copy.set_types(["int8", "int4", "bytea"])
        for seq, chunk in enumerate(chunks):
            copy.write_row((record_id, seq, chunk))
            size += len(chunk)
    return size


def _binary_chunks(driver: Any, record_id: int) -> Generator[bytes, None, None]:
    """The record's chunks in order, in binary format, one row per round trip (a server-side
    cursor: never more than one chunk in memory)."""
    with driver.cursor(name="taskkit_checkpoint_read", binary=True) as cursor:
        cursor.itersize = 1
        cursor.execute(
            "SELECT data FROM checkpoint_chunks WHERE checkpoint_id = %s ORDER BY seq",
            (record_id,),
        )
        for (chunk,) in cursor:
            yield chunk


def _rechunk(buffers: Sequence[Buffer], size: int) -> Iterator[Buffer]:
    """The bytes of ``buffers`` in pieces of ``size`` (the last shorter); slices, not copies,
    except where a piece spans two buffers."""
    pending = bytearray()
    for buffer in buffers:
        view = memoryview(buffer).cast("B") if not isinstance(buffer, bytes) else memoryview(buffer)
        if pending:
            take = size - len(pending)
            pending += view[:take]
            view = view[take:]
            if len(pending) < size:
                continue
            yield bytes(pending)
            pending = bytearray()
        while view.nbytes >= size:
            yield view[:size]
            view = view[size:]
        pending += view
    if pending:
        yield bytes(pending)
