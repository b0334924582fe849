"""Checked by mypy (``make typecheck``), never run: the decorators keep the real signatures.

A ``# type: ignore[...]`` line is an assertion that mypy *does* report an error there: mypy runs
with ``warn_unused_ignores``, so if a decorator erased the signature the ignore would be unused
and the check would fail.
"""

from __future__ import annotations

import asyncio

from taskkit.recovery import (
    BatchResult,
    CircuitBreaker,
    RetryStrategy,
    batch_with_retry,
    delays,
    fallback,
    retry,
    safe_execute,
    timeout,
)

breaker = CircuitBreaker(failure_threshold=5, recovery_timeout=60, name="typing")


@timeout(seconds=5)
@retry(max_attempts=3, delay=0.5, strategy=RetryStrategy.FIBONACCI)
@breaker
def predict(features: list[float], *, model: str = "default") -> float:
    return sum(features)


@retry
def bare(x: int) -> str:
    return str(x)


@fallback(0.0)
@retry(max_attempts=2)
async def fetch(url: str) -> float:
    return 1.0


score: float = predict([1.0, 2.0], model="m")
text: str = bare(3)
predict("not a list")  # type: ignore[arg-type]
predict([1.0], mode="typo")  # type: ignore[call-arg]
bare()  # type: ignore[call-arg]
awaited: float = asyncio.run(fetch("http://x"))

through_breaker: int = breaker.call(len, "abc")
breaker.call(len, 3)  # type: ignore[arg-type]

maybe: int | None = safe_execute(int, "3", default=None)
result: BatchResult[int, str] = batch_with_retry([1, 2], bare, batch_size=10, max_retries=2)
ok, failed = result
first: str = ok[0]
item, error = failed[0]
number: int = item
waits: list[float] = delays(max_attempts=4)
