"""Worker wiring of the structured logs and alerts (``taskkit.telemetry.logs``, ``.alerts``).

Connected at import (``taskkit.tasks._app`` imports this module):

- ``after_setup_logger`` / ``after_setup_task_logger``: Celery has made the handlers of the
  root logger and of ``celery.task``; ``configure_logging`` applies ``TASKKIT_LOG_FORMAT`` and
  the ``LOG_*`` filter to them, and :class:`TaskContextFilter` is added. So with ``json`` every
  record of the worker is one JSON line, Celery's own included. A pool process forked from
  the main process inherits these handlers; ``worker_process_init`` applies them again for a
  pool process that set its logging up anew (a ``%i`` log file) and for apps that configure
  logging themselves (Celery's ``setup_logging`` signal: then the handlers are theirs, on the
  root logger; ``worker_ready`` does the same in the main process).
- ``worker_process_init`` (each pool process), or ``worker_init`` for a pool that runs tasks
  in the main process (solo, threads): the alert notifiers are installed when
  ``alert_on_circuit_open`` is on. A prefork main process runs no task and subscribes nothing
  (its webhook thread and lock would not belong in the processes it forks).

The settings are taskkit's process settings (``get_settings()``, the ``TASKKIT_*`` variables).
"""

from __future__ import annotations

import logging
from typing import Any

from celery import current_task, signals

from taskkit.config import get_settings
from taskkit.tasks._base import _run_stack
from taskkit.telemetry.alerts import install_alerts
from taskkit.telemetry.logs import configure_logging

__all__ = ["TaskContextFilter", "install_task_context"]


class TaskContextFilter(logging.Filter):
    """Fills ``task``, ``task_id`` and ``run_id`` of a record logged while a task runs in this
    thread, when its source did not pass them: the task's name and id from Celery's current
    request, the run id of taskkit's running call (``progress_run_arg``). Never drops a record.

    Example::

        handler.addFilter(TaskContextFilter())
    """

    def filter(self, record: logging.LogRecord) -> bool:
        fields = record.__dict__
        if fields.get("task") is None or fields.get("task_id") is None:
            task = current_task
            if task:  # a Proxy: false when no task runs in this thread
                request = task.request
                task_id = getattr(request, "id", None)
                if task_id is not None:
                    if fields.get("task") is None:
                        fields["task"] = task.name
                    if fields.get("task_id") is None:
                        fields["task_id"] = task_id
        if fields.get("run_id") is None:
            stack = _run_stack()
            if stack and stack[-1].run_id is not None:
                fields["run_id"] = stack[-1].run_id
        return True


def install_task_context(handlers: list[logging.Handler]) -> None:
    """Add one :class:`TaskContextFilter` to each handler that has none (idempotent)."""
    for handler in handlers:
        if not any(isinstance(f, TaskContextFilter) for f in handler.filters):
            handler.addFilter(TaskContextFilter())


def _configure(handlers: list[logging.Handler] | None = None) -> None:
    install_task_context(configure_logging(get_settings(), handlers=handlers))


@signals.after_setup_logger.connect(weak=False)
def _after_setup_logger(logger: logging.Logger | None = None, **_: Any) -> None:
    if logger is not None:
        _configure(list(logger.handlers))


@signals.after_setup_task_logger.connect(weak=False)
def _after_setup_task_logger(logger: logging.Logger | None = None, **_: Any) -> None:
    if logger is not None:
        _configure(list(logger.handlers))


def _forks(sender: Any) -> bool:
    """Whether the worker's pool forks (prefork): its main process runs no task."""
    pool = getattr(sender, "pool_cls", None)
    name = pool if isinstance(pool, str) else getattr(pool, "__module__", "")
    return pool is None or "prefork" in str(name)


@signals.worker_init.connect(weak=False)
def _alerts_in_main_process(sender: Any = None, **_: Any) -> None:
    if not _forks(sender):  # solo, threads...: tasks run in this process
        install_alerts(get_settings())


@signals.worker_ready.connect(weak=False)
def _main_process_ready(**_: Any) -> None:
    root = logging.getLogger()
    if root.handlers:  # again (idempotent): logging that the app set up itself
        _configure(list(root.handlers))


@signals.worker_process_init.connect(weak=False)
def _in_pool_process(**_: Any) -> None:
    root = logging.getLogger()
    if root.handlers:
        _configure(list(root.handlers))
    install_alerts(get_settings())
