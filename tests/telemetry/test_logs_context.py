"""The task-context filter (``taskkit.tasks._logs``): records logged while a task runs carry the
task's name, id and run id; outside a task they carry none."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from taskkit.tasks import ResilientTask, create_app
from taskkit.tasks._logs import TaskContextFilter, install_task_context


class _Keep(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def kept() -> Any:
    handler = _Keep()
    install_task_context([handler])
    install_task_context([handler])  # idempotent
    assert len(handler.filters) == 1
    log = logging.getLogger("taskkit.test_context")
    log.setLevel(logging.INFO)
    log.addHandler(handler)
    yield handler
    log.removeHandler(handler)
    log.setLevel(logging.NOTSET)


app = create_app("context", broker_url="memory://", result_backend="cache+memory://")


@app.task(base=ResilientTask, bind=True, progress_run_arg="run_id", name="context.train")
def train(self: ResilientTask, run_id: int, given: bool) -> None:
    log = logging.getLogger("taskkit.test_context")
    if given:
        log.warning("given", extra={"task": "other", "task_id": "t-1", "run_id": 99})
    else:
        log.warning("filled")


def test_a_record_in_a_task_gets_its_name_id_and_run_id(kept: _Keep):
    result = train.apply(args=(7, False))
    result.get()
    (record,) = kept.records
    assert (record.task, record.task_id, record.run_id) == ("context.train", result.id, 7)


def test_fields_the_source_passed_are_kept(kept: _Keep):
    train.apply(args=(7, True)).get()
    (record,) = kept.records
    assert (record.task, record.task_id, record.run_id) == ("other", "t-1", 99)


def test_outside_a_task_nothing_is_added(kept: _Keep):
    logging.getLogger("taskkit.test_context").warning("outside")
    (record,) = kept.records
    assert not hasattr(record, "task")
    assert not hasattr(record, "run_id")
    assert TaskContextFilter().filter(record) is True
