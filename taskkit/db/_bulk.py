"""``safe_bulk_insert``: insert many rows; the good ones all land, each bad one is reported."""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Callable, Iterable, Mapping
from operator import itemgetter
from typing import Any, NamedTuple

from sqlalchemy import Column, PrimaryKeyConstraint, Table, UniqueConstraint, inspect
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError, StatementError
from sqlalchemy.orm import Session

from taskkit._utils import check_int
from taskkit.db._copy import CopyFailed, copier_for
from taskkit.db.classify import driver_message
from taskkit.errors import ConfigurationError

__all__ = ["BulkInsertResult", "safe_bulk_insert"]

# What a bad record makes the database raise: a constraint or a value it cannot take.
_RECORD_ERRORS = (IntegrityError, DataError)


#: Dicts per COPY on PostgreSQL (at least ``batch_size``): a quarter of the rows copied since the
#: last COPY that failed, at least ``COPY_ROWS`` and at most ``COPY_ROWS_MAX``. Why: each COPY
#: ends with the client waiting for the server to insert the rows it still holds (~3 ms here,
#: ~0.15 s of 50 COPYs of 2,000 per 100,000 rows, which one long COPY overlaps with sending),
#: so clean input wants long COPYs; but a bad record that no scan saw (a key already in the
#: table) fails its COPY, and the rows before it in that COPY are copied again. Sized by the
#: clean run before it, that second copy is at most a quarter of the rows copied cleanly since
#: the last failure (an eighth on average); doubling after each clean COPY instead made 10
#: such records in 100,000 rows cost 1.4x (docs/db.md has the measurement; docs/benchmarks.md,
#: "Bulk insert", the speed without them).
COPY_ROWS = 2000
COPY_ROWS_MAX = 16000

_INSERTING = contextvars.ContextVar("taskkit_safe_bulk_insert", default=False)


