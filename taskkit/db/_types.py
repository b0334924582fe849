"""Column types that behave the same on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, DateTime
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator

__all__ = ["Json", "UTCDateTime", "utcnow"]


def utcnow() -> datetime:
    """The current time, timezone-aware, in UTC."""
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp that is always an aware UTC ``datetime`` in Python.

    PostgreSQL stores ``timestamptz``; SQLite has no time zones, so UTC is stored there. A
    naive value (the seed's ``datetime.utcnow()``) is taken to be UTC already.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return _as_utc(value)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return _as_utc(value)


def _as_utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    if value.tzinfo is UTC:  # utcnow's, the usual case: astimezone would copy it unchanged
        return value
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


#: JSON (JSONB on PostgreSQL). ``None`` is stored as SQL NULL, not as the JSON text ``null``,
#: so a NOT NULL column rejects a missing value instead of storing ``null``.
Json: Any = JSON(none_as_null=True).with_variant(JSONB(none_as_null=True), "postgresql")
