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
   on a background thread. A ``TrainingRun`` also logs each epoch's metrics in the run's
   ``EpochLog``; the same transaction upserts a ``TrainingEpoch`` row for every epoch logged
   since the last write that landed, so a throttled epoch is written with the next report
   (the last report always passes), never dropped.

Each of the three is isolated: an error is logged and never reaches the task. The database
write is retried with backoff until it succeeds or a newer report replaces it, so an outage
delays the row, never the task; the task's end waits a bounded time for the last write.

Example (inside a task with ``progress_run_arg = "model_run_id"``)::

    for epoch in range(epochs):
        loss = train_one_epoch()
        self.progress(epoch + 1, epochs, f"epoch {epoch + 1}", loss=loss)
"""

from __future__ import annotations

import functools
import logging
import os
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select

from taskkit.db.models import TrainingEpoch, TrainingProgress
from taskkit.db.session import session_scope
from taskkit.tasks._fence import holds_fence, refused

__all__ = [
    "PROGRESS",
    "EpochLog",
    "ProgressReport",
    "ProgressWriter",
    "Throttle",
    "progress_writer",
    "submit_epochs",
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


class EpochLog:
    """The epochs of one run that are not in the database yet: ``{epoch: metrics}``.

    The task's thread adds, the progress writer's thread takes a snapshot, writes it, and
    drops what it wrote (unless the epoch was logged again meanwhile). A write that fails
    leaves everything for the next.

    Example::

        log = EpochLog()
        log.add(1, {"loss": 0.5})
        log.snapshot()   # {1: {'loss': 0.5}}
    """

    __slots__ = ("_epochs", "_lock")

    def __init__(self) -> None:
        self._epochs: dict[int, dict[str, Any]] = {}
        self._lock = threading.Lock()

    def add(self, epoch: int, metrics: dict[str, Any]) -> None:
        with self._lock:
            self._epochs[epoch] = dict(metrics)

    def snapshot(self) -> dict[int, dict[str, Any]]:
        with self._lock:
            return dict(self._epochs)

    def written(self, epochs: dict[int, dict[str, Any]]) -> None:
        with self._lock:
            for epoch, metrics in epochs.items():
                if self._epochs.get(epoch) is metrics:
                    del self._epochs[epoch]

    def __len__(self) -> int:
        with self._lock:
            return len(self._epochs)


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
    model_run_id: int,
    report: ProgressReport | None,
    *,
    database_url: str | None = None,
    epochs: EpochLog | None = None,
    fence: int | None = None,
    on_refused: Callable[[], object] | None = None,
) -> None:
    """Upsert the run's ``TrainingProgress`` row from ``report`` and a ``TrainingEpoch`` row
    per epoch in ``epochs`` (one short transaction); without ``report``, the epochs only.

    With ``fence`` (the trainer's fencing token), the transaction first locks the run's row and
    writes only while its fence is that token: otherwise the write is dropped (one log line,
    never retried) and ``on_refused()`` is called (the trainer's lease is lost)."""
    logged = epochs.snapshot() if epochs is not None else {}
    with session_scope(database_url) as session:
        if not holds_fence(session, model_run_id, fence):
            refused(model_run_id, fence or 0, "a progress write")
            if epochs is not None and logged:
                epochs.written(logged)  # dropped, not retried
            if on_refused is not None:
                on_refused()
            return
        if logged:
            _upsert_epochs(session, model_run_id, logged)
        if report is not None:
            _upsert_progress(session, model_run_id, report)
    if epochs is not None and logged:
        epochs.written(logged)


def _upsert_progress(session: Any, model_run_id: int, report: ProgressReport) -> None:
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


def submit_epochs(
    model_run_id: Any,
    epochs: EpochLog,
    *,
    database_url: str | None,
    fence: int | None = None,
    on_refused: Callable[[], object] | None = None,
) -> bool:
    """Hand the epochs still in ``epochs`` to the process's writer (the progress row is left
    as it is): what a run that ends without a last progress report (stopped, handed over,
    failed) does, so its throttled epochs are written too. False when there was none."""
    if not len(epochs):
        return False
    progress_writer().submit(
        ("training-epochs", model_run_id),
        functools.partial(
            write_training_progress,
            model_run_id,
            None,
            database_url=database_url,
            epochs=epochs,
            fence=fence,
            on_refused=on_refused,
        ),
    )
    return True


def _upsert_epochs(session: Any, model_run_id: int, logged: dict[int, dict[str, Any]]) -> None:
    """Insert or overwrite the rows of ``logged``: a resumed run trains an epoch again.

    Read, then update or insert, on every database alike: one trainer holds a run's lease, so
    two writers of one run do not race; if they did, the primary key refuses the second insert
    and the writer retries the whole transaction.
    """
    rows = session.scalars(
        select(TrainingEpoch).where(
            TrainingEpoch.model_run_id == model_run_id, TrainingEpoch.epoch.in_(list(logged))
        )
    ).all()
    found = {row.epoch: row for row in rows}
    now = datetime.now(UTC)
    for epoch, metrics in sorted(logged.items()):
        row = found.get(epoch)
        if row is None:
            session.add(
                TrainingEpoch(
                    model_run_id=model_run_id, epoch=epoch, metrics=metrics, created_at=now
                )
            )
        else:
            row.metrics, row.created_at = metrics, now
