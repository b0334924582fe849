"""Small helpers that several taskkit packages share: keeping a wrapped function recognisable,
checking option values, the process-wide test switch, recognising a framework's control flow,
and switching a SQLite file to WAL.

They live here, at the root, so that no package reaches into another's private modules.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import inspect
import logging
import os
import re
import sqlite3
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from taskkit.errors import ConfigurationError

__all__ = [
    "CONTROL_FLOW",
    "TEST_MODE",
    "TestMode",
    "call_hook",
    "check_batch_options",
    "check_int",
    "check_seconds",
    "did_you_mean",
    "exception_tuple",
    "fits_row_id",
    "fsync_dir",
    "is_control_flow",
    "keep_identity",
    "keyword_only",
    "mask_password",
    "qualified_name",
    "reject_unknown",
    "sqlite_wal",
]


def keep_identity(wrapper: Callable[..., Any], fn: Callable[..., Any], **attributes: Any) -> Any:
    """Give ``wrapper`` the name, docstring, ``__wrapped__`` and signature of ``fn``.

    ``inspect.signature`` follows ``__wrapped__``, but Celery's argument check
    (``inspect.getfullargspec``) does not; both honour ``__signature__``, so it is set too.
    """
    functools.update_wrapper(wrapper, fn)
    # Builtins and C functions may have no signature to copy.
    with contextlib.suppress(TypeError, ValueError):
        wrapper.__signature__ = inspect.signature(fn)  # type: ignore[attr-defined]
    for name, value in attributes.items():
        setattr(wrapper, name, value)
    return wrapper


def qualified_name(fn: object) -> str:
    """A readable name for logs and errors."""
    return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)


def exception_tuple(option: str, value: object) -> tuple[type[BaseException], ...]:
    """``value`` as a tuple of exception classes, or a ``ConfigurationError`` naming ``option``."""
    items = value if isinstance(value, tuple) else (value,)
    if not items or not all(isinstance(e, type) and issubclass(e, BaseException) for e in items):
        raise ConfigurationError(
            f"{option} must be an exception class or a tuple of them, got {value!r}"
        )
    return cast(tuple[type[BaseException], ...], items)


def check_int(option: str, value: object, minimum: int) -> None:
    """Raise a ``ConfigurationError`` naming ``option`` unless ``value`` is an int >= minimum."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigurationError(f"{option} must be an integer >= {minimum}, got {value!r}")


def check_seconds(option: str, value: object) -> None:
    """Raise a ``ConfigurationError`` naming ``option`` unless ``value`` is a number > 0."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ConfigurationError(f"{option} must be a number of seconds > 0, got {value!r}")


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """``"; did you mean 'x'?"`` for the closest of ``known`` to a misspelt ``name``, or ``""``."""
    close = difflib.get_close_matches(name, sorted(known), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def reject_unknown(
    caller: str, given: Iterable[str], known: Collection[str], *, takes: str = ""
) -> None:
    """Raise a ``ConfigurationError`` for the first name in ``given`` that is not in ``known``,
    suggesting the closest known one (``item_dealy`` -> ``item_delay``)."""
    for name in sorted(given):
        if name not in known:
            raise ConfigurationError(
                f"{caller}: unknown option {name!r}{did_you_mean(name, known)}{takes}"
            )


@functools.cache
def keyword_only(fn: Callable[..., Any]) -> frozenset[str]:
    """The names of ``fn``'s keyword-only parameters: what a ``**options`` passed to it may name."""
    return frozenset(
        name
        for name, parameter in inspect.signature(fn).parameters.items()
        if parameter.kind is inspect.Parameter.KEYWORD_ONLY
    )


def check_batch_options(
    caller: str, options: Iterable[str], batch_function: Callable[..., Any]
) -> None:
    """Raise a ``ConfigurationError`` for an option ``batch_function`` (``batch_with_retry``)
    does not take."""
    known = keyword_only(batch_function)
    reject_unknown(
        caller,
        options,
        known,
        takes=f" (options are passed to batch_with_retry, which takes {', '.join(sorted(known))})",
    )


def call_hook(hook: Callable[..., object], *args: object) -> None:
    """Call a user hook; log (never raise) what it raises: observing must never fail a call."""
    try:
        hook(*args)
    except Exception:
        logging.getLogger("taskkit").exception(
            "taskkit: hook %r raised; ignored", getattr(hook, "__name__", hook)
        )


