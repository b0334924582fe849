"""``ResilientTask``: a Celery task with taskkit's retry ladder, lease, progress and records.

The ladder (control flow passes, permanent errors fail at once, transient errors retry in
process, then anything else is re-queued with backoff) is drawn once in ``docs/design.md``;
redelivery, worker loss and leases are in ``docs/tasks.md``, the options in its table
(``taskkit_options`` below). Hooks you override (``on_failure``, ``on_retry``, ``on_success``,
``after_return``, ``on_progress``, ``record_failure``) are isolated: what they raise is logged,
never fails the task.

What a task shows of itself: while someone subscribes to ``taskkit.recovery.events``, one
``TaskAttemptEnded`` per call of the body (``layer="inner"``) and one per delivery
(``layer="outer"``), ``TaskFailed`` when it fails for good (after ``record_failure``), and
``LeaseTakenOver``; each retry (inner and outer) and the terminal failure is one log record
tagged ``taskkit_event`` (``taskkit.telemetry.logs``); with tracing on, each call of the body
runs in an attempt span (``taskkit.telemetry.tracing``); after an inner retry the task's result
meta carries ``"attempts": {"inner": n, "outer": m}`` (``taskkit tasks show``).

Example::

    from taskkit.tasks import ResilientTask, create_app

    app = create_app("jobs")

    @app.task(base=ResilientTask, bind=True, max_retries=5, permanent_errors=(KeyError,))
    def ingest(self, path: str) -> int:
        rows = load(path)                  # a ConnectionError here is retried in process
        for i, row in enumerate(rows):
            save(row)
            self.progress(i + 1, len(rows), "saving")
        return len(rows)
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, ClassVar, cast

import redis.exceptions
from celery import Task, signals
from celery._state import _task_stack  # type: ignore[attr-defined]
from celery.app.task import Context
from celery.exceptions import Ignore, Reject, Retry
from celery.states import IGNORED, STARTED, SUCCESS
from celery.utils.saferepr import saferepr
from sqlalchemy.exc import DataError, IntegrityError, ProgrammingError, SQLAlchemyError

from taskkit._utils import call_hook, did_you_mean, is_control_flow
from taskkit.db import is_transient
from taskkit.deadletter import DeadLetterEntry, DeadLetterStore
from taskkit.errors import ConfigurationError, LeaseLost, PermanentError
from taskkit.recovery import (
    FleetConcurrency,
    FleetRateLimit,
    FleetSlot,
    RetryCallState,
    Retrying,
    RetryStrategy,
    events,
    next_wait,
)
from taskkit.tasks import _options
from taskkit.tasks._duplicates import record_duplicate
from taskkit.tasks._lease import Lease, LeaseOwner, LeaseStore, lease_store_from_url
from taskkit.tasks._progress import (
    PROGRESS,
    EpochLog,
    ProgressReport,
    Throttle,
    progress_writer,
    submit_epochs,
    write_training_progress,
)
from taskkit.tasks._visibility import SAFE_SHARE, uses_visibility_timeout, visibility_timeout
from taskkit.telemetry import tracing

__all__ = ["DEFAULT_PERMANENT_ERRORS", "DEFAULT_TRANSIENT_ERRORS", "ResilientTask", "TaskFailure"]

logger = logging.getLogger("taskkit.tasks")


#: Retried in process, then re-queued (plus what ``transient_errors`` adds, and the database
#: errors ``taskkit.db.is_transient`` accepts).
DEFAULT_TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    ConnectionError,
    TimeoutError,
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.BusyLoadingError,
)
#: Never retried (plus what ``permanent_errors`` adds).
DEFAULT_PERMANENT_ERRORS: tuple[type[BaseException], ...] = (
    PermanentError,
    ValueError,
    TypeError,
    IntegrityError,
    DataError,
    ProgrammingError,
)

#: What a sensitive argument (``sensitive_args``) shows instead of its value.
REDACTED = "[redacted]"

#: Longest repr of a task's arguments in one log line; the rest is cut, saying how much.
MAX_LOGGED_ARGUMENTS = 2048

#: Longest wait (seconds) for which a throttled task books its fleet rate slot and is re-queued
#: to run then; longer waits are asked again after them (a countdown stays well below the Redis
#: transport's visibility timeout).
FLEET_RESERVE = 30.0

#: Longest lateness (seconds past its countdown) with which a delivery that booked its fleet rate
#: slot still runs without asking again. Later, its slot has passed unused (its worker was cut
#: off and the message came back to another worker, say); run at once it would bunch with the
#: calls of later slots, so it asks the limit again. Late bookings bunch at most this much.
FLEET_BOOKED_GRACE = 0.5

#: Hooks a subclass may override; each override is wrapped so its errors are only logged.
ISOLATED_HOOKS = ("on_failure", "on_retry", "on_success", "after_return", "on_progress")


@dataclass(frozen=True)
class TaskFailure:
    """What is recorded when a task fails for good."""

    task_name: str
    task_id: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    error_type: str
    error: str
    traceback: str
    #: Deliveries of the task (Celery retries + 1).
    attempts: int
    failed_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    #: Names of the arguments shown as ``REDACTED`` in ``args``/``kwargs`` (``sensitive_args``).
    redacted: tuple[str, ...] = ()


class _Run:
    """One execution of a task body in this thread: its lease, progress throttle, run id.

    A plain class: what only the unhappy path or an observed call sets is a class default, so
    the happy path pays for the five attributes it needs.
    """

    #: Whether this call reports ``TaskAttemptEnded`` (someone was subscribed when it began).
    observed = False
    #: The inner attempt running (0 until the body is called; the ladder's on_retry counts).
    inner = 0
    #: What the ladder caught when the delivery failed (before it became a Retry or Ignore).
    error: BaseException | None = None
    #: The last progress meta stored, and the attempts record once an inner retry happened.
    meta: dict[str, Any] | None = None
    attempts: dict[str, int] | None = None
    #: The fencing token the run's writes carry (set by a ``TrainingRun`` once it took the
    #: run's fence; None: written unfenced).
    fence: int | None = None

    def __init__(self, lease: Lease | None, throttle: Throttle, task: Any = None) -> None:
        self.lease = lease
        self.throttle = throttle
        #: The task running this call (the in-process ladder's hooks find it here).
        self.task = task
        self.run_id: Any = None
        self.progress_keys: list[Any] = []
        #: Epochs a ``TrainingRun`` reported that are not written yet (with the next progress).
        self.epochs = EpochLog()

    def refused(self) -> None:
        """A write under ``fence`` was refused (a newer trainer fenced the run): the lease
        is lost, and the task stops at its next ``lease.check()``."""
        if self.lease is not None:
            self.lease.lose("a newer trainer fenced the run")


_runs = threading.local()


def _run_stack() -> list[_Run]:
    stack: list[_Run] | None = getattr(_runs, "stack", None)
    if stack is None:
        stack = _runs.stack = []
    return stack


def _isolated(hook: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(hook)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        try:
            return hook(*args, **kwargs)
        except Exception:
            logger.exception("taskkit: hook %s raised; ignored", hook.__qualname__)
            return None

    guarded.__taskkit_isolated__ = True  # type: ignore[attr-defined]
    return guarded


class ResilientTask(Task[Any, Any]):
    """A Celery task base with taskkit's retry ladder; see the module docs for the whole policy.

    Example::

        @app.task(base=ResilientTask, bind=True, inner_max_attempts=5, max_retries=10,
                  transient_errors=(requests.HTTPError,), lease_key="run_id")
        def score(self, run_id: int) -> float: ...
    """

    # Celery's own options, with taskkit's defaults.
    acks_late = True
    reject_on_worker_lost = True
    retry_on_worker_lost = True
    track_started = True
    max_retries = 3
    #: Seconds before a retry without a countdown, and before the copy of a task whose pool
    #: process died runs again on a broker other than Redis (on Redis it runs at once, ahead of
    #: the queue: ``Request``).
    default_retry_delay = 2
    #: The worker's request class: a retry after a lost pool process goes to the front of a
    #: Redis queue (``taskkit.tasks._requeue``).
    Request = "taskkit.tasks._requeue:FrontRequeueRequest"

    # taskkit's options: one table (``taskkit_options``, rendered in docs/tasks.md), merged
    # with a subclass's own. A value set on a task (decorator keyword or subclass attribute)
    # wins; otherwise the app's ``taskkit_<option>`` setting; otherwise the table's default.
    # Words: ``*_attempts`` count tries, the first included; Celery's ``max_retries`` (the
    # outer ladder: re-queues) counts retries after the first delivery.
    taskkit_options: ClassVar[tuple[_options.Option | _options.Alias, ...]] = (
        _options.RESILIENT_OPTIONS
    )

    inner_max_attempts: int
    inner_delay: float
    inner_backoff: float
    inner_max_delay: float
    outer_delay: float
    outer_backoff: float
    outer_max_delay: float
    retry_unknown_errors: bool
    transient_errors: tuple[type[BaseException], ...]
    permanent_errors: tuple[type[BaseException], ...]
    lease_key: str | Callable[[tuple[Any, ...], dict[str, Any]], str] | None
    lease_ttl: float
    progress_interval: float
    progress_run_arg: str | None
    progress_flush_timeout: float
    progress_events: bool
    sleep: Callable[[float], object] | None
    dead_letter: bool
    sensitive_args: tuple[str, ...]
    fleet_rate_limit: str | None
    fleet_concurrency: int | None
    fleet_key: str | Callable[[tuple[Any, ...], dict[str, Any]], str] | None
    fleet_fail_open: bool

    _inner: ClassVar[Retrying]
    _transient: ClassVar[tuple[type[BaseException], ...]]
    _permanent: ClassVar[tuple[type[BaseException], ...]]
    _argument_index: ClassVar[dict[str, int]]
    _lease_stores: ClassVar[dict[tuple[int, str], LeaseStore]] = {}
    _fleet_cache: ClassVar[
        dict[tuple[int, str], tuple[FleetRateLimit | None, FleetConcurrency | None]]
    ] = {}
    _events_broken: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _options.install(cls)
        if cls.__dict__.get("_decorated"):
            # Built by @app.task(...): every keyword became a class attribute; refuse typos.
            _options.reject_unknown(cls, cls.__dict__)
        for hook in ISOLATED_HOOKS:
            own = cls.__dict__.get(hook)
            if own is not None and not getattr(own, "__taskkit_isolated__", False):
                setattr(cls, hook, _isolated(own))

    @classmethod
    def on_bound(cls, app: Any) -> None:
        """Resolve options (class, then ``taskkit_*`` app config, then defaults) and build the
        in-process retry policy."""
        super().on_bound(app)
        for option, value in _options.resolve_options(cls, app.conf).items():
            setattr(cls, option, value)
        cls._transient = DEFAULT_TRANSIENT_ERRORS + tuple(cls.transient_errors or ())
        cls._permanent = DEFAULT_PERMANENT_ERRORS + tuple(cls.permanent_errors or ())
        cls._inner = Retrying(
            max_attempts=cls.inner_max_attempts,
            delay=cls.inner_delay,
            backoff=cls.inner_backoff,
            max_delay=cls.inner_max_delay,
            jitter=0.5,
            retry_if=cls.is_transient,
            give_up_on=cls._permanent,
            sleep=cls.sleep,
            on_retry=_inner_retried,
            # TaskAttemptEnded replaces RetryScheduled/GaveUp: nothing is counted twice.
            emit_events=False,
            _log_extra=_inner_log_extra,
        )
        cls._argument_index = {p: i for i, p in enumerate(_run_parameters(cls))}
        _check_sensitive_args(cls)

    # -- sensitive arguments ------------------------------------------------------------------

    def redact(
        self, args: Any, kwargs: Any
    ) -> tuple[tuple[Any, ...], dict[str, Any], tuple[str, ...]]:
        """``args`` and ``kwargs`` with each ``sensitive_args`` value replaced by ``REDACTED``,
        and the names replaced."""
        positional, named = list(args or ()), dict(kwargs or {})
        hidden: set[str] = set()
        for name in self.sensitive_args:
            if name in named:
                named[name] = REDACTED
                hidden.add(name)
            index = self._argument_index.get(name)
            if index is not None and index < len(positional):
                positional[index] = REDACTED
                hidden.add(name)
        return tuple(positional), named, tuple(sorted(hidden))

    def apply_async(self, args: Any = None, kwargs: Any = None, *more: Any, **options: Any) -> Any:
        """Celery's ``apply_async``; with ``sensitive_args`` the message's ``argsrepr`` and
        ``kwargsrepr`` (what task events, Flower and the worker's log lines show) are redacted."""
        if self.sensitive_args and "argsrepr" not in options and "kwargsrepr" not in options:
            shown_args, shown_kwargs, _ = self.redact(args, kwargs)
            options["argsrepr"] = saferepr(shown_args, 1024)
            options["kwargsrepr"] = saferepr(shown_kwargs, 1024)
        return super().apply_async(args, kwargs, *more, **options)

    @property
    def backend(self) -> Any:
        """The result backend; with ``sensitive_args`` the arguments it stores
        (``result_extended``) are redacted."""
        backend = self._backend if self._backend is not None else self.app.backend
        if not self.sensitive_args:
            return backend
        return _RedactingBackend(backend, self)

    @backend.setter
    def backend(self, value: Any) -> None:
        self._backend = value

    # -- classification -----------------------------------------------------------------------

    @classmethod
    def is_permanent(cls, error: BaseException) -> bool:
        """Whether ``error`` must fail the task at once."""
        return isinstance(error, cls._permanent)

    @classmethod
    def is_transient(cls, error: BaseException) -> bool:
        """Whether ``error`` is worth an in-process retry."""
        if isinstance(error, cls._permanent):
            return False
        if isinstance(error, cls._transient):
            return True
        return isinstance(error, SQLAlchemyError) and is_transient(error)

    # -- the ladder ---------------------------------------------------------------------------

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        request = self.request
        run = _Run(None, Throttle(self.progress_interval), self)
        if not request.called_directly and events.active():
            run.observed = True
        try:
            in_worker = not request.called_directly and not request.is_eager
            watcher = in_worker and bool(request.get("taskkit_watcher"))
            redelivered = in_worker and bool(
                request.get("redelivered") or (request.delivery_info or {}).get("redelivered")
            )
            if redelivered or watcher:
                self._screen_redelivery(request)
            run.run_id = self._argument(args, kwargs, self.progress_run_arg)
            stack = _run_stack()
            stack.append(run)
            slot = None
            try:
                if in_worker and (self.fleet_rate_limit or self.fleet_concurrency):
                    slot = self._fleet_admit(request, args, kwargs)  # or re-queued: Ignore
                if in_worker and self.lease_key:
                    # Inside the ladder: a lease store that is briefly unreachable means a retry.
                    run.lease = self._take_lease(request, args, kwargs, run)
                    run.lease.start_heartbeat()
                if redelivered and not watcher:
                    self._count_redelivery(request)
                # In a worker (and in apply()) Celery has pushed the request already and, for a task
                # without a custom __call__, calls run() directly; do the same (Task.__call__ would
                # push a second copy of the request: 80% of this class's overhead per task).
                body = self.body()
                if request.called_directly:
                    body = functools.partial(_called_directly, self, body)
                else:
                    run.inner = 1  # the ladder's on_retry counts the next ones
                    if tracing.enabled():
                        body = self._traced(body, request, run)
                result = self._inner.call(body, *args, **kwargs)
            except LeaseLost as lost:
                run.error = lost
                try:
                    holder = self.lease_store().holder(lost.key)
                except Exception:  # the store is out of reach (the lease was lost by time)
                    holder = None
                logger.warning(
                    "taskkit: %s[%s] lost its lease to %s; stopping",
                    self.name,
                    request.id,
                    holder.describe() if holder else "nobody",
                )
                if holder is not None and holder.task_id == request.id:
                    raise Ignore() from None  # a copy of this very task carries on with its result
                if holder is None and in_worker:
                    # Nobody took it over: the lease store lost it (a Redis restart, an eviction,
                    # an outage longer than the ttl). Not this task's fault: run it again.
                    raise self.retry(
                        exc=lost, countdown=self.outer_countdown(request.retries, lost)
                    ) from None
                raise  # another task owns the key now: this one fails, and is not retried
            except Exception as exc:
                run.error = exc
                if is_control_flow(exc) or self.is_permanent(exc):
                    raise
                if not (self.retry_unknown_errors or self.is_transient(exc)):
                    raise
                raise self.retry(
                    exc=exc, countdown=self.outer_countdown(request.retries, exc)
                ) from None
            finally:
                stack.pop()
                if slot is not None:
                    slot.release()
                if run.lease is not None:
                    run.lease.release()
                if run.run_id is not None and submit_epochs(
                    run.run_id,
                    run.epochs,
                    database_url=self.app.conf.get("taskkit_database_url"),
                    fence=run.fence,
                    on_refused=run.refused,
                ):
                    run.progress_keys.append(("training-epochs", run.run_id))
                if run.progress_keys:
                    progress_writer().flush(self.progress_flush_timeout)
        except BaseException as exc:
            if not request.called_directly:
                self._delivery_failed(request, run, exc)
            raise
        if run.observed:
            self._attempt_ended(request, run, "inner", "success")
            self._attempt_ended(request, run, "outer", "success")
        return result

    # -- attempts: events, log records, spans -------------------------------------------------

    def _traced(self, body: Callable[..., Any], request: Any, run: _Run) -> Callable[..., Any]:
        """``body``, each call (each inner attempt) in an attempt span."""
        outer = int(request.retries or 0) + 1

        def attempt(*args: Any, **kwargs: Any) -> Any:
            with tracing.attempt_span(
                self.name, str(request.id), outer_attempt=outer, inner_attempt=run.inner
            ):
                return body(*args, **kwargs)

        attempt.__qualname__ = getattr(body, "__qualname__", attempt.__qualname__)
        return attempt

    def _inner_retry(self, run: _Run, state: RetryCallState) -> None:
        """The in-process ladder retries: the attempts record, and the inner attempt's event
        (its log record is the ladder's own warning)."""
        request = self.request
        if request.id is None or request.called_directly:
            return
        run.inner = state.attempt + 1
        run.attempts = {"inner": run.inner, "outer": int(request.retries or 0) + 1}
        if run.meta is not None:
            self._store_state(request, PROGRESS, {**run.meta, "attempts": run.attempts})
        else:
            started = {"pid": os.getpid(), "hostname": request.hostname}
            self._store_state(request, STARTED, {**started, "attempts": run.attempts})
        if run.observed:
            error = state.exception
            self._attempt_ended(
                request,
                run,
                "inner",
                "retry",
                attempt=state.attempt,
                error_type=None if error is None else type(error).__name__,
                wait=state.wait,
            )

    def _store_state(self, request: Any, state: str, meta: dict[str, Any]) -> None:
        try:
            self.update_state(state=state, meta=meta)
        except Exception:
            logger.warning("taskkit: could not store the state of %s", request.id, exc_info=True)

    def _delivery_failed(self, request: Any, run: _Run, exc: BaseException) -> None:
        """A delivery ended with ``exc``: the outer retry's log record; with subscribers, the
        last inner attempt's event (if the body raised) and the delivery's."""
        retried = isinstance(exc, Retry)
        if isinstance(exc, Retry):
            self._log_outer_retry(request, run, exc)
        if not run.observed:
            return
        if retried:
            outcome, cause = "retry", getattr(exc, "exc", None)
        elif isinstance(exc, Ignore | Reject | LeaseLost):
            outcome, cause = "ignored", exc
        else:
            outcome, cause = "failure", exc
        if run.inner:  # the body ran: its last attempt ended with the delivery
            error: BaseException = run.error or exc
            wrapped = getattr(error, "exc", None) if isinstance(error, Retry) else None
            if isinstance(wrapped, BaseException):  # the body's own self.retry(exc=...)
                error = wrapped
            inner = "escalated" if outcome == "retry" else outcome
            self._attempt_ended(request, run, "inner", inner, error_type=type(error).__name__)
            run.error = None
        self._attempt_ended(
            request,
            run,
            "outer",
            outcome,
            error_type=None if cause is None else type(cause).__name__,
            wait=_seconds_until(getattr(exc, "when", None)) if retried else None,
        )

    def _attempt_ended(
        self,
        request: Any,
        run: _Run,
        layer: str,
        outcome: str,
        *,
        attempt: int | None = None,
        error_type: str | None = None,
        wait: float | None = None,
    ) -> None:
        if attempt is None:
            attempt = run.inner if layer == "inner" else int(request.retries or 0) + 1
        events.emit(
            events.TaskAttemptEnded(
                self.name, str(request.id), layer, attempt, outcome, error_type, wait, run.run_id
            )
        )

    def _log_outer_retry(self, request: Any, run: _Run, retry: Retry) -> None:
        """The one log record of an outer retry (a re-queue), whoever asked for it."""
        cause = getattr(retry, "exc", None)
        wait = _seconds_until(getattr(retry, "when", None))
        attempt = int(request.retries or 0) + 1
        logger.warning(
            "taskkit: task %s[%s] attempt %d failed: %s; sent again%s (retry %d%s)",
            self.name,
            request.id,
            attempt,
            "retry requested" if cause is None else f"{type(cause).__name__}: {cause}",
            "" if wait is None else f" to run in {wait:.3g}s",
            attempt,
            "" if self.max_retries is None else f" of {self.max_retries}",
            extra={
                "taskkit_event": "retry",
                "attempt": attempt,
                "layer": "outer",
                "task": self.name,
                "task_id": request.id,
                "run_id": run.run_id,
            },
        )

    def body(self) -> Callable[..., Any]:
        """What the ladder runs with the task's arguments: ``run`` (``BatchTask``: the batch)."""
        return self.run

    def outer_countdown(self, retries: int, error: BaseException | None = None) -> float:
        """Seconds before re-queue number ``retries + 1``: full jitter, capped, and never less
        than the error's own ``retry_after``."""
        wait = next_wait(
            RetryStrategy.EXPONENTIAL,
            retries + 1,
            delay=self.outer_delay,
            backoff=self.outer_backoff,
            max_delay=self.outer_max_delay,
            jitter=1.0,
            previous=None,
        )
        retry_after = getattr(error, "retry_after", None)
        if isinstance(retry_after, int | float) and retry_after > wait:
            wait = float(retry_after)
        return round(wait, 3)

    def retry(
        self,
        args: Any = None,
        kwargs: Any = None,
        exc: Exception | None = None,
        throw: bool = True,
        eta: Any = None,
        countdown: float | None = None,
        max_retries: int | None = None,
        **options: Any,
    ) -> Any:
        """Celery's ``retry``; the countdown is clamped under the visibility timeout when the
        workers do not extend it (see ``taskkit.tasks._visibility``)."""
        conf = self.app.conf
        if (
            countdown is not None
            and not conf.get("taskkit_extend_visibility", False)
            and uses_visibility_timeout(self.app)
            and countdown > visibility_timeout(self.app) * SAFE_SHARE
        ):
            safe = visibility_timeout(self.app) * SAFE_SHARE
            logger.warning(
                "taskkit: %s retry countdown %.0fs clamped to %.0fs (visibility timeout)",
                self.name,
                countdown,
                safe,
            )
            countdown = safe
        return super().retry(args, kwargs, exc, throw, eta, countdown, max_retries, **options)

    # -- redelivery and lease -----------------------------------------------------------------

    def _screen_redelivery(self, request: Any) -> None:
        """A message the broker delivered again: skip it if the task already succeeded."""
        try:
            state = self.backend.get_state(request.id)
        except Exception:
            logger.warning("taskkit: could not read the state of %s", request.id, exc_info=True)
            return
        if state == SUCCESS:
            logger.warning(
                "taskkit: %s[%s] was delivered again after it succeeded; not running it twice",
                self.name,
                request.id,
            )
            raise Ignore()

    def _count_redelivery(self, request: Any) -> None:
        """Count broker redeliveries of this task id (in Redis, when leases live there): a task
        whose whole worker dies every time fails after ``max_retries`` instead of looping."""
        client = getattr(self.lease_store(), "client", None)
        if client is None or self.max_retries is None:
            return
        key = f"taskkit:redeliveries:{request.id}"
        count, _ = client.pipeline().incr(key).expire(key, 7 * 24 * 3600).execute()
        if count > self.max_retries:
            raise PermanentError(
                f"{self.name}[{request.id}] was delivered again {count} times, each time after "
                f"its worker died; giving up (max_retries={self.max_retries})"
            )

    def _argument(self, args: tuple[Any, ...], kwargs: dict[str, Any], name: str | None) -> Any:
        if name is None:
            return None
        if name in kwargs:
            return kwargs[name]
        index = self._argument_index.get(name)
        if index is not None and index < len(args):
            return args[index]
        raise ConfigurationError(
            f"task {self.name}: argument {name!r} (named by lease_key or progress_run_arg) "
            "was not passed"
        )

    def lease_name(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
        """The lease key of one call: ``<task name>:<argument value>``, or the callable's."""
        if callable(self.lease_key):
            return str(self.lease_key(args, kwargs))
        return f"{self.name}:{self._argument(args, kwargs, self.lease_key)}"

    def lease_store(self) -> LeaseStore:
        conf = self.app.conf
        url = conf.get("taskkit_lease_backend") or conf.get("taskkit_lease_url") or conf.broker_url
        key = (id(self.app), url)
        store = self._lease_stores.get(key)
        if store is None:
            store = self._lease_stores[key] = lease_store_from_url(url)
        return store

    def _take_lease(
        self, request: Any, args: tuple[Any, ...], kwargs: dict[str, Any], run: _Run
    ) -> Lease:
        key = self.lease_name(args, kwargs)
        store = self.lease_store()
        owner = LeaseOwner.here(request.id)
        lease = store.acquire(key, owner, self.lease_ttl)
        if lease is not None:
            return self._taken(lease, request, run)
        holder = store.holder(key)
        if holder is None:  # released between the two calls
            lease = store.acquire(key, owner, self.lease_ttl)
            if lease is not None:
                return self._taken(lease, request, run)
            holder = store.holder(key)
        if holder is not None and holder.task_id != request.id:
            # Another task does this work (taskkit.tasks._duplicates): drop this one, no watcher.
            record_duplicate(self, request.id, key, holder)
            self._store_ignored(request, key, holder)
            raise Ignore()
        # A copy of this very task while its owner still runs it. Drop this copy, and send a
        # watcher after a lease period: if the owner dies it takes over, if it succeeded the
        # redelivery check drops it.
        if request.get("taskkit_watcher"):
            logger.info(
                "taskkit: %s[%s] is still running (%s); watching again",
                self.name,
                request.id,
                holder.describe() if holder else "unknown",
            )
        else:
            record_duplicate(self, request.id, key, holder)
        self.signature_from_request(
            request, countdown=self.lease_ttl, retries=request.retries
        ).apply_async(headers=cast(dict[str, str], {"taskkit_watcher": True}))
        raise Ignore()

    # -- fleet limits -------------------------------------------------------------------------

    def _fleet_admit(
        self, request: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> FleetSlot | None:
        """Pass the fleet rate limit, then take a fleet concurrency slot (heartbeated until the
        body ends), or re-queue this very task (same id, same ``retries``) after the wait the
        limiter computed and drop this delivery with ``Ignore``: a throttled call is neither a
        retry nor a failure (its ``TaskAttemptEnded`` outcome is ``ignored``)."""
        rate, slots = self._fleet_limits()
        key = ""
        if self.fleet_key is not None:
            key = str(
                self.fleet_key(args, kwargs)
                if callable(self.fleet_key)
                else self._argument(args, kwargs, self.fleet_key)
            )
        booked = request.get("taskkit_fleet_booked") == str(request.retries or 0)
        if booked and rate is not None:
            late = _seconds_late(request.get("eta"))
            if late > FLEET_BOOKED_GRACE:
                logger.info(
                    "taskkit: %s[%s] runs %.3fs after its booked fleet rate slot; asking again",
                    self.name,
                    request.id,
                    late,
                )
                booked = False
        if rate is not None and not booked:
            decision = rate.acquire(key, reserve=FLEET_RESERVE)
            if not decision.allowed:
                self._throttled(request, decision.wait, "rate", decision.reserved)
        if slots is None:
            return None
        slot, decision = slots.acquire(key)
        if slot is None:
            if decision.allowed:  # Redis unreachable, failing open
                return None
            self._throttled(request, decision.wait, "concurrency")
        assert slot is not None
        slot.start_heartbeat()
        return slot

    def _fleet_limits(self) -> tuple[FleetRateLimit | None, FleetConcurrency | None]:
        cache_key = (id(self.app), self.name)
        limits = self._fleet_cache.get(cache_key)
        if limits is None:
            conf = self.app.conf
            url = str(
                conf.get("taskkit_lease_backend")
                or conf.get("taskkit_lease_url")
                or conf.broker_url
                or ""
            )
            if not url.startswith(("redis://", "rediss://", "unix://")):
                raise ConfigurationError(
                    f"task {self.name}: fleet limits need Redis (taskkit_lease_backend or a "
                    "Redis broker)"
                )
            rate = concurrency = None
            if self.fleet_rate_limit:
                rate = FleetRateLimit(
                    url, self.name, self.fleet_rate_limit, fail_open=self.fleet_fail_open
                )
            if self.fleet_concurrency:
                concurrency = FleetConcurrency(
                    url,
                    self.name,
                    self.fleet_concurrency,
                    ttl=self.lease_ttl,
                    fail_open=self.fleet_fail_open,
                )
            limits = self._fleet_cache[cache_key] = (rate, concurrency)
        return limits

    def _throttled(self, request: Any, wait: float, limit: str, booked: bool = False) -> None:
        """Re-queue this task after ``wait``; ``booked``: its rate slot is reserved, so that
        delivery (same ``retries``) runs without asking the rate limit again."""
        logger.info(
            "taskkit: %s[%s] over its fleet %s limit; re-queued in %.3fs",
            self.name,
            request.id,
            limit,
            wait,
        )
        headers = {"taskkit_fleet_booked": str(request.retries or 0) if booked else ""}
        self.signature_from_request(request, countdown=wait, retries=request.retries).apply_async(
            headers=headers
        )
        raise Ignore()

    def _taken(self, lease: Lease, request: Any, run: _Run) -> Lease:
        """``lease``, announcing a takeover (the lease store logged it)."""
        previous = getattr(lease, "previous_owner", None)
        if previous is not None and events.active():
            events.emit(
                events.LeaseTakenOver(
                    self.name,
                    str(request.id),
                    lease.key,
                    previous.describe(),
                    lease.token,
                    run_id=run.run_id,
                )
            )
        return lease

    def _store_ignored(self, request: Any, key: str, holder: LeaseOwner) -> None:
        """Store ``IGNORED`` as the dropped duplicate's state (its result would stay STARTED),
        with the lease key and the holder as its meta."""
        meta = {"duplicate_of": holder.task_id, "lease": key, "holder": holder.describe()}
        try:
            self.backend.store_result(request.id, meta, IGNORED, request=request)
        except Exception:
            logger.warning("taskkit: could not store the state of %s", request.id, exc_info=True)

    @property
    def lease(self) -> Lease | None:
        """The lease of the running call (None without ``lease_key``)."""
        stack = _run_stack()
        return stack[-1].lease if stack else None

    # -- progress -----------------------------------------------------------------------------

    def progress(
        self,
        current: float,
        total: float | None = None,
        message: str | None = None,
        **metrics: Any,
    ) -> ProgressReport:
        """Report progress: Celery ``PROGRESS`` state, a ``task-progress`` event and, with
        ``progress_run_arg``, the run's ``TrainingProgress`` row. Throttled; never raises,
        except ``LeaseLost`` when another worker took this task's lease over."""
        report = ProgressReport(current, total, message, metrics)
        stack = _run_stack()
        run = stack[-1] if stack else None
        if run is not None and run.lease is not None:
            run.lease.check()
        if run is not None and not run.throttle.admit(report):
            return report
        request = self.request
        if request.id is not None and not request.called_directly:
            meta = report.meta()
            if run is not None:
                run.meta = meta
                if run.attempts is not None:  # an inner retry happened in this delivery
                    meta = {**meta, "attempts": run.attempts}
            try:
                self.update_state(state=PROGRESS, meta=meta)
            except Exception as exc:
                if is_control_flow(exc):  # the soft time limit struck here: it is the task's
                    raise
                logger.warning("taskkit: could not store progress of %s", request.id, exc_info=True)
            if self.progress_events and not ResilientTask._events_broken:
                self._send_progress_event(report)
        if run is not None and run.run_id is not None:
            key = ("training", run.run_id)
            progress_writer().submit(
                key,
                functools.partial(
                    write_training_progress,
                    run.run_id,
                    report,
                    database_url=self.app.conf.get("taskkit_database_url"),
                    epochs=run.epochs,
                    fence=run.fence,
                    on_refused=run.refused,
                ),
            )
            if key not in run.progress_keys:
                run.progress_keys.append(key)
        self.on_progress(report)
        return report

    def _send_progress_event(self, report: ProgressReport) -> None:
        try:
            self.send_event("task-progress", retry=False, **report.meta())
        except Exception as exc:  # a transport without fanout (the embedded broker)
            if is_control_flow(exc):  # the soft time limit struck here: it is the task's
                raise
            ResilientTask._events_broken = True
            logger.info("taskkit: task-progress events are off in this process: %s", exc)

    # -- hooks (no-ops; overrides are isolated) -----------------------------------------------

    def on_progress(self, report: ProgressReport) -> None:
        """Called after each progress report that passed the throttle."""

    def dead_letters(self) -> DeadLetterStore:
        """The dead-letter store of this task's app (its database and broker queue)."""
        return DeadLetterStore(
            self.app.conf.get("taskkit_database_url"),
            queue=self.app.conf.get("taskkit_dead_letter_queue"),
            app=self.app,
        )

    def record_failure(self, failure: TaskFailure) -> None:
        """Called once per terminal failure, after it is logged: stores the failure in the
        dead-letter queue of the app's database (unless ``dead_letter`` is off)."""
        if not self.dead_letter:
            return
        self.dead_letters().record(
            [
                DeadLetterEntry(
                    task_name=failure.task_name,
                    payload={"args": list(failure.args), "kwargs": failure.kwargs}
                    | ({"redacted": list(failure.redacted)} if failure.redacted else {}),
                    error_type=failure.error_type,
                    error_message=failure.error,
                    traceback=failure.traceback,
                    attempts=failure.attempts,
                    task_id=failure.task_id,
                    failed_at=failure.failed_at,
                )
            ]
        )


_options.install(ResilientTask)


def _called_directly(
    task: Task[Any, Any], body: Callable[..., Any], *args: Any, **kwargs: Any
) -> Any:
    """``Task.__call__`` for ``body``: push the request (and the task), so that ``self.request``
    works when the task is called as a plain function."""
    _task_stack.push(task)
    task.push_request(args=args, kwargs=kwargs)
    try:
        return body(*args, **kwargs)
    finally:
        task.pop_request()
        _task_stack.pop()


def _inner_retried(state: RetryCallState) -> None:
    """``on_retry`` of every ResilientTask's in-process ladder."""
    stack = _run_stack()
    if stack and stack[-1].task is not None:
        stack[-1].task._inner_retry(stack[-1], state)


def _inner_log_extra() -> dict[str, object]:
    """What the in-process ladder's retry log records carry besides the attempt."""
    stack = _run_stack()
    task = stack[-1].task if stack else None
    if task is None:
        return {"layer": "inner"}
    return {
        "layer": "inner",
        "task": task.name,
        "task_id": task.request.id,
        "run_id": stack[-1].run_id,
    }


def _seconds_late(eta: Any) -> float:
    """Seconds since a delivery's ``eta`` (an ISO 8601 string, as a message carries it, or a
    datetime); 0 without one, or when it is still ahead."""
    if isinstance(eta, str):
        try:
            eta = datetime.fromisoformat(eta)
        except ValueError:
            return 0.0
    if not isinstance(eta, datetime):
        return 0.0
    moment = eta if eta.tzinfo is not None else eta.replace(tzinfo=UTC)
    return max(0.0, (datetime.now(UTC) - moment).total_seconds())


def _seconds_until(when: Any) -> float | None:
    """A retry's ``when`` (a countdown in seconds, or an eta) as seconds from now."""
    if isinstance(when, int | float) and not isinstance(when, bool):
        return float(when)
    if isinstance(when, datetime):
        moment = when if when.tzinfo is not None else when.replace(tzinfo=UTC)
        return max(0.0, (moment - datetime.now(UTC)).total_seconds())
    return None


class _RedactingBackend:
    """A task's result backend whose stored requests carry redacted arguments (Celery stores
    ``request.args``/``request.kwargs`` with ``result_extended``, not the reprs)."""

    def __init__(self, backend: Any, task: ResilientTask) -> None:
        self._backend = backend
        self._task = task

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._backend, name)
        if callable(value) and (name == "store_result" or name.startswith("mark_as_")):
            return functools.partial(self._with_redacted_request, value)
        return value

    def _with_redacted_request(self, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        args = tuple(self._redacted(a) for a in args)
        kwargs = {k: self._redacted(v) for k, v in kwargs.items()}
        return method(*args, **kwargs)

    def _redacted(self, value: Any) -> Any:
        if not isinstance(value, Context):
            return value
        copy = Context(vars(value))
        copy.args, copy.kwargs, _ = self._task.redact(value.args, value.kwargs)
        copy.args = list(copy.args)
        return copy


def _check_sensitive_args(cls: type[ResilientTask]) -> None:
    """Refuse a ``sensitive_args`` name the task does not take (a typo would leak it), and
    ``sensitive_args`` on a task whose message is not its function's arguments (a
    ``BatchTask`` sends a list of items: redacting an item argument would hide the batch, and
    its items' dead letters would still hold them)."""
    if cls.sensitive_args and cls.body is not ResilientTask.body:
        raise ConfigurationError(
            f"task {cls.name}: sensitive_args is not supported on a batch task (its message "
            "carries the items, not the function's arguments); pass a reference to the secret "
            "instead"
        )
    raw = next((k.__dict__["run"] for k in cls.__mro__ if "run" in k.__dict__), None)
    try:
        parameters = inspect.signature(raw).parameters.values() if raw is not None else []
    except (TypeError, ValueError):
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return  # **kwargs takes any name
    known = list(cls._argument_index)
    for name in cls.sensitive_args:
        if name not in known:
            raise ConfigurationError(
                f"task {cls.name}: sensitive_args names {name!r}, which is not an argument "
                f"of the task" + did_you_mean(name, known)
            )


def _arguments_repr(args: Any, kwargs: Any, limit: int = MAX_LOGGED_ARGUMENTS) -> str:
    """``args=... kwargs=...`` for a log line, cut to ``limit`` characters, saying how much was
    cut."""
    text = f"args={args!r} kwargs={kwargs!r}"
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... [{len(text) - limit} characters cut]"


def _run_parameters(cls: type) -> list[str]:
    """Names of the arguments a caller passes to the task, in order (``self`` left out)."""
    raw = next((k.__dict__["run"] for k in cls.__mro__ if "run" in k.__dict__), None)
    if raw is None:
        return []
    bound = not isinstance(raw, staticmethod)
    function = raw.__func__ if isinstance(raw, staticmethod) else raw
    try:
        names = list(inspect.signature(function).parameters)
    except (TypeError, ValueError):
        return []
    return names[1:] if bound and names else names


@signals.task_failure.connect(weak=False)
def _record_terminal_failure(
    sender: Any = None,
    task_id: str | None = None,
    exception: BaseException | None = None,
    args: Any = None,
    kwargs: Any = None,
    einfo: Any = None,
    **_: Any,
) -> None:
    if not isinstance(sender, ResilientTask):
        return
    shown_args, shown_kwargs, redacted = sender.redact(args, kwargs)
    failure = TaskFailure(
        task_name=sender.name,
        task_id=str(task_id),
        args=shown_args,
        kwargs=shown_kwargs,
        error_type=type(exception).__name__,
        error=str(exception),
        traceback=str(getattr(einfo, "traceback", "") or ""),
        attempts=int(getattr(sender.request, "retries", 0) or 0) + 1,
        redacted=redacted,
    )
    run_id = _run_id_of(sender, args, kwargs)
    logger.error(
        "taskkit: task %s[%s] failed for good after %d attempt(s): %s: %s; %s",
        failure.task_name,
        failure.task_id,
        failure.attempts,
        failure.error_type,
        failure.error,
        _arguments_repr(failure.args, failure.kwargs),
        extra={
            "taskkit_failure": failure,
            "taskkit_event": "terminal_failure",
            "attempt": failure.attempts,
            "layer": "outer",
            "task": failure.task_name,
            "task_id": failure.task_id,
            "run_id": run_id,
        },
    )
    call_hook(sender.record_failure, failure)  # stored first: observers come after
    if events.active():
        events.emit(
            events.TaskFailed(
                failure.task_name,
                failure.task_id,
                failure.error_type,
                failure.attempts,
                run_id=run_id,
            )
        )


def _run_id_of(task: ResilientTask, args: Any, kwargs: Any) -> Any:
    """The run id argument of a call (``progress_run_arg``), or None."""
    try:
        return task._argument(tuple(args or ()), dict(kwargs or {}), task.progress_run_arg)
    except Exception:
        return None
