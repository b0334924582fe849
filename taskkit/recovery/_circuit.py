"""``CircuitBreaker``: stop calling a dependency that keeps failing, then probe it carefully."""

from __future__ import annotations

import inspect
import itertools
import logging
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, ParamSpec, Protocol, TypeVar, cast

from taskkit._utils import (
    call_hook,
    check_int,
    check_seconds,
    exception_tuple,
    is_control_flow,
    keep_identity,
)
from taskkit.errors import CircuitBreakerError, ConfigurationError
from taskkit.recovery import events

__all__ = [
    "Admission",
    "CircuitBackend",
    "CircuitBreaker",
    "CircuitConfig",
    "CircuitState",
    "CircuitStorage",
    "LocalCircuit",
]

P = ParamSpec("P")
R = TypeVar("R")

logger = logging.getLogger("taskkit.recovery")

#: How many buckets the failure-rate window is split into.
WINDOW_BUCKETS = 10


class CircuitState(StrEnum):
    """The three states of a breaker. ``state.name.lower()`` gives ``"closed"``, ``"open"``,
    ``"half_open"``, which is also the value."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


_CLOSED, _OPEN, _HALF_OPEN = CircuitState.CLOSED, CircuitState.OPEN, CircuitState.HALF_OPEN


@dataclass(frozen=True, slots=True)
class CircuitConfig:
    """A breaker's rules, as its storage needs them."""

    name: str
    failure_threshold: int
    recovery_timeout: float
    success_threshold: int
    half_open_max_calls: int
    failure_rate_threshold: float | None
    minimum_calls: int
    window: float
    probe_timeout: float


class Admission:
    """Permission for one call; handed back to the backend with the call's outcome."""

    __slots__ = ("local", "probe", "streak", "token")

    def __init__(self, probe: bool, token: str = "", local: bool = True, streak: int = 0) -> None:
        #: A half-open probe (its outcome closes or reopens the breaker).
        self.probe = probe
        #: Identifies the probe's slot, so its outcome frees exactly that slot.
        self.token = token
        #: Admitted by this process's state, not the shared one.
        self.local = local
        #: Consecutive failures the shared state held at admission: a success must reset them.
        self.streak = streak


#: The admission of an ordinary call through a closed breaker; shared, never mutated.
NORMAL = Admission(probe=False)

Notify = Callable[[CircuitState, CircuitState], None]


class CircuitBackend(Protocol):
    """Where one breaker's state lives: this process (``LocalCircuit``) or Redis."""

    def acquire(self) -> Admission:
        """Admit a call or raise ``CircuitBreakerError``."""

    def on_success(self, admission: Admission) -> None: ...

    def on_failure(self, admission: Admission) -> None: ...

    def on_ignored(self, admission: Admission) -> None:
        """The call raised an exception the breaker does not count: free its probe slot."""

    def current(self) -> tuple[CircuitState, float]:
        """The state now and the seconds until an open breaker admits a probe (else 0)."""

    def failure_count(self) -> int: ...

    def reset(self) -> None: ...


class CircuitStorage(Protocol):
    """Makes the backend of a named breaker, e.g. ``RedisCircuitStorage``."""

    def bind(
        self, config: CircuitConfig, notify: Notify, clock: Callable[[], float]
    ) -> CircuitBackend: ...


