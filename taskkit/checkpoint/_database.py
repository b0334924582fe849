"""``DatabaseStorage``: checkpoints in taskkit's database, in chunks, one transaction each."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence

from sqlalchemy import delete, func, insert, select
from sqlalchemy.engine import URL, make_url

from taskkit.checkpoint._codec import Buffer, writable_buffer
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
            size = 0
            for seq, chunk in enumerate(_rechunk(data, self.chunk_size)):
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
            done = 0
            chunks = db.execute(
                select(CheckpointChunk.data)
                .where(CheckpointChunk.checkpoint_id == record_id)
                .order_by(CheckpointChunk.seq)
                .execution_options(yield_per=1)  # one chunk in memory at a time
            ).scalars()
            for chunk in chunks:
                end = min(done + len(chunk), view.nbytes)
                view[done:end] = chunk[: end - done]
                done += len(chunk)
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
