"""``retry``: call again after a failure, with a wait schedule, for sync and async functions."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import random
import time
import warnings
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar, cast, overload

from taskkit._utils import (
    TEST_MODE,
    call_hook,
    exception_tuple,
    is_control_flow,
    keep_identity,
    qualified_name,
)
from taskkit.errors import ConfigurationError, PermanentError, TaskkitWarning
from taskkit.recovery import events
from taskkit.recovery._budget import Budget
from taskkit.recovery._schedule import (
    RetryStrategy,
    next_wait,
    parse_strategy,
    schedule,
    seconds,
    validate_schedule,
)

__all__ = ["RetryCallState", "Retrying", "retry"]

P = ParamSpec("P")
R = TypeVar("R")

logger = logging.getLogger("taskkit.recovery")

ExceptionTypes = type[BaseException] | tuple[type[BaseException], ...]

#: How many waits of a deterministic schedule are computed in advance.
_PRECOMPUTED = 64


@dataclass(frozen=True, slots=True)
class RetryCallState:
    """What an ``on_retry`` hook is told about the attempt that just failed."""

    #: The function being retried.
    fn: Callable[..., Any]
    #: The attempt that failed, from 1.
    attempt: int
    #: The most attempts that will be made.
    max_attempts: int
    #: The exception of the failed attempt, or None when its result was rejected.
    exception: BaseException | None
    #: The rejected result, when ``retry_on_result`` asked for another attempt.
    result: Any
    #: Seconds until the next attempt.
    wait: float
    #: Seconds since the first failure.
    elapsed: float


class _Attempts:
    """Bookkeeping of one call's attempts; exists only once the first attempt has failed."""

    __slots__ = ("attempt", "first_failure", "previous_wait", "start")

    def __init__(self, start: float | None, now: float) -> None:
        self.attempt = 1
        self.previous_wait: float | None = None
        self.first_failure = now
        self.start = now if start is None else start


