"""``TrainingTask``: a ResilientTask for epoch loops that checkpoint, resume and report.

The task body opens a run context with ``self.training(total_epochs)`` (``TrainingRun``):
``restore()`` gives the newest valid checkpoint's state, ``epochs()`` yields from the epoch after
it, ``rng(name, seed)`` registers a generator whose state every checkpoint carries (with
``np.random``'s and ``random``'s), ``report(epoch, metrics, state)`` writes progress and
checkpoints by policy, and ``complete(model)`` stores the final model. A failure, a soft time
limit or SIGTERM checkpoints the last *completed* epoch; SIGTERM then hands the run over to
another worker. An operator's stop (``stop_run``, ``POST /runs/{id}/stop``) is read from the
run's row at the end of an epoch (at most once per ``stop_check_interval`` seconds): the epoch
is checkpointed, the run ends ``stopped`` and the task returns ``{"status": "stopped", ...}``;
a run stopped before it trained ends at its start. The policy, the ``ModelRun`` statuses and
the decisions are in ``docs/training.md``.

Example::

    @app.task(base=TrainingTask, bind=True, checkpoint_every=5)
    def train(self, model_run_id: int, config: dict) -> dict:
        with self.training(total_epochs=config["epochs"]) as run:
            rng = run.rng("shuffle", seed=config["seed"])
            model = run.restore() or SGDClassifier(random_state=config["seed"])
            for epoch in run.epochs():
                order = rng.permutation(len(X))
                model.partial_fit(X[order], y[order], classes=[0, 1])
                run.report(epoch, {"score": model.score(X, y)}, model)
            return run.complete(model)
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import random
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from types import FrameType, TracebackType
from typing import Any, ClassVar, cast

import numpy as np
from billiard.process import current_process
from celery import signals
from celery.exceptions import Ignore, SoftTimeLimitExceeded
from celery.worker import state as worker_state
from sqlalchemy import select, update

from taskkit._utils import mask_password
from taskkit.checkpoint import CheckpointStore
from taskkit.db.models import ModelRun
from taskkit.db.session import session_scope
from taskkit.errors import (
    CheckpointError,
    ConfigurationError,
    LeaseHeld,
    LeaseLost,
    RunNotFound,
    TaskkitWarning,
)
from taskkit.recovery import events
from taskkit.tasks import _runs as runs
from taskkit.tasks._base import ResilientTask, _run_stack
from taskkit.tasks._fence import refused, take_fence
from taskkit.tasks._options import Alias, Option, boolean, one_of, optional_name, positive_int
from taskkit.tasks._progress import progress_writer, submit_epochs

__all__ = [
    "ReproducibilityWarning",
    "RunStopped",
    "TrainingRun",
    "TrainingTask",
    "request_stop",
    "resume_orphaned_runs",
    "run_is_alive",
    "write_heartbeat",
]

logger = logging.getLogger("taskkit.tasks")

#: Version of the checkpoint payload written by ``TrainingRun``.
PAYLOAD_VERSION = 1

_MISSING: Any = object()

#: The clock of the stop checks (tests replace it).
_clock: Callable[[], float] = time.monotonic

#: The fencing token each training task id of this process trains under (set when its
#: ``TrainingRun`` takes the run's fence; read by the status hooks, which run after the body).
_fences: dict[str, int] = {}


class RunStopped(Ignore):
    """Raised by ``TrainingRun`` when an operator stopped the run: unwinds the task body (as
    control flow, never retried or recorded as a failure); ``TrainingTask`` returns ``result``."""

    def __init__(self, result: dict[str, Any]) -> None:
        super().__init__(f"run {result['model_run_id']} stopped on request")
        self.result = result


class ReproducibilityWarning(TaskkitWarning):
    """A resumed run may not end identical to an uninterrupted one (``random_state=None``)."""


# -- warm shutdown --------------------------------------------------------------------------

_stop = threading.Event()
_active_runs = 0
_handler_installed = False
#: Set when Celery's soft time limit signal reaches this pool process during a training task,
#: even if code on the way (a progress write, a database read) caught what its handler raised.
_soft_limit_struck = threading.Event()


def request_stop() -> None:
    """Ask the training runs of this process to checkpoint and hand over at their next report
    (what SIGTERM does).

    Example::

        request_stop()   # e.g. from a preemption notice handler
    """
    _stop.set()


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    if _active_runs:
        logger.warning("taskkit: SIGTERM: training runs will checkpoint and hand over")
        _stop.set()
        return
    # No run here: behave as if the handler were not installed (a pool process exits).
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)


def _install_sigterm_handler() -> None:
    """In a pool process (never the worker's main process, where Celery's handler lives)."""
    global _handler_installed
    if _handler_installed or threading.current_thread() is not threading.main_thread():
        return
    if current_process().name == "MainProcess":
        return
    signal.signal(signal.SIGTERM, _on_sigterm)
    soft_limit = getattr(signal, "SIGUSR1", None)  # billiard's SIG_SOFT_TIMEOUT
    previous = signal.getsignal(soft_limit) if soft_limit is not None else None
    if soft_limit is not None and callable(previous):

        def _latch(signum: int, frame: FrameType | None) -> None:
            _soft_limit_struck.set()
            previous(signum, frame)  # billiard's: raises SoftTimeLimitExceeded

        signal.signal(soft_limit, _latch)
    _handler_installed = True


@signals.worker_shutting_down.connect(weak=False)
def _forward_shutdown(sig: str = "", how: str = "", **_: Any) -> None:
    """Warm shutdown in the main process: stop runs here (solo/threads pools) and forward the
    request to pool processes that run a training task."""
    _stop.set()
    try:
        for request in list(worker_state.active_requests):
            pid = getattr(request, "worker_pid", None)
            if pid and pid != os.getpid() and isinstance(request.task, TrainingTask):
                os.kill(pid, signal.SIGTERM)
    except Exception:  # a signal handler must not fail the shutdown
        logger.warning("taskkit: could not forward the shutdown to pool processes", exc_info=True)


# -- the task -------------------------------------------------------------------------------


class TrainingTask(ResilientTask):
    """A ResilientTask for epoch loops; see the module docs.

    Example::

        @app.task(base=TrainingTask, bind=True, checkpoint_every=2, score_metric="accuracy")
        def train(self, model_run_id: int, config: dict) -> dict: ...
    """

    #: Seconds before the copy of a run whose pool process died starts (ResilientTask: 2 s);
    #: short, since the run resumes from its checkpoint and waits cost training time.
    default_retry_delay = 1

    #: TrainingTask's options, added to ResilientTask's (rendered in docs/tasks.md).
    taskkit_options: ClassVar[tuple[Option | Alias, ...]] = (
        Option("run_arg", "model_run_id", lambda v: isinstance(v, str) and v != "",
               "an argument name",
               "The argument holding the `ModelRun` id (also the lease key and progress row)."),
        Option("checkpoint_every", 1, positive_int, "an integer >= 1",
               "Checkpoint every this many epochs (and on a new best, and at the last epoch)."),
        Option("score_metric", "score", optional_name, "None or a metric name",
               "The metric that decides the best epoch (None: no best tracking)."),
        Option("score_mode", "max", one_of("max", "min"), "'max' or 'min'",
               "Whether a larger or a smaller score is better."),
        Option("checkpoint_on_interrupt", True, boolean, "True or False",
               "Keep a serialized copy of the last reported state between checkpoints."),
        Option("keep_final_checkpoint", True, boolean, "True or False",
               "Keep the final checkpoint after success (False: delete them all)."),
        Option("checkpoint_background", False, boolean, "True or False",
               "Write checkpoints on a background thread (the next save and the end wait)."),
        Option("checkpoint_format", "pickle", one_of("pickle", "joblib"), "'pickle' or 'joblib'",
               "How a checkpoint's state is serialised."),
        Option("checkpoint_compress", False,
               lambda v: isinstance(v, bool) or (isinstance(v, int) and 0 <= v <= 9),
               "True, False or a zlib level 1-9", "Compress checkpoints."),
    )  # fmt: skip

    run_arg: str
    checkpoint_every: int
    score_metric: str | None
    score_mode: str
    checkpoint_on_interrupt: bool
    keep_final_checkpoint: bool
    checkpoint_background: bool
    checkpoint_format: str
    checkpoint_compress: bool | int

    #: Seconds between two reads of the run's stop request (``stop_run``) at epoch ends: a
    #: stop takes effect at the end of the first epoch that ends after this much time.
    stop_check_interval: float = 1.0

    @classmethod
    def on_bound(cls, app: Any) -> None:
        super().on_bound(app)
        if cls.progress_run_arg is None:
            cls.progress_run_arg = cls.run_arg
        if cls.lease_key is None:
            cls.lease_key = cls.run_arg

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        global _active_runs
        request = self.request
        if not request.called_directly and not request.is_eager:
            _install_sigterm_handler()
            _soft_limit_struck.clear()
            run_id = self._argument(args, kwargs, self.run_arg)
            attempt = runs.screen_attempt(run_id, str(request.id), database_url=self._database_url)
            if attempt.verdict == "completed":
                logger.warning(
                    "taskkit: run %s is already completed; %s[%s] returns its result",
                    run_id,
                    self.name,
                    request.id,
                )
                return attempt.result
            if attempt.verdict == "stopped":
                logger.warning(
                    "taskkit: run %s was stopped before %s[%s] started; not training it",
                    run_id,
                    self.name,
                    request.id,
                )
                return attempt.result
            if attempt.verdict == "stale":
                logger.warning(
                    "taskkit: run %s now belongs to task %s; dropping %s[%s]",
                    run_id,
                    attempt.owner,
                    self.name,
                    request.id,
                )
                raise Ignore()
        _active_runs += 1
        try:
            result = super().__call__(*args, **kwargs)
        except RunStopped as stopped:
            _fences.pop(str(request.id), None)
            return stopped.result
        finally:
            _active_runs -= 1
        _fences.pop(str(request.id), None)
        return result

    @property
    def _database_url(self) -> str | None:
        return cast(str | None, self.app.conf.get("taskkit_database_url"))

    def training(self, total_epochs: int, *, checkpoint_every: int | None = None) -> TrainingRun:
        """The run context of this call (use it in a ``with`` block); ``checkpoint_every``
        overrides the task's for this run."""
        stack = _run_stack()
        if not stack or stack[-1].run_id is None:
            raise ConfigurationError(
                f"task {self.name}: training() must be called inside the task, which needs "
                f"its {self.run_arg!r} argument"
            )
        return TrainingRun(self, stack[-1].run_id, total_epochs, checkpoint_every=checkpoint_every)

    def checkpoint_store(self, run_id: Any, *, run_uid: str | None = None) -> CheckpointStore:
        """The store for one run, keyed by its identity (``run_uid``, default the run's
        ``ModelRun.uid`` in the task's database): a run never resumes another run's checkpoint,
        even one that had the same id. Override to choose storage, format or retention, and
        pass ``run_uid`` on to ``CheckpointStore``."""
        return CheckpointStore(
            run_id,
            run_uid=run_uid or self.run_uid(run_id),
            format=self.checkpoint_format,
            compress=self.checkpoint_compress,
            background=self.checkpoint_background,
        )

    def run_uid(self, run_id: Any) -> str:
        """The unique identity of run ``run_id`` (``RunNotFound`` if there is no such run)."""
        with session_scope(self._database_url) as session:
            uid = session.scalar(select(ModelRun.uid).where(ModelRun.id == run_id))
        if uid is None:
            raise RunNotFound(run_id)
        return str(uid)

    # -- status hooks (isolated by ResilientTask: a database error here is only logged) --------

    def on_retry(self, exc: Any, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        run_id = self._argument(tuple(args or ()), dict(kwargs or {}), self.run_arg)
        fence = _fences.pop(str(task_id), None)
        with contextlib.suppress(LeaseLost):  # fenced out: refused (logged) and dropped
            runs.mark_retrying(run_id, _describe(exc), database_url=self._database_url, fence=fence)

    def on_failure(self, exc: Any, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        fence = _fences.pop(str(task_id), None)
        if isinstance(exc, LeaseHeld | LeaseLost):
            return  # another task trains (or took over) this run: its status is not ours to set
        run_id = self._argument(tuple(args or ()), dict(kwargs or {}), self.run_arg)
        with contextlib.suppress(LeaseLost):  # fenced out: refused (logged) and dropped
            runs.mark_failed(run_id, _describe(exc), database_url=self._database_url, fence=fence)


def _utcnow() -> datetime:
    return datetime.now(UTC)


def write_heartbeat(
    run_id: Any,
    *,
    database_url: str | None = None,
    now: Callable[[], datetime] = _utcnow,
    fence: int | None = None,
) -> None:
    """Record that run ``run_id``'s trainer is alive: ``ModelRun.heartbeat_at = now()``.

    With ``fence`` (the trainer's fencing token) only while the run's fence is that token,
    else ``LeaseLost`` (a newer trainer holds the run) and nothing is written.

    One UPDATE outside the ORM's version check, with ``updated_at`` left as it was: a heartbeat
    every few seconds neither conflicts with a status write nor counts as a change of the run.
    ``taskkit runs`` calls a running run ``stale`` once its heartbeat is older than the lease
    ttl.

    Example::

        write_heartbeat(7)   # what a TrainingTask does at start and at each lease renewal
    """
    query = update(ModelRun).where(ModelRun.id == run_id)
    if fence is not None:
        query = query.where(ModelRun.fence == fence)
    with session_scope(database_url) as session:
        result = session.execute(
            query.values(heartbeat_at=now(), updated_at=ModelRun.updated_at).execution_options(
                synchronize_session=False
            )
        )
        written = getattr(result, "rowcount", 1)
    if fence is not None and not written:
        raise refused(run_id, fence, "a heartbeat")


class _HeartbeatWriter:
    """Writes a run's heartbeat on a thread of its own each time the lease beats.

    The lease's heartbeat thread only sets an event: a slow database (a busy SQLite file, a
    PostgreSQL outage) must not delay the next lease renewal past the ttl. Beats that come
    while a write is under way are merged into one write. A failed write is a warning; the
    next beat tries again.
    """

    def __init__(self, run_id: Any, database_url: str | None, lease: Any = None) -> None:
        self.run_id = run_id
        self.database_url = database_url
        self.lease = lease
        self._due = threading.Event()
        self._closed = False
        self._thread = threading.Thread(
            target=self._loop, name=f"taskkit-heartbeat-{run_id}", daemon=True
        )
        self._thread.start()

    def beat(self, _lease: object = None) -> None:
        self._due.set()

    def close(self) -> None:
        # Not joined: a write stuck on the database must not hold the task's end up.
        self._closed = True
        self._due.set()

    def _loop(self) -> None:
        while True:
            self._due.wait()
            self._due.clear()
            if self._closed:
                return
            lease = self.lease
            try:
                write_heartbeat(
                    self.run_id,
                    database_url=self.database_url,
                    fence=None if lease is None else lease.token,
                )
            except LeaseLost:
                if lease is not None:
                    lease.lose("a newer trainer fenced the run")
                return
            except Exception as exc:
                _heartbeat_failed(self.run_id, exc)


def _heartbeat_failed(run_id: Any, exc: Exception) -> None:
    # One line, no traceback: during an outage this comes every few seconds. A database
    # error's message may quote its URL.
    message = mask_password(str(exc)).strip().splitlines()
    logger.warning(
        "taskkit: run %s: could not record its heartbeat: %s: %s",
        run_id,
        type(exc).__name__,
        message[0] if message else "",
    )


def _raise_soft_limit(exc: CheckpointError) -> None:
    """Raise the soft time limit ``exc`` wraps, if it wraps one.

    Celery raises the limit wherever the task is; inside a checkpoint write or load the store
    turns it into a ``CheckpointError``, which the retry ladder retries in place: the run would
    go on past its limit, ``retrying`` and never ``failed``.
    """
    if isinstance(exc.__cause__, SoftTimeLimitExceeded):
        raise exc.__cause__ from None


def _describe(exc: BaseException) -> str:
    if isinstance(exc, SoftTimeLimitExceeded):
        return "soft time limit exceeded; checkpointed, continue with: taskkit resume"
    return f"{type(exc).__name__}: {exc}"


class TrainingRun:
    """One attempt at training a run: restore, epochs, report, complete (see the module docs)."""

    def __init__(
        self,
        task: TrainingTask,
        run_id: Any,
        total_epochs: int,
        *,
        checkpoint_every: int | None = None,
    ) -> None:
        if not isinstance(total_epochs, int) or total_epochs < 1:
            raise ConfigurationError(f"total_epochs must be an integer >= 1, not {total_epochs!r}")
        every = task.checkpoint_every if checkpoint_every is None else checkpoint_every
        if not isinstance(every, int) or every < 1:
            raise ConfigurationError(f"checkpoint_every must be an integer >= 1, not {every!r}")
        self.checkpoint_every = every
        self.task = task
        self.run_id = run_id
        self.total_epochs = total_epochs
        self.store = task.checkpoint_store(run_id)
        if getattr(self.store, "task", None) is None:
            self.store.task = task.name  # its CheckpointSaved events name the task
        #: The first epoch this attempt trains (0, or the one after the checkpoint).
        self.start_epoch = 0
        #: Epochs trained by this attempt.
        self.epochs_run = 0
        self.best_score: float | None = None
        self.best_epoch: int | None = None
        self.last_metrics: dict[str, Any] = {}
        self._payload: dict[str, Any] | None = None
        self._generators: dict[str, np.random.Generator] = {}
        self._rng_applied = False
        self._saved_epoch: int | None = None
        self._pending: tuple[int, bytes, dict[str, Any]] | None = None
        self._warned_random_state = False
        self._heartbeat: _HeartbeatWriter | None = None
        self._stop_checked_at: float | None = None
        #: The fencing token this attempt writes under (its lease's), once it took the fence.
        self.fence: int | None = None
        #: When the epoch being trained started (or the previous report), for EpochFinished.
        self._epoch_mark = time.perf_counter()

    # -- context --------------------------------------------------------------------------------

    def __enter__(self) -> TrainingRun:
        request = self.task.request
        database_url = self.task._database_url
        lease = self.task.lease
        if lease is not None:
            self._take_fence(lease, request, database_url)
        # The heartbeat first: a run shown running is never without one (stale at once).
        try:
            write_heartbeat(self.run_id, database_url=database_url, fence=self.fence)
        except (SoftTimeLimitExceeded, LeaseLost):
            raise  # the limit struck during the write: it ends the attempt, it is no outage
        except Exception as exc:  # mark_running says whether the database is really gone
            _heartbeat_failed(self.run_id, exc)
        stop = runs.mark_running(
            self.run_id,
            None if request.called_directly else request.id,
            database_url=database_url,
            fence=self.fence,
        )
        if stop:  # stopped while it waited in the queue or for a retry
            self.store.close()
            runs.mark_stopped(self.run_id, None, database_url=database_url, fence=self.fence)
            logger.warning("taskkit: run %s was asked to stop; not training it", self.run_id)
            raise RunStopped(runs.stopped_result(self.run_id))
        if lease is not None:
            self._heartbeat = _HeartbeatWriter(self.run_id, database_url, lease)
            lease.on_beat(self._heartbeat.beat)
        try:
            checkpoint = self.store.load_latest()
        except CheckpointError as exc:
            _raise_soft_limit(exc)
            raise
        if checkpoint is not None:
            payload = checkpoint.state
            if not isinstance(payload, dict) or payload.get("version") != PAYLOAD_VERSION:
                raise ConfigurationError(
                    f"run {self.run_id}: checkpoint step {checkpoint.info.step} was not written "
                    "by TrainingRun"
                )
            self._payload = payload
            self.store.protect(checkpoint.info.step)
            self.start_epoch = int(payload["epoch"]) + 1
            self._saved_epoch = int(payload["epoch"])
            self.best_score = payload.get("best_score")
            self.best_epoch = payload.get("best_epoch")
            self.last_metrics = dict(payload.get("metrics") or {})
            task_id = None if request.called_directly else request.id
            logger.info(
                "taskkit: run %s resumes at epoch %d (checkpoint of epoch %d)",
                self.run_id,
                self.start_epoch,
                payload["epoch"],
                extra={
                    "taskkit_event": "resume",
                    "attempt": None,
                    "layer": None,
                    "task": self.task.name,
                    "task_id": task_id,
                    "run_id": self.run_id,
                },
            )
            if events.active():
                events.emit(
                    events.RunResumed(self.task.name, self.run_id, task_id, self.start_epoch)
                )
        self._epoch_mark = time.perf_counter()
        return self

    def _take_fence(self, lease: Any, request: Any, database_url: str | None) -> None:
        """Raise the run's fence to the lease's token: from now on only this attempt's writes
        land (``LeaseLost`` if a newer trainer's token is there already). Checkpoints carry
        the token too (``CheckpointStore.fence``)."""
        lease.check()
        if not take_fence(self.run_id, lease.token, database_url=database_url):
            lease.lose("a newer trainer fenced the run")
            raise refused(self.run_id, lease.token, "taking the run", lease.key)
        self.fence = lease.token
        if not request.called_directly:
            _fences[str(request.id)] = lease.token
        stack = _run_stack()
        if stack:
            stack[-1].fence = lease.token
        self.store.fence = lease.token
        self.store.guard = lease.check

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._heartbeat is not None:
            self._heartbeat.close()
        try:
            if exc is not None and self._should_save_on(exc):
                self._save_pending(f"{type(exc).__name__}")
            self.store.close()
        except Exception:
            if exc is None:
                raise
            logger.exception("taskkit: run %s: could not checkpoint on the way out", self.run_id)

    def _should_save_on(self, exc: BaseException) -> bool:
        if isinstance(exc, LeaseLost | Ignore):
            return False  # another trainer owns the run, or this one handed it over already
        lease = self.task.lease
        return lease is None or not lease.lost

    # -- state -----------------------------------------------------------------------------

    @property
    def resumed(self) -> bool:
        """Whether this attempt continues from a checkpoint."""
        return self._payload is not None

    def restore(self) -> Any:
        """The state saved by the newest valid checkpoint (None for a fresh run); restores
        the random state too."""
        self._apply_rng()
        return None if self._payload is None else self._payload["state"]

    def rng(self, name: str = "default", seed: Any = None) -> np.random.Generator:
        """A numpy ``Generator`` whose state is checkpointed and restored with the run."""
        return self.register_rng(name, np.random.default_rng(seed))

    def register_rng(self, name: str, generator: np.random.Generator) -> np.random.Generator:
        """Checkpoint and restore ``generator``'s state under ``name``."""
        self._generators[name] = generator
        if self._rng_applied and self._payload is not None:
            saved = self._payload["rng"]["generators"].get(name)
            if saved is not None:
                generator.bit_generator.state = saved
        return generator

    def _apply_rng(self) -> None:
        if self._rng_applied:
            return
        self._rng_applied = True
        if self._payload is None:
            return
        saved = self._payload["rng"]
        np.random.set_state(saved["numpy_global"])
        random.setstate(saved["python"])
        for name, state in saved["generators"].items():
            if name in self._generators:
                self._generators[name].bit_generator.state = state

    def _rng_state(self) -> dict[str, Any]:
        return {
            "numpy_global": np.random.get_state(),
            "python": random.getstate(),
            "generators": {n: g.bit_generator.state for n, g in self._generators.items()},
        }

    # -- the loop --------------------------------------------------------------------------

    def epochs(self) -> Iterator[int]:
        """The epochs left: from the one after the checkpoint to ``total_epochs - 1``."""
        self._apply_rng()
        for epoch in range(self.start_epoch, self.total_epochs):
            self._epoch_mark = time.perf_counter()
            yield epoch
            self.epochs_run += 1

    def report(
        self,
        epoch: int,
        metrics: dict[str, Any] | None = None,
        state: Any = _MISSING,
        *,
        score: float | None = None,
    ) -> None:
        """Epoch ``epoch`` is done: write progress, and checkpoint ``state`` by policy."""
        task = self.task
        now = time.perf_counter()
        seconds, self._epoch_mark = now - self._epoch_mark, now
        if events.active():
            events.emit(events.EpochFinished(task.name, self.run_id, epoch, seconds))
        metrics = dict(metrics or {})
        if score is None and task.score_metric is not None:
            value = metrics.get(task.score_metric)
            score = float(value) if isinstance(value, int | float) else None
        is_best = score is not None and (
            self.best_score is None
            or (score > self.best_score if task.score_mode == "max" else score < self.best_score)
        )
        if is_best:
            self.best_score, self.best_epoch = score, epoch
        self.last_metrics = metrics
        stack = _run_stack()
        if stack and stack[-1].run_id is not None:
            # The history keeps the epoch's own metrics (not the running best_score).
            stack[-1].epochs.add(epoch + 1, metrics)
        shown = metrics if self.best_score is None else {**metrics, "best_score": self.best_score}
        task.progress(
            epoch + 1, self.total_epochs, f"epoch {epoch + 1}/{self.total_epochs}", **shown
        )
        if state is _MISSING:
            return
        self._warn_unseeded(state)
        halting = epoch < self.total_epochs - 1 and self._stop_asked()
        stopping = _stop.is_set()
        due = (
            (epoch + 1) % self.checkpoint_every == 0
            or is_best
            or epoch == self.total_epochs - 1
            or stopping
            or halting
        )
        if due:
            self._save(epoch, self._build_payload(epoch, state), metrics, is_best)
        elif task.checkpoint_on_interrupt:
            data = pickle.dumps(self._build_payload(epoch, state), protocol=5)
            self._pending = (epoch, data, metrics)
        if _soft_limit_struck.is_set():
            # The soft limit struck during this epoch and something caught it: end the
            # attempt here, as the limit would have (this epoch is checkpointed: by policy
            # above, or on the way out).
            raise SoftTimeLimitExceeded(f"run {self.run_id}: soft time limit exceeded")
        if halting:
            self._halt(epoch)
        if stopping:
            self._hand_over(epoch)

    def _stop_asked(self) -> bool:
        """Whether an operator asked the run to stop: its row read at most once per
        ``stop_check_interval`` seconds (a failed read is a no: the next epoch reads again)."""
        now = _clock()
        last = self._stop_checked_at
        if last is not None and now - last < self.task.stop_check_interval:
            return False
        self._stop_checked_at = now
        try:
            return runs.stop_requested(self.run_id, database_url=self.task._database_url)
        except SoftTimeLimitExceeded:
            raise  # the limit struck during the read: it ends the attempt, it is no outage
        except Exception as exc:
            logger.warning(
                "taskkit: run %s: could not read its stop request: %s",
                self.run_id,
                mask_password(str(exc)).splitlines()[0] if str(exc) else type(exc).__name__,
            )
            return False

    def _halt(self, epoch: int) -> None:
        """An operator's stop: the checkpoint of ``epoch`` is durable; mark the run stopped."""
        self.store.wait()
        # The progress row's last write, and the epochs the throttle held back, must land
        # before the stopped status (which ends the event streams), not after it.
        stack = _run_stack()
        if stack and stack[-1].run_id is not None:
            submit_epochs(
                self.run_id,
                stack[-1].epochs,
                database_url=self.task._database_url,
                fence=self.fence,
                on_refused=stack[-1].refused,
            )
        progress_writer().flush(self.task.progress_flush_timeout)
        runs.mark_stopped(
            self.run_id, epoch, database_url=self.task._database_url, fence=self.fence
        )
        logger.warning(
            "taskkit: run %s checkpointed epoch %d and stopped on request", self.run_id, epoch
        )
        raise RunStopped(runs.stopped_result(self.run_id, epoch))

    def _build_payload(self, epoch: int, state: Any) -> dict[str, Any]:
        return {
            "version": PAYLOAD_VERSION,
            "epoch": epoch,
            "state": state,
            "best_score": self.best_score,
            "best_epoch": self.best_epoch,
            "metrics": self.last_metrics,
            "rng": self._rng_state(),
        }

    def _save(self, epoch: int, payload: Any, metrics: dict[str, Any], is_best: bool) -> None:
        lease = self.task.lease
        if lease is not None:
            lease.check()  # a trainer that lost the run must not overwrite the new owner's state
        try:
            self.store.save(payload, step=epoch, metrics=metrics, is_best=is_best)
        except CheckpointError as exc:
            _raise_soft_limit(exc)
            raise
        self._saved_epoch = epoch
        self._pending = None

    def _save_pending(self, reason: str) -> None:
        if self._pending is None:
            return
        epoch, data, metrics = self._pending
        if self._saved_epoch is not None and epoch <= self._saved_epoch:
            return
        logger.warning(
            "taskkit: run %s: %s; checkpointing the last completed epoch %d",
            self.run_id,
            reason,
            epoch,
        )
        payload = pickle.loads(data)
        self._save(epoch, payload, metrics, is_best=self.best_epoch == epoch)

    def _hand_over(self, epoch: int) -> None:
        """Warm shutdown: the checkpoint is durable; send this task again and stop."""
        task, request = self.task, self.task.request
        self.store.wait()
        if request.called_directly or request.is_eager:
            raise SystemExit(f"run {self.run_id} stopped after epoch {epoch} (shutdown)")
        lease = task.lease
        if lease is not None:
            lease.release()  # the copy must be able to take it at once
        task.signature_from_request(request, retries=request.retries).apply_async()
        if _active_runs <= 1:
            _stop.clear()  # handled: a worker that keeps running (threads, tests) trains on
        logger.warning(
            "taskkit: run %s checkpointed epoch %d and was handed over (worker shutting down)",
            self.run_id,
            epoch,
        )
        raise Ignore()

    def _warn_unseeded(self, state: Any) -> None:
        if self._warned_random_state:
            return
        self._warned_random_state = True
        objects = state.values() if isinstance(state, dict) else (state,)
        for obj in objects:
            get_params = getattr(obj, "get_params", None)
            if not callable(get_params):
                continue
            try:
                params = get_params(deep=False)
            except Exception:
                continue
            if "random_state" in params and params["random_state"] is None:
                warnings.warn(
                    f"run {self.run_id}: {type(obj).__name__} has random_state=None; it draws "
                    "from the global numpy state, which is checkpointed, but set an integer "
                    "seed so a run is reproducible outside taskkit too",
                    ReproducibilityWarning,
                    stacklevel=3,
                )

    # -- the end ---------------------------------------------------------------------------

    def complete(self, model: Any, *, score: float | None = None) -> dict[str, Any]:
        """Store the final model and best score, mark the run completed, clean checkpoints;
        returns the task result ``{"status", "model_run_id", "best_score", "epochs_run",
        "resumed_from"}``."""
        self.store.wait()
        best = score if score is not None else self.best_score
        if self.task.lease is not None:
            self.task.lease.check()
        runs.mark_completed(
            self.run_id, model, best, database_url=self.task._database_url, fence=self.fence
        )
        final = {**self.last_metrics, "best_score": best} if best is not None else self.last_metrics
        self.task.progress(self.total_epochs, self.total_epochs, "completed", **final)
        try:
            self.store.cleanup(keep_final=self.task.keep_final_checkpoint)
        except Exception:  # the run is complete; old checkpoints are only disk space
            logger.warning(
                "taskkit: run %s: could not clean checkpoints", self.run_id, exc_info=True
            )
        return {
            "status": "success",
            "model_run_id": self.run_id,
            "best_score": best,
            "epochs_run": self.epochs_run,
            "resumed_from": self.start_epoch if self.resumed else None,
        }


# -- runs whose worker died ----------------------------------------------------------------


def run_is_alive(app: Any, run_id: Any, task_name: str | None) -> bool:
    """Whether a live trainer holds run ``run_id``'s lease (a dead owner on this host does not
    count; an owner on another host counts until its lease expires).

    Example::

        if not run_is_alive(app, 7, "workers.training.train_model"): resume_run(app, 7)
    """
    task = app.tasks.get(task_name) if task_name else None
    if not isinstance(task, TrainingTask) or not task.lease_key:
        return False
    holder = task.lease_store().holder(task.lease_name((), {task.run_arg: run_id}))
    return holder is not None and not holder.is_provably_dead()


def resume_orphaned_runs(app: Any) -> list[int]:
    """Re-enqueue the runs left ``running`` or ``retrying`` by a worker that died, from their
    last checkpoints; returns their ids. Workers call it at start when
    ``TASKKIT_RESUME_ORPHANED_RUNS`` is on (the default with the embedded SQLite broker, which
    redelivers a dead worker's message only after its visibility timeout: this resumes at once;
    Redis and RabbitMQ redeliver promptly by themselves).

    Example::

        resume_orphaned_runs(app)
    """
    return runs.resume_runs_without_trainer(
        app,
        lambda run_id, task_name: run_is_alive(app, run_id, task_name),
        database_url=app.conf.get("taskkit_database_url"),
    )


@signals.worker_ready.connect(weak=False)
def _resume_orphans_at_start(sender: Any = None, **_: Any) -> None:
    app = getattr(sender, "app", None)
    if app is None or not app.conf.get("taskkit_resume_orphaned_runs"):
        return
    try:
        resumed = resume_orphaned_runs(app)
    except Exception as exc:  # no schema yet, database down: the worker still starts
        logger.warning("taskkit: could not look for orphaned training runs: %s", exc)
        return
    if resumed:
        logger.warning("taskkit: resumed orphaned training runs %s", resumed)