_PASSWORD = re.compile(r"(://[^:/@\s]*):[^@/\s]+@")


def mask_password(url: str) -> str:
    """``url`` with every password replaced by ``***`` (``redis://:***@host``); for anything
    shown to people: reprs, logs, errors, CLI output.

    >>> mask_password("postgresql+psycopg://app:s3cret@db:5432/app")
    'postgresql+psycopg://app:***@db:5432/app'
    """
    return _PASSWORD.sub(r"\1:***@", url)


#: Row ids are 64-bit signed integers in every database taskkit supports.
_MAX_ROW_ID = 2**63 - 1


def fits_row_id(value: int) -> bool:
    """Whether a database row can have this id. Asking SQLite or PostgreSQL for one past a
    64-bit integer fails as an overflow, which would read as an outage, not "no such row"."""
    return 1 <= value <= _MAX_ROW_ID


def fsync_dir(path: Path) -> None:
    """Make the entries of directory ``path`` durable (a new or renamed file's name survives a
    crash). Nothing to do on Windows, where directories cannot be opened."""
    if os.name == "nt":
        return
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- the test switch ------------------------------------------------------------------------------
# Flipped by ``taskkit.testing``; read by ``retry`` and ``batch_with_retry`` only after a failure,
# never on the happy path.


@dataclass
class TestMode:
    """When ``active``: every wait is zero, and attempts are capped at ``max_attempts``."""

    __test__ = False  # not a pytest test class

    active: bool = False
    max_attempts: int | None = None

    def cap(self, attempts: int) -> int:
        if self.active and self.max_attempts is not None:
            return min(attempts, self.max_attempts)
        return attempts


TEST_MODE = TestMode()


# -- control flow ---------------------------------------------------------------------------------
# Celery's ``self.retry()`` raises ``celery.exceptions.Retry`` *after* it has already queued the
# retry message; ``Ignore`` and ``Reject`` tell the worker what to do with the message; a soft
# time limit must reach the task. If ``retry`` re-ran the function on ``Retry``, every attempt
# would queue one more message and the task would run several times; if a breaker counted it,
# a task's own retries would open the circuit. So every primitive lets these pass untouched:
# not retried, not counted, not turned into a fallback value. They are recognised by the module
# that defines them, so this module imports no framework.

#: (defining module, class name) of the exceptions that are control flow.
CONTROL_FLOW = frozenset(
    {
        ("celery.exceptions", "Retry"),
        ("celery.exceptions", "Ignore"),
        ("celery.exceptions", "Reject"),
        ("billiard.exceptions", "SoftTimeLimitExceeded"),
        ("billiard.exceptions", "TimeLimitExceeded"),
    }
)

_verdicts: dict[type[BaseException], bool] = {}


def is_control_flow(error: BaseException) -> bool:
    """True for a Celery ``Retry``/``Ignore``/``Reject`` or a time limit (or a subclass)."""
    kind = type(error)
    verdict = _verdicts.get(kind)
    if verdict is None:
        verdict = any((c.__module__, c.__qualname__) in CONTROL_FLOW for c in kind.__mro__)
        _verdicts[kind] = verdict
    return verdict


def sqlite_wal(
    cursor: Any,
    timeout: float,
    *,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """``PRAGMA journal_mode=WAL`` on a new SQLite connection (or its cursor), tried again for
    up to ``timeout`` seconds while the database is locked.

    Why: switching a database file to WAL needs its exclusive lock, and SQLite answers "database
    is locked" at once when another connection holds a lock then, without waiting its busy
    timeout. Processes or threads that open a new database file at the same moment hit it: one
    of four concurrent ``upgrade`` calls on a fresh file failed to connect about once in four
    runs. The mode is stored in the file, so once one connection switched it the others find
    it switched. A loop of its own, not ``taskkit.recovery.retry``: this module sits below
    that layer (the engine and the SQLite broker both call it), and waiting for a lock while
    connecting is not a retry worth its events and log lines. Example::

        sqlite_wal(sqlite3.connect("taskkit.db", timeout=30), 30.0)
    """
    deadline = clock() + timeout
    delay = 0.005
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as error:
            if "locked" not in str(error) or clock() >= deadline:
                raise
        sleep(delay)
        delay = min(2 * delay, 0.1)
