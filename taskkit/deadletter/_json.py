"""Payloads as plain JSON: what a dead letter stores and a replay sends again."""

from __future__ import annotations

import json
import math
from datetime import datetime
from typing import Any

__all__ = ["UNSERIALIZABLE", "jsonable"]

#: Key of the stand-in stored for a payload that is not JSON.
UNSERIALIZABLE = "__unserializable__"


def jsonable(value: Any) -> Any:
    """``value`` as plain JSON data (numpy and pandas scalars, datetimes, tuples converted), or
    ``{"__unserializable__": repr(value)}`` when it cannot be.

    Example::

        jsonable({"x": numpy.int64(3)})   # {"x": 3}
    """
    try:
        return json.loads(json.dumps(value, default=_to_json, allow_nan=False))
    except (TypeError, ValueError, OverflowError):
        return {UNSERIALIZABLE: repr(value)[:10_000]}


def _to_json(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    # numpy / pandas arrays and scalars (tolist first: an array's item() needs size 1)
    for convert in ("tolist", "item", "isoformat"):
        method = getattr(value, convert, None)
        if callable(method):
            converted = method()
            if isinstance(converted, float) and not math.isfinite(converted):
                raise ValueError("not a finite number")
            return converted
    if isinstance(value, set | frozenset):
        return sorted(value, key=repr)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")