class Retrying:
    """A retry policy: validated once, then applied to any number of functions.

    ``retry(...)`` returns one; use it as a decorator or call ``policy.call(fn, *args)``. See
    ``retry`` for the options. ``emit_events=False`` keeps its ``RetryScheduled``/``GaveUp``
    events off ``taskkit.recovery.events`` and its give-ups out of the log (a caller that
    reports attempts itself: ``ResilientTask``'s in-process ladder, which emits
    ``TaskAttemptEnded``); retries are still logged.

    Example::

        policy = Retrying(max_attempts=5, delay=0.2, exceptions=(ConnectionError,))
        rows = policy.call(fetch_rows, "orders")
    """

    def __init__(
        self,
        *,
        max_attempts: int = 3,
        delay: float = 1.0,
        backoff: float = 2.0,
        max_delay: float | None = None,
        jitter: bool | float = False,
        exceptions: ExceptionTypes = (Exception,),
        strategy: RetryStrategy | str = RetryStrategy.EXPONENTIAL,
        give_up_on: ExceptionTypes = (),
        retry_if: Callable[[BaseException], bool] | None = None,
        retry_on_result: Callable[[Any], bool] | None = None,
        deadline: float | None = None,
        on_retry: Callable[[RetryCallState], object] | None = None,
        budget: Budget | None = None,
        sleep: Callable[[float], object] | None = None,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        emit_events: bool = True,
        _log_extra: Callable[[], Mapping[str, object]] | None = None,
        _stacklevel: int = 2,
    ) -> None:
        self.max_delay, self._jitter = validate_schedule(
            max_attempts=max_attempts,
            delay=delay,
            backoff=backoff,
            max_delay=max_delay,
            jitter=jitter,
            stacklevel=_stacklevel + 1,
        )
        self.strategy = parse_strategy(strategy)
        self.exceptions = exception_tuple("exceptions", exceptions)
        self.give_up_on: tuple[type[BaseException], ...] = (
            PermanentError,
            *(exception_tuple("give_up_on", give_up_on) if give_up_on else ()),
        )
        if deadline is not None and not deadline > 0:
            raise ConfigurationError(f"deadline must be > 0 seconds, got {deadline!r}")
        if budget is not None and not isinstance(budget, Budget):
            raise ConfigurationError(
                f"budget must have record_call() and try_spend(), got {budget!r}"
            )
        for name, hook in (
            ("retry_if", retry_if),
            ("retry_on_result", retry_on_result),
            ("on_retry", on_retry),
        ):
            if hook is not None and not callable(hook):
                raise ConfigurationError(f"{name} must be callable, got {hook!r}")
        if any(not issubclass(e, Exception) for e in self.exceptions):
            warnings.warn(
                "exceptions includes BaseException subclasses such as KeyboardInterrupt "
                "or SystemExit: retry will swallow Ctrl-C and interpreter shutdown",
                TaskkitWarning,
                stacklevel=_stacklevel,
            )
        self.max_attempts = max_attempts
        self.delay = float(delay)
        self.backoff = float(backoff)
        self.deadline = deadline
        self.retry_if = retry_if
        self.retry_on_result = retry_on_result
        self.on_retry = on_retry
        self.budget = budget
        self._sleep = sleep
        self._clock = clock
        self._rng = rng
        #: Whether ``RetryScheduled``/``GaveUp`` go to ``taskkit.recovery.events`` (False for a
        #: caller that reports its attempts itself: ``ResilientTask``'s in-process ladder).
        self.emit_events = emit_events
        # What the caller adds to the retry log records (its task, task id, run id, layer).
        self._log_extra = _log_extra
        # The clock is read after a failure only when something needs the time.
        self._timed = deadline is not None or on_retry is not None
        # A schedule without randomness is computed once, not per retry.
        self._exact: list[float] | None = None
        if self.strategy is not RetryStrategy.DECORRELATED and not self._jitter:
            self._exact = self._waits(min(self.max_attempts - 1, _PRECOMPUTED), None)

    # -- public -----------------------------------------------------------------------------

    def __call__(self, fn: Callable[P, R]) -> Callable[P, R]:
        """Decorate ``fn`` (sync or ``async def``), keeping its name, docs and signature."""
        if not callable(fn):
            raise ConfigurationError(f"retry decorates a callable, got {fn!r}")
        if inspect.iscoroutinefunction(fn):
            wrapper = self._async_wrapper(cast(Callable[..., Coroutine[Any, Any, Any]], fn))
        else:
            wrapper = self._sync_wrapper(cast(Callable[..., Any], fn))
        return cast(Callable[P, R], keep_identity(wrapper, fn, retry=self))

    def call(self, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
        """Call ``fn(*args, **kwargs)`` under this policy (sync functions only)."""
        return self._sync_wrapper(fn)(*args, **kwargs)

    def delays(self, rng: random.Random | None = None) -> list[float]:
        """The waits this policy would use if every attempt failed (a pure preview)."""
        return self._waits(self.max_attempts - 1, rng or self._rng)

    def _waits(self, count: int, rng: random.Random | None) -> list[float]:
        return schedule(
            self.strategy, count, self.delay, self.backoff, self.max_delay, self._jitter, rng
        )

    def __repr__(self) -> str:
        return (
            f"Retrying(max_attempts={self.max_attempts}, delay={self.delay}, "
            f"backoff={self.backoff}, max_delay={self.max_delay}, "
            f"strategy={self.strategy.name}, exceptions={self.exceptions})"
        )

    # -- wrappers ---------------------------------------------------------------------------
    # The happy path is one try/except around the call: no clock, no allocation. Everything
    # else runs only after a failure (`_retry_sync`, `_retry_async`).

    def _sync_wrapper(self, fn: Callable[..., R]) -> Callable[..., R]:
        exceptions = self.exceptions
        retry_sync = self._retry_sync
        if self.deadline is None and self.budget is None and self.retry_on_result is None:

            def wrapper(*args: Any, **kwargs: Any) -> R:
                try:
                    return fn(*args, **kwargs)
                except exceptions as exc:
                    error = exc
                return retry_sync(fn, args, kwargs, error, None, None)

            return wrapper

        clock, budget, check = self._clock, self.budget, self.retry_on_result
        timed = self.deadline is not None

        def guarded(*args: Any, **kwargs: Any) -> R:
            start = clock() if timed else None
            if budget is not None:
                budget.record_call()
            try:
                result = fn(*args, **kwargs)
            except exceptions as exc:
                error = exc
            else:
                if check is None or not check(result):
                    return result
                return retry_sync(fn, args, kwargs, None, result, start)
            return retry_sync(fn, args, kwargs, error, None, start)

        return guarded

    def _async_wrapper(
        self, fn: Callable[..., Coroutine[Any, Any, R]]
    ) -> Callable[..., Coroutine[Any, Any, R]]:
        exceptions, retry_async = self.exceptions, self._retry_async
        clock, budget, check = self._clock, self.budget, self.retry_on_result
        timed = self.deadline is not None

        async def wrapper(*args: Any, **kwargs: Any) -> R:
            start = clock() if timed else None
            if budget is not None:
                budget.record_call()
            try:
                result = await fn(*args, **kwargs)
            except exceptions as exc:
                error = exc
            else:
                if check is None or not check(result):
                    return result
                return await retry_async(fn, args, kwargs, None, result, start)
            return await retry_async(fn, args, kwargs, error, None, start)

        return wrapper

    # -- the slow path ----------------------------------------------------------------------

    def _retry_sync(
        self,
        fn: Callable[..., R],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        error: BaseException | None,
        result: Any,
        start: float | None,
    ) -> R:
        state = _Attempts(start, self._clock() if self._timed else 0.0)
        sleep = self._sleep or time.sleep
        while True:
            wait = self._plan(fn, state, error, result)
            if wait is None:
                if error is not None:
                    raise error
                return cast(R, result)
            if wait > 0:
                sleep(wait)
            state.attempt += 1
            try:
                result, error = fn(*args, **kwargs), None
            except self.exceptions as exc:
                result, error = None, exc
            else:
                if self.retry_on_result is None or not self.retry_on_result(result):
                    return cast(R, result)

    async def _retry_async(
        self,
        fn: Callable[..., Coroutine[Any, Any, R]],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        error: BaseException | None,
        result: Any,
        start: float | None,
    ) -> R:
        state = _Attempts(start, self._clock() if self._timed else 0.0)
        sleep = self._sleep or asyncio.sleep
        while True:
            wait = self._plan(fn, state, error, result)
            if wait is None:
                if error is not None:
                    raise error
                return cast(R, result)
            if wait > 0:
                slept = sleep(wait)
                if inspect.isawaitable(slept):
                    await cast(Awaitable[object], slept)
            state.attempt += 1
            try:
                result, error = await fn(*args, **kwargs), None
            except self.exceptions as exc:
                result, error = None, exc
            else:
                if self.retry_on_result is None or not self.retry_on_result(result):
                    return cast(R, result)

    def _plan(
        self, fn: Callable[..., Any], state: _Attempts, error: BaseException | None, result: Any
    ) -> float | None:
        """Seconds to wait before the next attempt, or None to give up (and say why)."""
        attempt = state.attempt
        max_attempts = TEST_MODE.cap(self.max_attempts)
        if error is not None and is_control_flow(error):
            return None  # a framework's signal (Celery's Retry...), not a failure: pass it on
        if error is not None and isinstance(error, self.give_up_on):
            self._give_up(fn, attempt, error, f"{type(error).__name__} is never retried")
            return None
        if error is not None and self.retry_if is not None and not self.retry_if(error):
            self._give_up(fn, attempt, error, f"retry_if rejected {type(error).__name__}")
            return None
        if attempt >= max_attempts:
            self._give_up(fn, attempt, error, "no attempts left")
            return None
        wait = self.wait_before(attempt, state.previous_wait)
        asked = seconds(getattr(error, "retry_after", None))
        if asked is not None:
            if asked > self.max_delay:
                self._give_up(
                    fn,
                    attempt,
                    error,
                    f"retry_after={asked:g}s exceeds max_delay={self.max_delay:g}s",
                )
                return None
            wait = max(wait, asked)
        if TEST_MODE.active:
            wait = 0.0
        now = self._clock() if self._timed else 0.0
        if self.deadline is not None and now + wait - state.start > self.deadline:
            self._give_up(fn, attempt, error, f"the {self.deadline:g}s deadline would pass")
            return None
        if self.budget is not None and not self.budget.try_spend():
            self._give_up(fn, attempt, error, "the retry budget is exhausted")
            return None
        state.previous_wait = wait
        if logger.isEnabledFor(logging.WARNING):
            logger.warning(
                "taskkit.retry: %s failed (attempt %d/%d): %s; retrying in %.3gs",
                qualified_name(fn),
                attempt,
                max_attempts,
                _describe(error, result),
                wait,
                extra=self._extra("retry", attempt),
            )
        if self.on_retry is not None:
            call_hook(
                self.on_retry,
                RetryCallState(
                    fn, attempt, max_attempts, error, result, wait, now - state.first_failure
                ),
            )
        if self.emit_events and events.active():
            events.emit(
                events.RetryScheduled(qualified_name(fn), attempt, max_attempts, wait, error)
            )
        return wait

    def wait_before(
        self, retry_number: int, previous: float | None = None, rng: random.Random | None = None
    ) -> float:
        """The wait before retry ``retry_number`` (from 1); ``previous`` is the last wait."""
        exact = self._exact
        if exact is not None and retry_number <= len(exact):
            return exact[retry_number - 1]
        return next_wait(
            self.strategy,
            retry_number,
            delay=self.delay,
            backoff=self.backoff,
            max_delay=self.max_delay,
            jitter=self._jitter,
            previous=previous,
            rng=rng or self._rng,
        )

    def _give_up(
        self, fn: Callable[..., Any], attempts: int, error: BaseException | None, reason: str
    ) -> None:
        name = qualified_name(fn)
        if error is not None:
            error.add_note(
                f"taskkit.retry: gave up on {name} after {attempts} attempt(s): {reason}"
            )
            # Exceptions with __slots__ cannot take the attribute; the note is enough there.
            with contextlib.suppress(AttributeError, TypeError):
                error.taskkit_attempts = attempts  # type: ignore[attr-defined]
        if not self.emit_events:
            return  # the caller reports the attempt (and logs it) itself
        # One record per give-up; an error never retried at all (a permanent one, or one that
        # retry_if rejects on its first attempt) is routine: INFO, not WARNING.
        routine = (
            attempts == 1
            and error is not None
            and (isinstance(error, self.give_up_on) or reason.startswith("retry_if"))
        )
        level = logging.INFO if routine else logging.WARNING
        if logger.isEnabledFor(level):
            logger.log(
                level,
                "taskkit.retry: gave up on %s after %d attempt(s): %s (%s)",
                name,
                attempts,
                reason,
                _describe(error, None) if error is not None else "result rejected",
                extra=self._extra("gave_up", attempts),
            )
        if events.active():
            events.emit(events.GaveUp(name, attempts, reason, error))

    def _extra(self, kind: str, attempt: int) -> dict[str, object]:
        """The ``extra`` of a retry or give-up log record (``taskkit.telemetry.logs``)."""
        extra: dict[str, object] = {"taskkit_event": kind, "attempt": attempt, "layer": None}
        if self._log_extra is not None:
            extra.update(self._log_extra())
        return extra


@overload
def retry(fn: Callable[P, R], /) -> Callable[P, R]: ...


@overload
def retry(
    *,
    max_attempts: int = 3,
    delay: float = 1.0,
    backoff: float = 2.0,
    max_delay: float | None = None,
    jitter: bool | float = False,
    exceptions: ExceptionTypes = (Exception,),
    strategy: RetryStrategy | str = RetryStrategy.EXPONENTIAL,
    give_up_on: ExceptionTypes = (),
    retry_if: Callable[[BaseException], bool] | None = None,
    retry_on_result: Callable[[Any], bool] | None = None,
    deadline: float | None = None,
    on_retry: Callable[[RetryCallState], object] | None = None,
    budget: Budget | None = None,
    sleep: Callable[[float], object] | None = None,
    clock: Callable[[], float] = time.monotonic,
    rng: random.Random | None = None,
) -> Retrying: ...


def retry(fn: Callable[..., Any] | None = None, /, **options: Any) -> Any:
    """Retry a function when it raises one of ``exceptions``, waiting between attempts.

    Works on plain functions, methods, Celery bound tasks (put it under ``@app.task``) and
    ``async def`` functions; the wrapper keeps the name, docstring, ``__wrapped__`` and the
    signature (``__signature__``, which Celery's argument check and FastAPI both read).

    Options (keyword-only; every one is checked when the decorator is built):

    - ``max_attempts=3``: attempts in all, the first included.
    - ``delay=1.0``, ``backoff=2.0``, ``strategy=RetryStrategy.EXPONENTIAL``: the schedule
      (see ``RetryStrategy``); ``max_delay=60.0`` caps a single wait.
    - ``jitter=False``: ``True`` is full jitter (``uniform(0, wait)``); a float is the share of
      the wait that is randomised.
    - ``exceptions=(Exception,)``: what is retried. ``give_up_on=()`` and
      ``taskkit.errors.PermanentError`` are never retried, even when they match; nor is a
      framework's control flow: Celery's ``Retry`` (raised by ``self.retry()`` after it has
      queued the retry: re-running would queue another), ``Ignore``, ``Reject`` and time limits.
    - ``retry_if=None``: a predicate on a matching exception; one it rejects is raised at once
      (``taskkit.db.db_retry`` uses it to retry only transient database errors).
    - ``retry_on_result=None``: a predicate; a result it accepts is retried like an error. When
      attempts run out the last result is returned, since there is no exception to raise.
    - ``deadline=None``: seconds from the start of the first attempt; no retry is started
      whose wait would end past it.
    - ``retry_after``: an exception with a ``retry_after`` attribute (seconds or a timedelta;
      ``RetryLater``, an open ``CircuitBreakerError``, your HTTP client's 429 error) is retried
      no sooner than that. A request above ``max_delay`` gives up instead: retrying early would
      fail again, and waiting longer would break the cap you set.
    - ``budget=None``: a ``RetryBudget`` shared between callers; no budget left, no retry.
    - ``on_retry=None``: called with a ``RetryCallState`` before each wait; what it raises is
      logged and ignored.
    - ``sleep=time.sleep`` (``asyncio.sleep`` for ``async def``), ``clock=time.monotonic``,
      ``rng``: injectable, for tests. A zero wait never calls ``sleep``.

    When every attempt fails, the last exception itself propagates, not a wrapper, with a note
    and a ``taskkit_attempts`` attribute saying how many attempts were made.

    The seed's configuration dicts work as they are: ``retry(**EXTERNAL_API_RETRY_CONFIG)``.

    Example::

        @retry(max_attempts=3, delay=0.5, exceptions=(ConnectionError, TimeoutError))
        def fetch(url: str) -> bytes:
            return urlopen(url, timeout=5).read()

        @retry(strategy=RetryStrategy.DECORRELATED, jitter=True, deadline=30)
        async def poll(job_id: str) -> dict: ...
    """
    if fn is not None:
        return Retrying(_stacklevel=3, **options)(fn)
    return Retrying(_stacklevel=3, **options)


def _describe(error: BaseException | None, result: Any) -> str:
    if error is not None:
        return f"{type(error).__name__}: {error}"
    return f"result {result!r} was rejected"
