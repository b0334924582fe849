"""COPY for ``safe_bulk_insert`` on PostgreSQL (psycopg 3): rows prepared as SQLAlchemy would
bind them, streamed with ``cursor.copy``, and where a COPY fails, the row it failed on.

The values sent are the ones an ``INSERT`` of the same dicts would send: each column type's
bind processor for the dialect (JSON wrapped for psycopg with the engine's serializer, a naive
timestamp made UTC by ``UTCDateTime``), and the Python-side defaults of the columns a record
leaves out (a scalar, or a callable, evaluated per row as SQLAlchemy does). Columns whose
default is the server's (``server_default``, an identity or serial key) are left out of the
COPY so the server fills them. A default that only SQL can compute (a SQL expression or a
``Sequence``) cannot be sent by COPY: those records take the ``INSERT`` path.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from sqlalchemy import Column, Connection, Table
from sqlalchemy.exc import DBAPIError

__all__ = ["Copier", "CopyFailed", "copier_for"]

# The context PostgreSQL gives an error raised by one row of a COPY ("COPY predictions, line
# 4322, column prediction: ..."); absent for errors raised at the end of the statement (a
# foreign key, a deferred constraint), and translated in other server locales: then the row is
# not known and the caller bisects.
_COPY_LINE = re.compile(r"\bCOPY [^,]+, line (\d+)")


class CopyFailed(Exception):
    """A COPY was rejected because of a record: ``index`` is the row it failed on, if known."""

    def __init__(self, index: int | None, error: BaseException) -> None:
        super().__init__(index, error)
        self.index = index
        self.error = error


class _Context:
    """What a context-sensitive column default may ask of SQLAlchemy's execution context."""

    __slots__ = ("_row",)

    def __init__(self, row: Mapping[str, Any]) -> None:
        self._row = row

    @property
    def current_parameters(self) -> dict[str, Any]:
        return dict(self._row)

    def get_current_parameters(self, isolate_multiinsert_groups: bool = True) -> dict[str, Any]:
        return dict(self._row)


# A plan for one set of row keys: the columns COPY sends, and the function that makes a row
# dict into their values (``_row_function``).
_Plan = tuple[list[str], Callable[[Mapping[str, Any]], tuple[Any, ...]]]
# A column of a plan: (key in the row dict, default or None, bind processor or None).
_Column = tuple[str, Any, Callable[[Any], Any] | None]


