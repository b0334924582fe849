"""The JSON formatter, the LOG_* filter, ``configure_logging`` and the task-context filter."""

from __future__ import annotations

import io
import json
import logging
import sys
from collections.abc import Iterator
from datetime import datetime

import pytest

from taskkit.config import Settings
from taskkit.telemetry.logs import EventFilter, JsonFormatter, configure_logging


@pytest.fixture
def logger() -> Iterator[logging.Logger]:
    """A taskkit logger writing through a handler of its own (not the root's), at DEBUG."""
    log = logging.getLogger("taskkit.test_logs")
    log.setLevel(logging.DEBUG)
    log.propagate = False
    yield log
    log.handlers.clear()
    log.propagate = True
    log.setLevel(logging.NOTSET)


def _handler(log: logging.Logger, settings: Settings) -> io.StringIO:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    configure_logging(settings, handlers=[handler])
    log.addHandler(handler)
    return out


def _lines(out: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_a_record_is_one_json_object_per_line_with_the_event_fields(logger: logging.Logger):
    out = _handler(logger, Settings(log_format="json"))
    logger.warning(
        "taskkit: %s[%s] retry %d\nin %.1fs",
        "train",
        "abc",
        2,
        1.5,
        extra={
            "taskkit_event": "retry",
            "attempt": 2,
            "layer": "outer",
            "task": "train",
            "task_id": "abc",
            "run_id": 7,
        },
    )
    logger.info("plain")
    first, second = _lines(out)
    assert first["message"] == "taskkit: train[abc] retry 2\nin 1.5s"
    assert first["level"] == "WARNING"
    assert first["logger"] == "taskkit.test_logs"
    assert (first["taskkit_event"], first["attempt"], first["layer"]) == ("retry", 2, "outer")
    assert (first["task"], first["task_id"], first["run_id"]) == ("train", "abc", 7)
    stamp = datetime.fromisoformat(str(first["time"]))
    assert stamp.utcoffset() is not None
    assert stamp.utcoffset().total_seconds() == 0
    assert set(second) == {"time", "level", "logger", "message"}


def test_passwords_are_masked_and_args_are_not_fields(logger: logging.Logger):
    out = _handler(logger, Settings(log_format="json"))
    try:
        raise ConnectionError("cannot reach redis://:hunter2@cache:6379/0")
    except ConnectionError:
        logger.exception("taskkit: broker %s is down", "amqp://app:s3cret@mq:5672//")
    (line,) = _lines(out)
    text = out.getvalue()
    assert "hunter2" not in text
    assert "s3cret" not in text
    assert line["message"] == "taskkit: broker amqp://app:***@mq:5672// is down"
    assert "ConnectionError: cannot reach redis://:***@cache:6379/0" in str(line["exception"])
    assert "args" not in line


def test_a_value_json_cannot_encode_is_written_as_text(logger: logging.Logger):
    out = _handler(logger, Settings(log_format="json"))
    logger.warning("x", extra={"run_id": object.__new__(_Run)})
    assert _lines(out)[0]["run_id"] == "run-7"


class _Run:
    def __str__(self) -> str:
        return "run-7"


@pytest.mark.parametrize(
    ("settings", "kept"),
    [
        (Settings(), {"retry", "gave_up", "circuit_state", "terminal_failure", "alert", None}),
        (
            Settings(log_retry_attempts=False),
            {"circuit_state", "terminal_failure", "alert", None},
        ),
        (
            Settings(log_circuit_state_changes=False),
            {"retry", "gave_up", "terminal_failure", "alert", None},
        ),
    ],
)
def test_the_log_settings_drop_their_kinds_only(
    logger: logging.Logger, settings: Settings, kept: set[str | None]
):
    out = _handler(logger, settings.model_copy(update={"log_format": "json"}))
    for kind in ("retry", "gave_up", "circuit_state", "terminal_failure", "alert", None):
        logger.warning("event %s", kind, extra={"taskkit_event": kind} if kind else {})
    assert {line.get("taskkit_event") for line in _lines(out)} == kept


def test_configure_logging_is_idempotent_and_can_go_back_to_text():
    handler = logging.StreamHandler(io.StringIO())
    configure_logging(Settings(log_format="json"), handlers=[handler])
    configure_logging(Settings(log_format="json", log_retry_attempts=False), handlers=[handler])
    (only,) = [f for f in handler.filters if isinstance(f, EventFilter)]
    assert only.log_retry_attempts is False
    assert isinstance(handler.formatter, JsonFormatter)
    configure_logging(Settings(log_format="text"), handlers=[handler])
    assert not isinstance(handler.formatter, JsonFormatter)
    assert len(handler.filters) == 1


def test_text_format_keeps_the_handlers_formatter():
    handler = logging.StreamHandler(io.StringIO())
    mine = logging.Formatter("%(levelname)s %(message)s")
    handler.setFormatter(mine)
    configure_logging(Settings(log_format="text"), handlers=[handler])
    assert handler.formatter is mine


def test_without_handlers_the_root_logger_gets_one(monkeypatch: pytest.MonkeyPatch):
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [])
    taskkit_logger = logging.getLogger("taskkit")
    monkeypatch.setattr(taskkit_logger, "level", logging.NOTSET)
    out = io.StringIO()
    monkeypatch.setattr(sys, "stderr", out)
    (handler,) = configure_logging(Settings(log_format="json"))
    assert root.handlers == [handler]
    assert taskkit_logger.level == logging.INFO
    logging.getLogger("taskkit.tasks").info("resumed", extra={"taskkit_event": "resume"})
    (line,) = _lines(out)
    assert (line["message"], line["taskkit_event"]) == ("resumed", "resume")
