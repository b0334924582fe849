"""Progress of a running task: Celery state, a worker event, and a database row.

``ResilientTask.progress(current, total, message=None, **metrics)`` builds a ``ProgressReport``
and, at most once per ``progress_interval`` seconds (the first and the last report always):

1. stores the Celery state ``PROGRESS`` with the meta progress-bar clients expect:
   ``{"current", "total", "percent", "description", "metrics"}``;
2. sends a ``task-progress`` event (for Flower and ``celery events`` monitors), whether or not
   the worker sends task events (``-E``, ``TASKKIT_WORKER_EVENTS``): a monitor that turns
   events on at run time (``celery control enable_events``) sees progress at once. It carries
   the meta below; the ``progress_events`` option turns it off for a task;
3. for a training run (the task names its run-id argument in ``progress_run_arg``), hands the
   report to the process's ``ProgressWriter``, which upserts the run's ``TrainingProgress`` row
   on a background thread.

Each of the three is isolated: an error is logged and never reaches the task. The database
write is retried with backoff until it succeeds or a newer report replaces it, so an outage
delays the row, never the task; the task's end waits a bounded time for the last write.

Example (inside a task with ``progress_run_arg = "model_run_id"``)::

    for epoch in range(epochs):
        loss = train_one_epoch()
        self.progress(epoch + 1, epochs, f"epoch {epoch + 1}", loss=loss)
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select

from taskkit.db.models import TrainingProgress
from taskkit.db.session import session_scope

__all__ = [
    "PROGRESS",
    "ProgressReport",
    "ProgressWriter",
    "Throttle",
    "progress_writer",
    "write_training_progress",
]

logger = logging.getLogger("taskkit.tasks")

#: The Celery state a task reports while it runs.
PROGRESS = "PROGRESS"


@dataclass(frozen=True)
class ProgressReport:
    """One progress report: ``current`` of ``total``, a description and metrics."""

    current: float
    total: float | None
    description: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def percent(self) -> float | None:
        """0-100, rounded to 2 places; None when ``total`` is unknown or zero."""
        if not self.total:
            return None
        return round(min(100.0, max(0.0, 100.0 * self.current / self.total)), 2)

    @property
    def finished(self) -> bool:
        return self.total is not None and self.current >= self.total

    def meta(self) -> dict[str, Any]:
        """The Celery ``PROGRESS`` meta (JSON-serialisable)."""
        return {
            "current": self.current,
            "total": self.total,
            "percent": self.percent,
            "description": self.description,
            "metrics": self.metrics,
        }


class Throttle:
    """Lets the first report through, then one per ``interval``; a finished report always."""

    __slots__ = ("clock", "interval", "last")

    def __init__(self, interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self.clock = clock
        self.last: float | None = None

    def admit(self, report: ProgressReport) -> bool:
        now = self.clock()
        if self.last is None or report.finished or now - self.last >= self.interval:
            self.last = now
            return True
        return False


Write = Callable[[], object]


class ProgressWriter:
    """One background thread per process that performs the latest write per key, with retry.

    ``submit(key, write)`` replaces any pending write for ``key`` (only the newest progress
    matters) and returns at once. A failed write is retried with exponential backoff (capped
    at ``max_delay``) until it succeeds or a newer one replaces it. ``flush(timeout)`` waits
    until nothing is pending, or the timeout passes.
    """

    def __init__(
        self,
        *,
        delay: float = 0.5,
        max_delay: float = 30.0,
    ) -> None:
        self.delay = delay
        self.max_delay = max_delay
        self._pending: dict[Any, Write] = {}
        self._busy = 0
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._failures = 0

    def submit(self, key: Any, write: Write) -> None:
        with self._cond:
            self._pending[key] = write
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="taskkit-progress", daemon=True
                )
                self._thread.start()
            self._cond.notify_all()

    def flush(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for every pending write; True when all were written."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._pending or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending:
                    self._cond.wait()
                key = next(iter(self._pending))
                write = self._pending.pop(key)
                self._busy += 1
            ok = self._attempt(write)
            with self._cond:
                self._busy -= 1
                if not ok and key not in self._pending:
                    self._pending[key] = write  # keep it until it lands or is replaced
                if not ok:
                    wait = min(self.max_delay, self.delay * 2 ** min(self._failures, 16))
                    self._cond.wait(random.uniform(wait / 2, wait))
                self._cond.notify_all()

    def _attempt(self, write: Write) -> bool:
        try:
            write()
        except Exception as exc:
            self._failures += 1
            log = logger.warning if self._failures == 1 else logger.debug
            log("taskkit: progress write failed (attempt %d), will retry: %s", self._failures, exc)
            return False
        if self._failures:
            logger.info("taskkit: progress writes recovered after %d failure(s)", self._failures)
        self._failures = 0
        return True


_writers: dict[int, ProgressWriter] = {}
_writers_lock = threading.Lock()


def progress_writer() -> ProgressWriter:
    """This process's writer (a forked pool process gets its own, with its own thread)."""
    pid = os.getpid()
    writer = _writers.get(pid)
    if writer is None:
        with _writers_lock:
            writer = _writers.setdefault(pid, ProgressWriter())
    return writer


def write_training_progress(
    model_run_id: int, report: ProgressReport, *, database_url: str | None = None
) -> None:
    """Upsert the run's ``TrainingProgress`` row from ``report`` (one short transaction)."""
    with session_scope(database_url) as session:
        row = session.scalars(
            select(TrainingProgress).filter_by(model_run_id=model_run_id)
        ).one_or_none()
        if row is None:
            row = TrainingProgress(model_run_id=model_run_id)
            session.add(row)
        row.status = "completed" if report.finished else "running"
        row.current_epoch = int(report.current)
        row.total_epochs = None if report.total is None else int(report.total)
        row.progress_percentage = report.percent or 0.0
        row.metrics = dict(report.metrics)
        row.message = report.description
