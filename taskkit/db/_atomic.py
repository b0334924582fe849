"""``atomic_update``: change one row without losing a concurrent update."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping
from typing import Any

from sqlalchemy import ColumnElement, inspect, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from taskkit._utils import TEST_MODE, check_int
from taskkit.db.classify import is_transient
from taskkit.errors import ConcurrentUpdateError, ConfigurationError

__all__ = ["atomic_update"]

#: Waits between compare-and-swap attempts: random, up to 5 ms doubling to at most 200 ms.
_FIRST_WAIT = 0.005
_MAX_WAIT = 0.2


def atomic_update(
    db: Session,
    model_class: type[Any],
    record_id: Any,
    updates: Mapping[str, Any],
    max_retries: int = 5,
    *,
    commit: bool = True,
    sleep: Callable[[float], object] = time.sleep,
    rng: random.Random | None = None,
) -> bool:
    """Update one row by primary key so that no concurrent update is lost; bump its version.

    Each value in ``updates`` is one of:

    - an SQL expression, such as ``ModelRun.usage_count + 1``: computed by the database in the
      same statement, so it cannot race. **This is the safe form for counters.**
    - a callable, such as ``lambda row: row.usage_count + 1``: called with the current row;
      the new values are then written with a compare-and-swap on the version column
      (``UPDATE ... WHERE id = :id AND version = :read``). If another writer got there first,
      the row is read again and the callable called again, up to ``max_retries`` more times
      with short random waits; then ``ConcurrentUpdateError`` is raised and nothing is written.
    - a constant: written as is (last writer wins).

    Why the seed's own example is not safe: it reads ``model.usage_count`` and passes
    ``model.usage_count + 1`` as a constant. Two processes that read 7 both write 8, and one
    increment is lost, whatever the function does afterwards, because the value was computed
    before it was called. Pass the expression (or a callable) instead.

    Returns True when the row was updated and False when there is no row with ``record_id``.
    The session's copy of the row, if loaded, is expired, so it shows the new values next time.

    Transactions: with ``commit=True`` (the default: the seed's caller never commits) the
    session is committed first, if it holds a transaction, and each attempt runs and commits
    in its own, so a conflict or a "database is locked" can be rolled back and retried without
    touching your work. With ``commit=False`` each attempt runs in a savepoint of your
    transaction and you commit it; a transient database error then propagates (your
    transaction is no longer usable; ``db_retry`` around your function retries it whole).

    Example::

        atomic_update(db, ModelRun, run_id, {"usage_count": ModelRun.usage_count + 1})
        atomic_update(db, ModelRun, run_id, {"config": lambda run: {**run.config, "lr": 0.1}})
    """
    check_int("max_retries", max_retries, 0)
    mapper = inspect(model_class, raiseerr=False)
    if mapper is None or not hasattr(mapper, "primary_key"):
        raise ConfigurationError(f"atomic_update needs a mapped model class, got {model_class!r}")
    if len(mapper.primary_key) != 1:
        raise ConfigurationError(f"atomic_update needs a single-column primary key on {mapper}")
    version_column = mapper.version_id_col
    if version_column is None:
        raise ConfigurationError(
            f"{model_class.__name__} has no version column (version_id_col) to compare and swap"
        )
    unknown = sorted(set(updates) - set(mapper.column_attrs.keys()))
    if unknown:
        raise ConfigurationError(
            f"atomic_update: {model_class.__name__} has no column {', '.join(unknown)}"
        )
    pk = mapper.primary_key[0]
    version = mapper.get_property_by_column(version_column).key
    version_attr = getattr(model_class, version)
    per_row = {k: v for k, v in updates.items() if _is_row_function(v)}
    rng = rng or random.Random()

    if commit and db.in_transaction():
        db.commit()
    attempts = max_retries + 1
    for attempt in range(1, attempts + 1):
        try:
            outcome = _attempt(
                db, model_class, pk, record_id, updates, per_row, version_attr, version, commit
            )
        except SQLAlchemyError as error:
            # SQLite's "database is locked" while upgrading a read to a write, PostgreSQL's
            # serialization failure or deadlock: the same as losing the race.
            if not (commit and is_transient(error)):
                raise
            db.rollback()
            outcome = None
        if outcome is not None:
            if outcome:
                _expire_loaded_copy(db, model_class, record_id)
            return outcome
        if attempt < attempts and not TEST_MODE.active:
            sleep(rng.uniform(0, min(_MAX_WAIT, _FIRST_WAIT * 2 ** (attempt - 1))))
    raise ConcurrentUpdateError(model_class.__name__, record_id, attempts)


def _is_row_function(value: object) -> bool:
    if isinstance(value, ColumnElement) or hasattr(value, "__clause_element__"):
        return False
    return callable(value)


def _attempt(
    db: Session,
    model_class: type[Any],
    pk: Any,
    record_id: Any,
    updates: Mapping[str, Any],
    per_row: Mapping[str, Callable[[Any], Any]],
    version_attr: Any,
    version: str,
    commit: bool,
) -> bool | None:
    """True: updated. False: no such row. None: lost the race (nothing was written)."""
    nested = None if commit else db.begin_nested()
    try:
        if per_row:
            row = db.execute(
                select(model_class).where(pk == record_id).execution_options(populate_existing=True)
            ).scalar_one_or_none()
            if row is None:
                return _finish(db, nested, commit, False)
            read_version = getattr(row, version)
            values = {
                key: (per_row[key](row) if key in per_row else value)
                for key, value in updates.items()
            }
            values[version] = read_version + 1
            condition = (pk == record_id) & (version_attr == read_version)
        else:
            values = {**updates, version: version_attr + 1}
            condition = pk == record_id
        statement = update(model_class).where(condition).values(values)
        result = db.execute(statement, execution_options={"synchronize_session": False})
        if result.rowcount == 1:  # type: ignore[attr-defined]
            return _finish(db, nested, commit, True)
        if per_row:
            # The row was there a moment ago: someone else changed (or deleted) it.
            exists = db.execute(select(pk).where(pk == record_id)).first() is not None
            if not exists:
                return _finish(db, nested, commit, False)
            if nested is not None:
                nested.rollback()
                nested = None
            else:
                db.rollback()  # a fresh snapshot for the next read
            return None
        return _finish(db, nested, commit, False)
    except BaseException:
        if nested is not None and nested.is_active:
            nested.rollback()
        raise


def _finish(db: Session, nested: Any, commit: bool, outcome: bool) -> bool:
    if nested is not None:
        nested.commit()
    if commit:
        db.commit()
    return outcome


def _expire_loaded_copy(db: Session, model_class: type[Any], record_id: Any) -> None:
    loaded = db.identity_map.get(db.identity_key(model_class, record_id))
    if loaded is not None:
        db.expire(loaded)