class _ExpectedPipelineAbort(logging.Filter):
    """Drop psycopg's warning that a failed batch aborted its pipeline, inside our own calls.

    psycopg sends a batch as a pipeline; when one row violates a constraint it logs "error
    ignored terminating <Pipeline>: pipeline aborted" besides raising the real error, which
    safe_bulk_insert handles. Outside safe_bulk_insert the warning passes untouched.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not (_INSERTING.get() and str(record.msg).startswith("error ignored terminating"))


logging.getLogger("psycopg").addFilter(_ExpectedPipelineAbort())


class BulkInsertResult(NamedTuple):
    """What ``safe_bulk_insert`` did; unpacks as ``successful, failed``."""

    #: The records that were inserted, in input order within each batch.
    successful: list[Any]
    #: ``(record, error)`` for each record that was not: the database's message, one line.
    failed: list[tuple[Any, str]]


def safe_bulk_insert(
    db: Session,
    model_class: type[Any],
    records: Iterable[Mapping[str, Any] | Any],
    batch_size: int = 100,
    *,
    commit: bool = True,
) -> BulkInsertResult:
    """Insert ``records`` in batches; isolate bad records by bisection, insert all the others.

    ``records`` are dicts of column values (fast: one bulk ``INSERT`` execution per batch,
    pipelined by psycopg on PostgreSQL, with the model's Python-side defaults applied) or model
    instances (added and flushed per batch).

    Each batch runs in a savepoint. When one fails, only that savepoint is rolled back and the
    batch is split in halves, each tried again the same way, so a batch of 100 with one bad
    record costs about 14 small statements, not 100, and every good record lands. A record
    that fails on its own is returned in ``failed`` as ``(record, message)`` with the
    database's message (a NOT NULL or unique violation, a value of the wrong type). A key that
    is not a column of ``model_class`` fails that record without a round trip.

    A transient error (the connection dropped mid-way) is not a bad record: it propagates, and
    nothing of this call is committed, so the whole call can be retried (with ``db_retry``)
    without inserting anything twice.

    With ``commit=True`` (the default: the seed's caller never commits) the session is
    committed at the end; with ``commit=False`` the inserted rows stay in your transaction.

    On PostgreSQL through psycopg 3, dicts are sent with ``COPY`` instead, each COPY in a
    savepoint, with the values an ``INSERT`` would send (JSON, the column types' conversions,
    Python-side defaults; server defaults left to the server). A COPY holds a quarter of the
    rows copied since the last COPY that failed, at least ``max(batch_size, 2000)`` rows and at
    most ``max(batch_size, 16000)`` (``COPY_ROWS`` says why). When a COPY fails on a record,
    PostgreSQL names its line: the rows before it are copied again, the record is sent alone
    as an ``INSERT`` (so its message is the one an ``INSERT`` gets), and the rest goes on by
    COPY. A row known to fail before it is sent (None for a NOT NULL column, or the values of
    an earlier row of its batch of 16,000 for a primary key, unique constraint or unique index)
    is split off the COPY and sent alone the same way, in its place in the input order, so the
    rows before it are not copied twice. When the row is not named (a foreign key, checked at
    the end of the COPY), the COPY's rows are sent again in the smallest COPYs and the one that
    fails is bisected as above. SQLite, instances and models whose defaults only SQL can
    compute take the ``INSERT`` path.

    Speed: on 100,000 rows with 10 bad ones, the COPY path runs at about 1.6x the speed of a
    plain ORM insert (the ``INSERT`` path, with a savepoint per batch, at 0.64x to 1x);
    ``docs/benchmarks.md`` has the numbers.

    Example::

        successful, failed = safe_bulk_insert(db, Prediction, rows, batch_size=500)
        for record, error in failed:
            logger.error("not saved: %s: %s", record, error)
    """
    check_int("batch_size", batch_size, 1)
    mapper = inspect(model_class, raiseerr=False)
    if mapper is None or not hasattr(mapper, "column_attrs"):
        raise ConfigurationError(
            f"safe_bulk_insert needs a mapped model class, got {model_class!r}"
        )
    columns = frozenset(mapper.column_attrs.keys())
    # Dicts go through Core on the session's connection: its savepoints and inserts skip the
    # ORM's bookkeeping, which the benchmark measured at 10-15% of the whole insert. Column
    # defaults (created_at, version) are still applied by SQLAlchemy.
    statement = mapper.local_table.insert()
    renamed = {
        attr.key: attr.columns[0].key
        for attr in mapper.column_attrs
        if attr.columns[0].key != attr.key
    }
    result = BulkInsertResult([], [])

    def insert_batch(batch: list[Any]) -> None:
        try:
            if isinstance(batch[0], Mapping):
                connection = db.connection()
                rows = (
                    [{renamed.get(k, k): v for k, v in r.items()} for r in batch]
                    if renamed
                    else batch
                )
                with connection.begin_nested():
                    connection.execute(statement, rows)
            else:
                with db.begin_nested():
                    db.add_all(batch)
                    db.flush()
        except (StatementError, TypeError, ValueError) as error:
            # Anything else from the database (a lost connection, a missing table) is not the
            # records' fault: bisecting would only repeat it. A value that cannot be sent (a
            # set in a JSON column: StatementError from SQLAlchemy, TypeError from psycopg) is.
            if isinstance(error, DBAPIError) and not isinstance(error, _RECORD_ERRORS):
                raise
            if len(batch) == 1:
                result.failed.append((batch[0], driver_message(error)))
                return
            middle = len(batch) // 2
            insert_batch(batch[:middle])
            insert_batch(batch[middle:])
        else:
            result.successful.extend(batch)

    def bisect(records: list[Any]) -> None:
        for start in range(0, len(records), batch_size):
            insert_batch(records[start : start + batch_size])

    not_null = [column.key for column in mapper.local_table.columns if not column.nullable]
    unique = _unique_keys(mapper.local_table)

    smallest_copy, largest_copy = max(batch_size, COPY_ROWS), max(batch_size, COPY_ROWS_MAX)
    clean_rows = 0  # rows copied since the last COPY that failed

    def copy_chunk(chunk: list[Any]) -> None:
        nonlocal clean_rows
        connection = db.connection()
        copier = copier_for(connection, mapper.local_table)
        rows = [{renamed.get(k, k): v for k, v in r.items()} for r in chunk] if renamed else chunk
        if copier is None or not copier.usable(rows):
            bisect(chunk)
            return
        # Segments [start, end) of the chunk, or ``(row, None)`` for one row, in input order
        # (a stack: the next one is last). A row known to fail its COPY (None for a NOT NULL
        # column: COPY sends None as NULL; or the same values as an earlier row of the chunk
        # for a unique key) would make the rows before it be copied again: it is split off
        # before the first COPY, and decided alone by the same INSERT that decides a row a
        # COPY failed on, in the same place in the input order. A guess that is wrong only
        # costs that row an INSERT of its own.
        alone = _null_in_not_null(rows, not_null) + _repeated_in_unique(rows, unique)
        work = _segments(len(chunk), sorted(set(alone)))[::-1]
        while work:
            start, end = work.pop()
            if end is None:
                # The row a COPY failed on, alone, as an INSERT: its error is an INSERT's.
                insert_batch([chunk[start]])
                continue
            rows_per_copy = min(max(clean_rows // 4, smallest_copy), largest_copy)
            if end - start > rows_per_copy:  # the rest of the segment: the next COPYs
                work.append((start + rows_per_copy, end))
                end = start + rows_per_copy
            try:
                with connection.begin_nested():
                    copier.copy(rows[start:end])
            except CopyFailed as failed:
                clean_rows = 0
                bad = failed.index
                if bad is None or not 0 <= bad < end - start:
                    if end - start > smallest_copy:  # the row is not known: smaller COPYs
                        work.append((start, end))
                    else:  # ... and then, in the one that fails, bisection
                        bisect(chunk[start:end])
                    continue
                bad += start
                # The rows before it are COPYed again: they may hold a bad row too (a unique
                # violation is found when PostgreSQL flushes its buffer of rows, a NOT NULL
                # at once), then that one is split off the same way.
                if bad + 1 < end:
                    work.append((bad + 1, end))
                work.append((bad, None))
                if bad > start:
                    work.append((start, bad))
            else:
                result.successful.extend(chunk[start:end])
                clean_rows += end - start

    bind = db.get_bind(mapper)
    copies = bind.dialect.name == "postgresql" and bind.dialect.driver == "psycopg"
    dict_batch = max(batch_size, COPY_ROWS_MAX) if copies else batch_size

    token = _INSERTING.set(True)
    try:
        _insert_all(
            records,
            columns,
            model_class,
            (dict_batch, batch_size),
            copy_chunk if copies else insert_batch,
            insert_batch,
            result,
        )
    finally:
        _INSERTING.reset(token)
    if commit:
        db.commit()
    return result


def _null_in_not_null(rows: list[Mapping[str, Any]], not_null: list[str]) -> list[int]:
    """Positions of the rows that give None to one of the ``not_null`` columns."""
    found: list[int] = []
    for key in not_null:  # one pass a column: ~4x cheaper than a test of every column a row
        found += [i for i, row in enumerate(rows) if row.get(key, 0) is None and key in row]
    return found


def _unique_keys(table: Table) -> list[list[str]]:
    """The column keys of each primary key, unique constraint and unique index (of plain
    columns) of ``table``."""
    found = [
        [column.key for column in constraint.columns]
        for constraint in table.constraints
        if isinstance(constraint, PrimaryKeyConstraint | UniqueConstraint)
    ]
    for index in table.indexes:
        if index.unique and all(isinstance(e, Column) for e in index.expressions):
            found.append([column.key for column in index.columns])
    return [keys for keys in found if keys]  # a column's unique=True is one of these


def _repeated_in_unique(rows: list[Mapping[str, Any]], unique: list[list[str]]) -> list[int]:
    """Positions of the rows whose values for one of the ``unique`` keys an earlier row of
    ``rows`` has already given (NULLs never repeat; a row without all of a key's columns, or
    with a value Python cannot hash, is left to the database)."""
    repeated: list[int] = []
    for keys in unique:
        values_of, needed = itemgetter(*keys), frozenset(keys)
        try:  # the usual chunk: every row has the key's columns and no two rows repeat it
            every = list(map(values_of, rows))
            if len(set(every)) == len(every):
                continue
        except (KeyError, TypeError, ValueError):  # a missing column; an unhashable value
            pass
        seen: set[Any] = set()
        for index, row in enumerate(rows):
            if not needed <= row.keys():
                continue
            values = values_of(row)
            if len(keys) == 1:
                values = (values,)
            try:
                if None in values:
                    continue
                if values in seen:
                    repeated.append(index)
                else:
                    seen.add(values)
            except (TypeError, ValueError):  # unhashable, or an == that is not a bool
                continue
    return repeated


def _segments(size: int, alone: list[int]) -> list[tuple[int, int | None]]:
    """``[0, size)`` as segments ``(start, end)`` in order, with each position of ``alone``
    (ascending) as a segment of its own, ``(position, None)``."""
    segments: list[tuple[int, int | None]] = []
    start = 0
    for position in alone:
        if position > start:
            segments.append((start, position))
        segments.append((position, None))
        start = position + 1
    if start < size:
        segments.append((start, size))
    return segments


def _insert_all(
    records: Iterable[Any],
    columns: frozenset[str],
    model_class: type[Any],
    sizes: tuple[int, int],
    insert_dicts: Callable[[list[Any]], None],
    insert_instances: Callable[[list[Any]], None],
    result: BulkInsertResult,
) -> None:
    """Group ``records`` into batches of one kind: dicts of ``sizes[0]``, instances of
    ``sizes[1]``; records that cannot be a row fail here."""
    batch: list[Any] = []
    kind: type | None = None
    size = sizes[0]
    for record in records:
        is_mapping = type(record) is dict or isinstance(record, Mapping)  # dict: no ABC check
        if is_mapping:
            if not columns.issuperset(record):  # no set built for a good record
                unknown = sorted(record.keys() - columns)
                result.failed.append(
                    (record, f"{model_class.__name__} has no column {', '.join(unknown)}")
                )
                continue
        elif not isinstance(record, model_class):
            result.failed.append(
                (record, f"not a dict or a {model_class.__name__}: {type(record).__name__}")
            )
            continue
        record_kind = Mapping if is_mapping else model_class
        # Dicts and instances go to the database differently: one batch holds one kind.
        if batch and (len(batch) >= size or record_kind is not kind):
            (insert_dicts if kind is Mapping else insert_instances)(batch)
            batch = []
        kind = record_kind
        size = sizes[0] if is_mapping else sizes[1]
        batch.append(record)
    if batch:
        (insert_dicts if kind is Mapping else insert_instances)(batch)
