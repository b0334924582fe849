"""What the sync and async clients share: which failures are retried, Retry-After, per-host
breakers and budgets, and error messages without secrets."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import httpx

from taskkit._utils import mask_password
from taskkit.errors import ConfigurationError
from taskkit.recovery import (
    Budget,
    CircuitBreaker,
    RedisCircuitStorage,
    RedisRetryBudget,
    RetryBudget,
)

__all__ = [
    "COUNTED",
    "IDEMPOTENT_METHODS",
    "RETRIED",
    "HostPolicy",
    "breakers",
    "host_name",
    "host_policy",
    "is_retryable_status",
    "name_target",
    "retry_after",
    "retryable",
    "safe_url",
    "status_error",
]

#: Methods retried by default: RFC 9110's idempotent methods.
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})

#: Transport failures worth another attempt (and that count against a host's breaker). An
#: ``UnsupportedProtocol`` or ``LocalProtocolError`` is a bug on our side: neither.
RETRIED: tuple[type[Exception], ...] = (
    httpx.TimeoutException,
    httpx.NetworkError,
    httpx.RemoteProtocolError,
)

#: Failures a host's breaker counts: the transport failures above and 5xx/429 answers.
COUNTED: tuple[type[Exception], ...] = (*RETRIED, httpx.HTTPStatusError)

#: Failures that prove the request never reached the server: safe to retry for any method.
_NEVER_SENT: tuple[type[Exception], ...] = (
    httpx.ConnectError,
    httpx.ConnectTimeout,
    httpx.PoolTimeout,
)


def is_retryable_status(status: int) -> bool:
    """429 and 5xx, except 501 Not Implemented, which no retry can change."""
    return status == 429 or (status >= 500 and status != 501)


def retryable(error: BaseException, methods: frozenset[str]) -> bool:
    """May ``error`` (a transport error or a 5xx/429 answer) be retried?"""
    if isinstance(error, _NEVER_SENT):
        return True
    try:
        request: httpx.Request = error.request  # type: ignore[attr-defined]
    except (AttributeError, RuntimeError):  # an error raised outside a request
        return False
    return request.method in methods or "idempotency-key" in request.headers


def retry_after(
    response: httpx.Response, now: Callable[[], datetime] | None = None
) -> float | None:
    """Seconds the ``Retry-After`` header asks for (delta-seconds or an HTTP date), or None.

    An HTTP date is measured from the response's own ``Date`` header when it has one, so a
    skewed local clock does not matter; a date in the past means 0. A malformed value is
    ignored (the ordinary backoff applies).
    """
    value = response.headers.get("retry-after")
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        wanted = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if wanted.tzinfo is None:
        wanted = wanted.replace(tzinfo=UTC)
    reference: datetime | None = None
    served = response.headers.get("date")
    if served is not None:
        try:
            reference = parsedate_to_datetime(served)
        except (TypeError, ValueError, IndexError):
            reference = None
        if reference is not None and reference.tzinfo is None:
            reference = reference.replace(tzinfo=UTC)
    if reference is None:
        reference = (now or _utcnow)()
    return max(0.0, (wanted - reference).total_seconds())


def _utcnow() -> datetime:
    return datetime.now(UTC)


def safe_url(url: httpx.URL) -> str:
    """``scheme://host[:port]/path``: no user, password or query string (which may hold keys)."""
    port = f":{url.port}" if url.port is not None else ""
    return f"{url.scheme}://{url.host}{port}{url.path}"


def host_name(url: httpx.URL) -> str:
    """``host`` or ``host:port`` when the port is explicit: what a breaker is named after."""
    return f"{url.host}:{url.port}" if url.port is not None else url.host


def name_target(error: BaseException) -> None:
    """Add the request's method and URL (without user, password or query) to a transport
    error's message, in place: its type and attributes stay, and the retry log line and the
    final error say which host failed."""
    try:
        request: httpx.Request = error.request  # type: ignore[attr-defined]
    except (AttributeError, RuntimeError):
        return
    message = str(error.args[0]) if error.args else type(error).__name__
    error.args = (f"{message} ({request.method} {safe_url(request.url)})", *error.args[1:])


def status_error(response: httpx.Response, wait: float | None) -> httpx.HTTPStatusError:
    """The ``HTTPStatusError`` for an error answer; the message names method, URL (without
    secrets) and status, and ``retry_after`` carries the server's ``Retry-After``."""
    request = response.request
    message = (
        f"HTTP {response.status_code} {response.reason_phrase} from "
        f"{request.method} {safe_url(request.url)}"
    )
    if wait is not None:
        message += f" (Retry-After: {wait:g}s)"
    error = httpx.HTTPStatusError(message, request=request, response=response)
    error.retry_after = wait  # type: ignore[attr-defined]  # read by taskkit.recovery.retry
    return error


class HostPolicy:
    """The breaker and retry budget of one host, shared by every client of this process that
    calls it with the same settings."""

    __slots__ = ("breaker", "budget")

    def __init__(self, breaker: CircuitBreaker, budget: Budget) -> None:
        self.breaker = breaker
        self.budget = budget


_registry: dict[tuple[Any, ...], HostPolicy] = {}
_registry_lock = threading.Lock()


def host_policy(
    host: str,
    *,
    failure_threshold: int,
    recovery_timeout: float,
    redis_url: str | None,
    redis_prefix: str,
    clock: Callable[[], float],
) -> HostPolicy:
    """The breaker ``http:<host>`` and its retry budget (in Redis when ``redis_url`` is given)."""
    key = (host, failure_threshold, recovery_timeout, redis_url, redis_prefix, clock)
    with _registry_lock:
        policy = _registry.get(key)
        if policy is not None:
            return policy
        name = f"http:{host}"
        storage = None
        budget: Budget
        if redis_url is not None:
            if not redis_url.startswith(("redis://", "rediss://", "unix://")):
                raise ConfigurationError(
                    f"redis_url must be a redis:// URL, got {mask_password(redis_url)!r}"
                )
            storage = RedisCircuitStorage(redis_url, prefix=f"{redis_prefix}circuit:")
            budget = RedisRetryBudget(redis_url, name, prefix=f"{redis_prefix}budget:")
        else:
            budget = RetryBudget(clock=clock)
        breaker = CircuitBreaker(
            failure_threshold=failure_threshold,
            recovery_timeout=recovery_timeout,
            expected_exception=COUNTED,
            name=name,
            storage=storage,
            clock=clock,
        )
        policy = _registry[key] = HostPolicy(breaker, budget)
        return policy


def breakers() -> list[CircuitBreaker]:
    """Every per-host breaker the clients of this process made, oldest first.

    Example::

        for breaker in breakers():
            print(breaker.name, breaker.state.value, breaker.failure_count)
    """
    with _registry_lock:
        return [policy.breaker for policy in _registry.values()]
