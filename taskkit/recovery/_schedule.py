"""Wait schedules as pure functions: what ``retry`` sleeps between attempts.

Nothing here sleeps or reads a clock; randomness comes from an injectable ``random.Random``,
so a schedule can be printed, tested and property-checked without running anything.
"""

from __future__ import annotations

import math
import random
import warnings
from datetime import timedelta
from enum import StrEnum
from typing import TypeGuard

from taskkit._utils import check_int
from taskkit.errors import ConfigurationError, TaskkitWarning

__all__ = ["RetryStrategy", "delays", "next_wait"]

#: Cap on a single wait when ``max_delay`` is not given.
DEFAULT_MAX_DELAY = 60.0

#: Multiplier of decorrelated jitter: ``wait = uniform(delay, previous * 3)``, as in the AWS
#: Architecture Blog's "Exponential Backoff And Jitter".
DECORRELATED_GROWTH = 3.0


class RetryStrategy(StrEnum):
    """How the wait grows from one retry to the next (``n`` is the retry number, from 1).

    ========================  =============================================
    ``FIXED``                 ``delay``
    ``LINEAR``                ``delay * n``
    ``EXPONENTIAL``           ``delay * backoff ** (n - 1)``
    ``FIBONACCI``             ``delay * fib(n)``: 1, 1, 2, 3, 5, 8, ...
    ``DECORRELATED``          ``uniform(delay, previous * 3)``: decorrelated jitter
    ========================  =============================================

    Every wait is then capped at ``max_delay``, and jitter (if any) is applied to the capped
    value, so a jittered wait never exceeds the cap.
    """

    FIXED = "fixed"
    LINEAR = "linear"
    EXPONENTIAL = "exponential"
    FIBONACCI = "fibonacci"
    DECORRELATED = "decorrelated"


def _fibonacci_multiple(delay: float, n: int, cap: float) -> float:
    # Iterate only until the cap is passed: fib(n) overflows floats for large n.
    a, b = 1, 1
    for _ in range(n - 1):
        a, b = b, a + b
        if delay * a > cap:
            return cap
    return delay * a


def _base_wait(strategy: RetryStrategy, n: int, delay: float, backoff: float, cap: float) -> float:
    if strategy is RetryStrategy.FIXED:
        raw = delay
    elif strategy is RetryStrategy.LINEAR:
        raw = delay * n
    elif strategy is RetryStrategy.EXPONENTIAL:
        try:
            raw = delay * backoff ** (n - 1)
        except OverflowError:
            raw = math.inf
    elif strategy is RetryStrategy.FIBONACCI:
        raw = _fibonacci_multiple(delay, n, cap)
    else:  # pragma: no cover - DECORRELATED is handled by the caller
        raise AssertionError(strategy)
    return min(raw, cap)


def next_wait(
    strategy: RetryStrategy,
    retry_number: int,
    *,
    delay: float,
    backoff: float,
    max_delay: float,
    jitter: float,
    previous: float | None,
    rng: random.Random | None = None,
) -> float:
    """The wait before retry number ``retry_number`` (1 for the first retry).

    ``jitter`` is the share of the wait that is randomised: 0 waits exactly, 1 is full jitter
    (``uniform(0, wait)``), 0.5 waits between half and all of it. ``previous`` is the wait
    before the previous retry; only ``DECORRELATED`` uses it.

    >>> next_wait(RetryStrategy.EXPONENTIAL, 3, delay=1.0, backoff=2.0, max_delay=60.0,
    ...           jitter=0.0, previous=None)
    4.0
    """
    rand = rng or random
    if strategy is RetryStrategy.DECORRELATED:
        low = min(delay, max_delay)
        high = min(max((previous or delay) * DECORRELATED_GROWTH, low), max_delay)
        return rand.uniform(low, high)
    wait = _base_wait(strategy, retry_number, delay, backoff, max_delay)
    if jitter:
        return wait - rand.uniform(0.0, wait * jitter)
    return wait