class Copier:
    """Streams row dicts (keyed by column key) into one table with COPY, on one connection."""

    def __init__(self, connection: Connection, table: Table) -> None:
        from psycopg import sql  # noqa: PLC0415 - psycopg is optional (taskkit[postgres])

        self._connection = connection
        self._table = table
        self._dialect = connection.dialect
        self._sql = sql
        self._plans: dict[frozenset[str], _Plan | None] = {}
        self._processors: dict[str, Callable[[Any], Any] | None] = {}

    def usable(self, rows: Sequence[Mapping[str, Any]]) -> bool:
        """True when COPY can send these rows (no absent column needs a SQL-side default)."""
        keys: frozenset[str] = frozenset()
        for index, row in enumerate(rows):
            if not index or row.keys() != keys:
                keys = frozenset(row)
                if self._plan(keys) is None:
                    return False
        return True

    def copy(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """COPY ``rows`` (``usable``) into the table, in order, in the current transaction.

        Raises ``CopyFailed`` when a record made it fail (a constraint, a value the column or
        the driver cannot take), with the index of that record when known; anything else (a
        lost connection, a missing table) propagates as SQLAlchemy's ``DBAPIError``.
        """
        import psycopg  # noqa: PLC0415 - optional

        driver = self._connection.connection.driver_connection
        assert isinstance(driver, psycopg.Connection)
        index = started = 0
        try:
            with driver.cursor() as cursor:
                while index < len(rows):
                    keys = frozenset(rows[index])
                    plan = self._plan(keys)
                    assert plan is not None
                    names, values = plan
                    started = index
                    statement = self._sql.SQL("COPY {} ({}) FROM STDIN").format(
                        self._sql.Identifier(*filter(None, (self._table.schema, self._table.name))),
                        self._sql.SQL(", ").join(map(self._sql.Identifier, names)),
                    )
                    with cursor.copy(statement) as copy:
                        write = copy.write_row
                        while index < len(rows):
                            row = rows[index]
                            if row.keys() != keys:
                                break  # another set of columns: another COPY
                            write(values(row))
                            index += 1
        except (psycopg.IntegrityError, psycopg.DataError) as error:
            line = _failed_line(error)
            raise CopyFailed(None if line is None else started + line, error) from error
        except psycopg.Error as error:
            raise _translated(self._connection, error) from error
        except (TypeError, ValueError, OverflowError) as error:
            # Raised in Python while writing row ``index`` (a value that is not JSON); psycopg
            # has already ended the COPY with an error, so nothing of it stays.
            raise CopyFailed(index, error) from error

    def _plan(self, keys: frozenset[str]) -> _Plan | None:
        if keys in self._plans:
            return self._plans[keys]
        names: list[str] = []
        columns: list[_Column] = []
        plan: _Plan | None = None
        for column in self._table.columns:
            default = None
            if column.key not in keys:
                default = column.default
                if default is None:
                    continue  # NULL, the server default, an identity or serial key
                if not (default.is_scalar or default.is_callable):
                    break  # a SQL expression or a Sequence: COPY cannot send it
            names.append(column.name)
            columns.append((column.key, default, self._processor(column)))
        else:
            plan = (names, _row_function(columns))
        self._plans[keys] = plan
        return plan

    def _processor(self, column: Column[Any]) -> Callable[[Any], Any] | None:
        if column.key not in self._processors:
            implementation = column.type.dialect_impl(self._dialect)
            self._processors[column.key] = implementation.bind_processor(self._dialect)
        return self._processors[column.key]


def _row_function(columns: list[_Column]) -> Callable[[Mapping[str, Any]], tuple[Any, ...]]:
    """The values of ``columns`` for one row dict, as a function compiled for this plan: each
    column's value from the row or its default (a callable one called per row with the row as
    its context, as SQLAlchemy does), through its bind processor unless it is None.

    Decision: generated source rather than a loop over the columns, its tuple unpacking and its
    branches per column: for ``Prediction``'s six columns (two JSON, a timestamp default) the
    loop took 1.4 to 1.7 µs a row here, this function 1.1 to 1.3 (a tuple written by hand, with
    no conversions or defaults, 0.3 to 0.5), about 30 ms of 100,000 rows. Only generated names
    are interpolated into the source; keys, defaults and processors are bound as variables.
    """
    namespace: dict[str, Any] = {"_Context": _Context}
    parts: list[str] = []
    contextual = False
    for n, (key, default, process) in enumerate(columns):
        namespace[f"k{n}"], namespace[f"p{n}"] = key, process
        if default is None:
            value = f"row[k{n}]"
        elif default.is_callable:
            namespace[f"d{n}"] = default.arg
            value, contextual = f"d{n}(context)", True
        else:
            namespace[f"d{n}"] = default.arg
            value = f"d{n}"
        if process is not None:
            value = f"(None if (v{n} := {value}) is None else p{n}(v{n}))"
        parts.append(value)
    source = "def values(row):\n"
    if contextual:
        source += "    context = _Context(row)\n"
    source += f"    return ({', '.join(parts)}{',' if parts else ''})\n"
    exec(source, namespace)  # our own source: generated names only
    function: Callable[[Mapping[str, Any]], tuple[Any, ...]] = namespace["values"]
    return function


def copier_for(connection: Connection, table: Table) -> Copier | None:
    """A ``Copier`` when ``connection`` is PostgreSQL through psycopg 3, else ``None``."""
    dialect = connection.dialect
    if dialect.name != "postgresql" or dialect.driver != "psycopg":
        return None
    return Copier(connection, table)


def _failed_line(error: BaseException) -> int | None:
    """The 0-based row of its COPY statement that ``error`` names, if it names one."""
    context = getattr(getattr(error, "diag", None), "context", None) or ""
    found = _COPY_LINE.search(context)
    return int(found.group(1)) - 1 if found else None


def _translated(connection: Connection, error: Exception) -> Exception:
    """psycopg's error as SQLAlchemy raises it from ``execute`` (OperationalError, ...)."""
    import psycopg  # noqa: PLC0415 - optional

    # A lost connection is invalidated by SQLAlchemy itself when the savepoint around the
    # COPY is rolled back on it; that error then propagates, with this one as its context.
    return DBAPIError.instance(
        "COPY ... FROM STDIN", None, error, psycopg.Error, dialect=connection.dialect
    )