class _Window:
    """Calls and failures over the last ``seconds``, in ``WINDOW_BUCKETS`` time buckets."""

    __slots__ = ("calls", "failures", "stamps", "width")

    def __init__(self, seconds: float) -> None:
        self.width = seconds / WINDOW_BUCKETS
        self.calls = [0] * WINDOW_BUCKETS
        self.failures = [0] * WINDOW_BUCKETS
        self.stamps = [-1] * WINDOW_BUCKETS

    def add(self, now: float, failed: bool) -> None:
        index = int(now // self.width)
        slot = index % WINDOW_BUCKETS
        if self.stamps[slot] != index:
            self.stamps[slot], self.calls[slot], self.failures[slot] = index, 0, 0
        self.calls[slot] += 1
        self.failures[slot] += failed

    def totals(self, now: float) -> tuple[int, int]:
        oldest = int(now // self.width) - WINDOW_BUCKETS
        calls = failures = 0
        for slot, stamp in enumerate(self.stamps):
            if stamp > oldest:
                calls += self.calls[slot]
                failures += self.failures[slot]
        return calls, failures

    def clear(self) -> None:
        self.stamps = [-1] * WINDOW_BUCKETS


class LocalCircuit:
    """A breaker's state in this process: the default backend, and the fallback of shared ones.

    The lock is held only while the state changes, never around the protected call. In the
    closed state with nothing to count, admitting a call and recording its success take no
    lock at all.
    """

    def __init__(self, config: CircuitConfig, notify: Notify, clock: Callable[[], float]) -> None:
        self.config = config
        self._notify = notify
        self._clock = clock
        self._lock = threading.Lock()
        #: Read without the lock by the breaker's fast path.
        self.state = _CLOSED
        #: Consecutive failures while closed; read without the lock by the fast path.
        self.failures = 0
        self._open_until = 0.0
        self._probe_leases: dict[int, float] = {}
        self._probe_successes = 0
        self._tokens = itertools.count()
        self._window = _Window(config.window) if config.failure_rate_threshold is not None else None

    def acquire(self) -> Admission:
        if self.state is _CLOSED:
            return NORMAL
        now = self._clock()
        changed = None
        rejection: CircuitBreakerError | None = None
        admission = NORMAL
        with self._lock:
            if self.state is _OPEN:
                if now < self._open_until:
                    rejection = CircuitBreakerError(
                        self.config.name, "open", self._open_until - now
                    )
                else:
                    changed = self._move(_HALF_OPEN)
            if self.state is _HALF_OPEN and rejection is None:
                leases = self._probe_leases
                for token in [t for t, until in leases.items() if until <= now]:
                    del leases[token]  # a probe that outlived probe_timeout gives its slot up
                if len(leases) >= self.config.half_open_max_calls:
                    rejection = CircuitBreakerError(
                        self.config.name,
                        "half_open",
                        0.0,
                        f"{len(leases)} probe call(s) in flight",
                    )
                else:
                    token = next(self._tokens)
                    leases[token] = now + self.config.probe_timeout
                    admission = Admission(probe=True, token=str(token))
        if changed:
            self._notify(*changed)
        if rejection is not None:
            raise rejection
        return admission

    def on_success(self, admission: Admission) -> None:
        if not admission.probe and self.failures == 0 and self._window is None:
            return
        changed = None
        with self._lock:
            if admission.probe:
                self._probe_leases.pop(int(admission.token), None)
                if self.state is _HALF_OPEN:
                    self._probe_successes += 1
                    if self._probe_successes >= self.config.success_threshold:
                        changed = self._move(_CLOSED)
            elif self.state is _CLOSED:
                self.failures = 0
                if self._window is not None:
                    self._window.add(self._clock(), failed=False)
        if changed:
            self._notify(*changed)

    def on_failure(self, admission: Admission) -> None:
        changed = None
        with self._lock:
            if admission.probe:
                self._probe_leases.pop(int(admission.token), None)
                if self.state is _HALF_OPEN:
                    changed = self._move(_OPEN)
            elif self.state is _CLOSED:
                self.failures += 1
                tripped = self.failures >= self.config.failure_threshold
                if self._window is not None:
                    tripped = self._rate_exceeded(self._window) or tripped
                if tripped:
                    changed = self._move(_OPEN)
            # Already open: a call admitted before the breaker opened; nothing to add.
        if changed:
            self._notify(*changed)

    def on_ignored(self, admission: Admission) -> None:
        if admission.probe:
            with self._lock:
                self._probe_leases.pop(int(admission.token), None)

    def current(self) -> tuple[CircuitState, float]:
        if self.state is _OPEN:
            left = self._open_until - self._clock()
            if left > 0:
                return _OPEN, left
            return _HALF_OPEN, 0.0
        return self.state, 0.0

    def failure_count(self) -> int:
        return self.failures

    def reset(self) -> None:
        with self._lock:
            changed = self._move(_CLOSED)
        if changed:
            self._notify(*changed)

    def _rate_exceeded(self, window: _Window) -> bool:
        """Count a failure in the window; True when the failure rate rule trips."""
        now = self._clock()
        window.add(now, failed=True)
        calls, failures = window.totals(now)
        limit = cast(float, self.config.failure_rate_threshold)
        return calls >= self.config.minimum_calls and failures >= limit * calls

    def _move(self, new: CircuitState) -> tuple[CircuitState, CircuitState] | None:
        """Change state (lock held); returns the change to announce once the lock is free."""
        old = self.state
        self.failures = 0
        self._probe_successes = 0
        self._probe_leases.clear()
        if self._window is not None:
            self._window.clear()
        if new is _OPEN:
            self._open_until = self._clock() + self.config.recovery_timeout
        self.state = new
        return None if old is new else (old, new)


class CircuitBreaker:
    """Fail fast while a dependency is down, then let a few probe calls find out if it is back.

    - Closed: calls run. ``failure_threshold`` consecutive failures (exceptions matching
      ``expected_exception``) open it; optionally also a failure rate: once ``minimum_calls``
      calls ran in the last ``window`` seconds and at least ``failure_rate_threshold`` of them
      failed. A call slower than ``slow_call_duration`` counts as a failure (its result is
      still returned). Exceptions outside ``expected_exception`` pass through uncounted, and
      so does a framework's control flow (Celery's ``Retry``, ``Ignore``, ``Reject``, time
      limits).
    - Open: calls are rejected at once with ``CircuitBreakerError`` ("Circuit breaker is
      OPEN", the name and the seconds left; its ``retry_after`` is those seconds). After
      ``recovery_timeout`` seconds ``state`` reads ``HALF_OPEN``.
    - Half-open: up to ``half_open_max_calls`` probe calls at a time run, the rest are
      rejected; ``success_threshold`` successful probes close it, one failure reopens it. A
      probe that has not finished after ``probe_timeout`` seconds (default: the recovery
      timeout) gives its slot up, so a hung or crashed prober cannot wedge the breaker.

    Use it as a decorator (sync or ``async def``) or with ``breaker.call(fn, *args)``. The
    state lives in this process unless ``storage`` is given: with ``RedisCircuitStorage``,
    every process that names the same breaker shares one state.

    ``listeners`` are called as ``listener(breaker, old_state, new_state)`` after each change
    this process makes or observes; what they raise is logged and ignored. The ``clock`` is
    injectable so tests can move time.

    Decision: reading ``state`` has no side effect. An open breaker whose timeout has passed
    reads ``HALF_OPEN`` (so the seed's ``if breaker.state == CircuitState.OPEN: fallback``
    lets traffic back), and the transition itself, with its listener calls, happens when the
    next call is admitted.

    Example::

        breaker = CircuitBreaker(failure_threshold=5, recovery_timeout=60,
                                 expected_exception=ConnectionError, name="pricing")

        @breaker
        def price(sku: str) -> float: ...

        try:
            value = price("A-1")
        except CircuitBreakerError:
            value = cached_price("A-1")
    """

    def __init__(
        self,
        failure_threshold: int = 5,
        recovery_timeout: float = 60,
        expected_exception: type[BaseException] | tuple[type[BaseException], ...] = Exception,
        name: str | None = None,
        *,
        success_threshold: int = 1,
        half_open_max_calls: int = 1,
        failure_rate_threshold: float | None = None,
        minimum_calls: int = 10,
        window: float = 60.0,
        slow_call_duration: float | None = None,
        probe_timeout: float | None = None,
        listeners: tuple[Callable[[CircuitBreaker, CircuitState, CircuitState], object], ...]
        | list[Callable[[CircuitBreaker, CircuitState, CircuitState], object]] = (),
        storage: CircuitStorage | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        check_int("failure_threshold", failure_threshold, 1)
        check_int("success_threshold", success_threshold, 1)
        check_int("half_open_max_calls", half_open_max_calls, 1)
        check_int("minimum_calls", minimum_calls, 1)
        check_seconds("recovery_timeout", recovery_timeout)
        check_seconds("window", window)
        if slow_call_duration is not None:
            check_seconds("slow_call_duration", slow_call_duration)
        if probe_timeout is not None:
            check_seconds("probe_timeout", probe_timeout)
        if failure_rate_threshold is not None and not 0 < failure_rate_threshold <= 1:
            raise ConfigurationError(
                f"failure_rate_threshold must be a share in (0, 1], got {failure_rate_threshold!r}"
            )
        expected = exception_tuple("expected_exception", expected_exception)
        if storage is not None and name is None:
            raise ConfigurationError(
                "a breaker with shared storage needs a name: the name is what processes share"
            )
        self.name = name if name is not None else f"circuit-{id(self):x}"
        self.expected_exception = expected
        self.slow_call_duration = slow_call_duration
        self.config = CircuitConfig(
            name=self.name,
            failure_threshold=failure_threshold,
            recovery_timeout=float(recovery_timeout),
            success_threshold=success_threshold,
            half_open_max_calls=half_open_max_calls,
            failure_rate_threshold=failure_rate_threshold,
            minimum_calls=minimum_calls,
            window=float(window),
            probe_timeout=float(probe_timeout if probe_timeout is not None else recovery_timeout),
        )
        self._listeners = list(listeners)
        self._clock = clock
        self._backend: CircuitBackend
        if storage is None:
            local = LocalCircuit(self.config, self._announce, clock)
            self._backend = local
            # The lock-free fast path applies when nothing but failures needs counting.
            fast = slow_call_duration is None and failure_rate_threshold is None
            self._local: LocalCircuit | None = local if fast else None
        else:
            self._backend = storage.bind(self.config, self._announce, clock)
            self._local = None

    # -- state ------------------------------------------------------------------------------

    @property
    def failure_threshold(self) -> int:
        return self.config.failure_threshold

    @property
    def recovery_timeout(self) -> float:
        return self.config.recovery_timeout

    @property
    def state(self) -> CircuitState:
        """``CLOSED``, ``OPEN`` or ``HALF_OPEN`` (open with its timeout passed)."""
        return self._backend.current()[0]

    @property
    def remaining(self) -> float:
        """Seconds until an open breaker admits a probe; 0 when it is not open."""
        return self._backend.current()[1]

    @property
    def failure_count(self) -> int:
        """Consecutive failures counted while closed."""
        return self._backend.failure_count()

    def reset(self) -> None:
        """Close the breaker and forget its failures (everywhere, when the state is shared)."""
        self._backend.reset()

    def add_listener(
        self, listener: Callable[[CircuitBreaker, CircuitState, CircuitState], object]
    ) -> None:
        """Call ``listener(breaker, old_state, new_state)`` on every state change."""
        self._listeners.append(listener)

    # -- calls ------------------------------------------------------------------------------

    def __call__(self, fn: Callable[P, R]) -> Callable[P, R]:
        """Decorate ``fn`` (sync or ``async def``), keeping its name, docs and signature."""
        if not callable(fn):
            raise ConfigurationError(f"CircuitBreaker decorates a callable, got {fn!r}")
        if inspect.iscoroutinefunction(fn):
            coro_fn = cast(Callable[..., Coroutine[Any, Any, Any]], fn)
            call_async = self.call_async

            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                return await call_async(coro_fn, *args, **kwargs)

            return cast(Callable[P, R], keep_identity(async_wrapper, fn, circuit=self))

        local, guarded, expected = self._local, self._guarded, self.expected_exception

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            # The fast path of `call`, inlined: this is the per-call cost of a healthy breaker.
            if local is None or local.state is not _CLOSED:
                return guarded(fn, args, kwargs)
            try:
                result = fn(*args, **kwargs)
            except expected as exc:
                if not is_control_flow(exc):
                    local.on_failure(NORMAL)
                raise
            if local.failures:
                local.on_success(NORMAL)
            return result

        return cast(Callable[P, R], keep_identity(wrapper, fn, circuit=self))

    def call(self, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
        """Run ``fn(*args, **kwargs)`` through the breaker."""
        local = self._local
        if local is None or local.state is not _CLOSED:
            return self._guarded(fn, args, kwargs)
        try:
            result = fn(*args, **kwargs)
        except self.expected_exception as exc:
            if not is_control_flow(exc):
                local.on_failure(NORMAL)
            raise
        if local.failures:
            local.on_success(NORMAL)
        return result

    async def call_async(
        self, fn: Callable[P, Coroutine[Any, Any, R]], /, *args: P.args, **kwargs: P.kwargs
    ) -> R:
        """Await ``fn(*args, **kwargs)`` through the breaker."""
        backend = self._backend
        admission = backend.acquire()
        started = self._clock() if self.slow_call_duration is not None else 0.0
        try:
            result = await fn(*args, **kwargs)
        except BaseException as exc:
            self._record_error(admission, exc)
            raise
        self._settle(admission, started)
        return result

    def _guarded(self, fn: Callable[..., R], args: Any, kwargs: Any) -> R:
        backend = self._backend
        admission = backend.acquire()
        started = self._clock() if self.slow_call_duration is not None else 0.0
        try:
            result = fn(*args, **kwargs)
        except BaseException as exc:
            self._record_error(admission, exc)
            raise
        self._settle(admission, started)
        return result

    def _record_error(self, admission: Admission, error: BaseException) -> None:
        if isinstance(error, self.expected_exception) and not is_control_flow(error):
            self._backend.on_failure(admission)
        else:
            self._backend.on_ignored(admission)

    def _settle(self, admission: Admission, started: float) -> None:
        slow = self.slow_call_duration
        if slow is not None:
            took = self._clock() - started
            if took >= slow:
                logger.warning(
                    "taskkit.circuit: %r call took %.3fs (slow_call_duration=%gs): a failure",
                    self.name,
                    took,
                    slow,
                )
                self._backend.on_failure(admission)
                return
        self._backend.on_success(admission)

    def _announce(self, old: CircuitState, new: CircuitState) -> None:
        level = logging.WARNING if new is _OPEN else logging.INFO
        logger.log(
            level,
            "taskkit.circuit: %r %s -> %s",
            self.name,
            old.name,
            new.name,
            extra={"taskkit_event": "circuit_state", "attempt": None, "layer": None},
        )
        events.emit(events.CircuitStateChanged(self.name, old.value, new.value))
        for listener in tuple(self._listeners):
            call_hook(listener, self, old, new)

    def __repr__(self) -> str:
        return f"CircuitBreaker(name={self.name!r}, state={self.state.name})"