def delays(
    strategy: RetryStrategy | str = RetryStrategy.EXPONENTIAL,
    *,
    max_attempts: int = 3,
    delay: float = 1.0,
    backoff: float = 2.0,
    max_delay: float | None = None,
    jitter: bool | float = False,
    rng: random.Random | None = None,
) -> list[float]:
    """The waits between ``max_attempts`` attempts (so ``max_attempts - 1`` of them).

    The same arguments as ``retry`` and the same rules, as a pure function: use it to print a
    schedule, to check a configuration, or in a test.

    >>> delays(RetryStrategy.EXPONENTIAL, max_attempts=5, delay=0.5, backoff=2.0)
    [0.5, 1.0, 2.0, 4.0]
    >>> delays(RetryStrategy.FIBONACCI, max_attempts=6, delay=1.0, max_delay=4.0)
    [1.0, 1.0, 2.0, 3.0, 4.0]
    """
    chosen = parse_strategy(strategy)
    cap, share = validate_schedule(
        max_attempts=max_attempts, delay=delay, backoff=backoff, max_delay=max_delay, jitter=jitter
    )
    return schedule(chosen, max_attempts - 1, delay, backoff, cap, share, rng)


def schedule(
    strategy: RetryStrategy,
    count: int,
    delay: float,
    backoff: float,
    cap: float,
    jitter: float,
    rng: random.Random | None = None,
) -> list[float]:
    """The first ``count`` waits, from options that are already validated."""
    waits: list[float] = []
    previous: float | None = None
    for n in range(1, count + 1):
        previous = next_wait(
            strategy,
            n,
            delay=delay,
            backoff=backoff,
            max_delay=cap,
            jitter=jitter,
            previous=previous,
            rng=rng,
        )
        waits.append(previous)
    return waits


def parse_strategy(strategy: RetryStrategy | str) -> RetryStrategy:
    """A ``RetryStrategy`` from itself or its value (``"exponential"``)."""
    try:
        return RetryStrategy(strategy)
    except ValueError:
        names = ", ".join(s.name for s in RetryStrategy)
        raise ConfigurationError(
            f"unknown retry strategy {strategy!r}; expected one of {names}"
        ) from None


def validate_schedule(
    *,
    max_attempts: int,
    delay: float,
    backoff: float,
    max_delay: float | None,
    jitter: bool | float,
    stacklevel: int = 3,
) -> tuple[float, float]:
    """Check schedule options; return ``(cap, jitter share)``. Raise on the impossible, warn
    on the suspicious, naming the option."""
    check_int("max_attempts", max_attempts, 1)
    if not _is_number(delay) or delay < 0 or math.isnan(delay):
        raise ConfigurationError(f"delay must be a number of seconds >= 0, got {delay!r}")
    if not _is_number(backoff) or backoff <= 0 or math.isnan(backoff):
        raise ConfigurationError(f"backoff must be a number > 0, got {backoff!r}")
    cap = DEFAULT_MAX_DELAY if max_delay is None else max_delay
    if not _is_number(cap) or cap < 0 or math.isnan(cap):
        raise ConfigurationError(f"max_delay must be a number of seconds >= 0, got {max_delay!r}")
    if isinstance(jitter, bool):
        share = 1.0 if jitter else 0.0
    elif _is_number(jitter) and 0.0 <= jitter <= 1.0:
        share = float(jitter)
    else:
        raise ConfigurationError(
            f"jitter must be True, False or a share between 0 and 1, got {jitter!r}"
        )
    if backoff < 1:
        warnings.warn(
            f"backoff={backoff!r} is below 1: exponential waits will shrink, not grow",
            TaskkitWarning,
            stacklevel=stacklevel,
        )
    if max_delay is not None and max_delay < delay:
        warnings.warn(
            f"max_delay={max_delay!r} is below delay={delay!r}: every wait is capped at max_delay",
            TaskkitWarning,
            stacklevel=stacklevel,
        )
    return float(cap), share


def seconds(value: object) -> float | None:
    """A ``retry_after`` value in seconds: a number or a ``timedelta``; None when unusable."""
    if value is None:  # the common case: the exception asked for nothing
        return None
    if isinstance(value, timedelta):
        return max(0.0, value.total_seconds())
    if _is_number(value) and not math.isnan(value):
        return max(0.0, float(value))
    return None


def _is_number(value: object) -> TypeGuard[float]:
    return isinstance(value, int | float) and not isinstance(value, bool)
