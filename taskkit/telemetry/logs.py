"""Structured logs: a JSON formatter, the ``LOG_*`` settings as a filter, ``configure_logging``.

taskkit writes one log record per retry, give-up, terminal failure, dead letter, resume, lease
takeover and breaker transition, tagged with ``extra={"taskkit_event": KIND, ...}`` (KIND one of
:data:`EVENT_KINDS`) and, where known, ``task``, ``task_id``, ``run_id``, ``attempt`` and
``layer``. In a worker, records logged while a task runs get ``task``, ``task_id`` and
``run_id`` from the running task when their source did not pass them.

Decisions:

- ``TASKKIT_LOG_FORMAT=json`` applies to the whole process's log output, not to taskkit's
  records only: in a worker Celery's own records ("Task ... succeeded", "ready.") are JSON too,
  one object per line, since whoever ships a worker's logs parses one format per process.
  Lines Celery prints itself (the start-up banner) are not log records and stay text.
- The message is the formatted message with passwords of URLs masked
  (``taskkit._utils.mask_password``); a record's raw ``args`` are never written as fields, and
  the exception text is masked the same way.
- ``log_retry_attempts=False`` drops the ``"retry"`` and ``"gave_up"`` records (terminal
  failures, dead letters, resumes and takeovers stay); ``log_circuit_state_changes=False``
  drops ``"circuit_state"`` ones (an alert of an opened breaker is kind ``"alert"`` and is
  governed by ``alert_on_circuit_open``). The filter sits on the handlers, so it sees the
  records of every logger that propagates to them.

Example::

    import logging
    from taskkit.config import Settings
    from taskkit.telemetry.logs import configure_logging

    configure_logging(Settings(log_format="json"))
    logging.getLogger("taskkit.demo").warning("hello")   # {"time": "...", "level": "WARNING", ...}
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from taskkit._utils import mask_password
from taskkit.config import Settings, get_settings

__all__ = [
    "CONTEXT_FIELDS",
    "EVENT_KINDS",
    "EventFilter",
    "JsonFormatter",
    "configure_logging",
]

#: The ``taskkit_event`` kinds of taskkit's records (``"alert"``: an alert notifier's record).
EVENT_KINDS = frozenset(
    {
        "retry",
        "gave_up",
        "terminal_failure",
        "dead_letter",
        "resume",
        "takeover",
        "circuit_state",
        "alert",
    }
)

#: Record attributes written as JSON fields when a record has them (``extra=`` or a filter).
CONTEXT_FIELDS = (
    "task",
    "task_id",
    "run_id",
    "attempt",
    "layer",
    "taskkit_event",
    "breaker",
    "state",
)

_RETRY_KINDS = frozenset({"retry", "gave_up"})


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line: ``time`` (ISO 8601, UTC), ``level``,
    ``logger``, ``message``, the :data:`CONTEXT_FIELDS` the record has, and ``exception`` (the
    traceback text) when it carries one.

    Example::

        handler = logging.StreamHandler()
        handler.setFormatter(JsonFormatter())
        # {"time": "2026-12-01T18:30:52.123+00:00", "level": "WARNING", "logger": "taskkit.tasks",
        #  "message": "...", "task": "train", "task_id": "0b6c...", "attempt": 2, "layer": "outer"}
    """

    def format(self, record: logging.LogRecord) -> str:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string must not lose the record
            message = str(record.msg)
        data: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": mask_password(message),
        }
        for name in CONTEXT_FIELDS:
            value = record.__dict__.get(name)
            if value is not None:
                data[name] = _jsonable(value)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            data["exception"] = mask_password(record.exc_text)
        if record.stack_info:
            data["stack"] = mask_password(self.formatStack(record.stack_info))
        return json.dumps(data, default=str)


class EventFilter(logging.Filter):
    """Drops taskkit's ``"retry"``/``"gave_up"`` records unless ``log_retry_attempts`` and its
    ``"circuit_state"`` records unless ``log_circuit_state_changes``; passes everything else.

    Example::

        handler.addFilter(EventFilter(log_retry_attempts=False))
    """

    def __init__(
        self, *, log_retry_attempts: bool = True, log_circuit_state_changes: bool = True
    ) -> None:
        super().__init__()
        self.log_retry_attempts = log_retry_attempts
        self.log_circuit_state_changes = log_circuit_state_changes

    @classmethod
    def from_settings(cls, settings: Settings) -> EventFilter:
        """The filter for ``settings.log_retry_attempts`` and ``log_circuit_state_changes``."""
        return cls(
            log_retry_attempts=settings.log_retry_attempts,
            log_circuit_state_changes=settings.log_circuit_state_changes,
        )

    def filter(self, record: logging.LogRecord) -> bool:
        kind = record.__dict__.get("taskkit_event")
        if kind is None:
            return True
        if kind in _RETRY_KINDS:
            return self.log_retry_attempts
        if kind == "circuit_state":
            return self.log_circuit_state_changes
        return True


#: Marks the handler ``configure_logging`` added to a root logger that had none.
_OWN_HANDLER = "_taskkit_handler"


def configure_logging(
    settings: Settings | None = None, *, handlers: Iterable[logging.Handler] | None = None
) -> list[logging.Handler]:
    """Apply the log settings to ``handlers`` (default: the root logger's handlers; when the
    root has none, a stderr handler is added to it, as ``logging.basicConfig`` would) and return
    them. Idempotent: calling it again replaces taskkit's filter and formatter, never adds a
    second one. ``json`` sets :class:`JsonFormatter` on each handler; ``text`` leaves their
    formatters alone. With the handler it adds, the ``taskkit`` logger is set to INFO when its
    level is unset, so its resume and takeover records show; otherwise levels are yours.

    Example::

        configure_logging(Settings(log_format="json", log_retry_attempts=False))
    """
    settings = settings or get_settings()
    if handlers is None:
        root = logging.getLogger()
        if not root.handlers:
            added = logging.StreamHandler(sys.stderr)
            setattr(added, _OWN_HANDLER, True)
            root.addHandler(added)
            taskkit_logger = logging.getLogger("taskkit")
            if taskkit_logger.level == logging.NOTSET:
                taskkit_logger.setLevel(logging.INFO)
        handlers = root.handlers
    chosen = list(handlers)
    for handler in chosen:
        for old in [f for f in handler.filters if isinstance(f, EventFilter)]:
            handler.removeFilter(old)
        handler.addFilter(EventFilter.from_settings(settings))
        if settings.log_format == "json":
            if not isinstance(handler.formatter, JsonFormatter):
                handler.setFormatter(JsonFormatter())
        elif isinstance(handler.formatter, JsonFormatter):
            handler.setFormatter(None)  # back to text: logging's default format
    return chosen
