"""Retry budgets: cap retries to a share of calls, so a failing dependency gets no retry storm."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Protocol, runtime_checkable

from taskkit.errors import ConfigurationError

__all__ = ["Budget", "RetryBudget"]


@runtime_checkable
class Budget(Protocol):
    """What ``retry`` and ``batch_with_retry`` need from a budget."""

    def record_call(self) -> None:
        """Count one first attempt (a call); it earns a share of a retry."""

    def try_spend(self) -> bool:
        """Take one retry from the budget; False when there is none left."""


class RetryBudget:
    """A token bucket: every call deposits ``ratio`` tokens, every retry spends one.

    With ``ratio=0.2`` retries add at most 20% to the load on a dependency, however many callers
    fail at once. ``min_per_second`` tokens trickle in regardless, so a caller with little
    traffic can still retry; the bucket holds at most ``max_tokens`` (the allowed burst) and
    starts full. Shared by every thread that holds it; for a fleet of processes use
    ``RedisRetryBudget``.

    Decision: counting a call is a plain integer increment without a lock, so it costs nothing
    on the happy path; two threads incrementing at the same instant may lose one count, which
    only makes the budget slightly stricter.

    Example::

        budget = RetryBudget(ratio=0.1, min_per_second=1.0)

        @retry(max_attempts=4, delay=0.2, budget=budget)
        def fetch(url: str) -> bytes: ...
    """

    def __init__(
        self,
        ratio: float = 0.2,
        min_per_second: float = 1.0,
        max_tokens: float = 10.0,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        check_budget_options(ratio, min_per_second, max_tokens)
        self.ratio = ratio
        self.min_per_second = min_per_second
        self.max_tokens = max_tokens
        self._clock = clock
        self._lock = threading.Lock()
        self._tokens = float(max_tokens)
        self._calls = 0
        self._updated = clock()

    def record_call(self) -> None:
        self._calls += 1

    def record_calls(self, count: int) -> None:
        """Count ``count`` calls at once."""
        self._calls += count

    def try_spend(self) -> bool:
        with self._lock:
            self._refill()
            if self._tokens >= 1.0:
                self._tokens -= 1.0
                return True
            return False

    @property
    def available(self) -> float:
        """Tokens in the bucket now (whole retries that may run)."""
        with self._lock:
            self._refill()
            return self._tokens

    def _refill(self) -> None:
        now = self._clock()
        calls, self._calls = self._calls, 0
        earned = calls * self.ratio + max(0.0, now - self._updated) * self.min_per_second
        self._tokens = min(self.max_tokens, self._tokens + earned)
        self._updated = now


def check_budget_options(ratio: float, min_per_second: float, max_tokens: float) -> None:
    if not ratio >= 0:
        raise ConfigurationError(f"ratio must be >= 0 (retries per call), got {ratio!r}")
    if not min_per_second >= 0:
        raise ConfigurationError(f"min_per_second must be >= 0, got {min_per_second!r}")
    if not max_tokens >= 1:
        raise ConfigurationError(f"max_tokens must be >= 1, got {max_tokens!r}")
