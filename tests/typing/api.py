"""Checked by mypy (``make typecheck``), never run: the decorators keep the real signatures.

A ``# type: ignore[...]`` line is an assertion that mypy *does* report an error there: mypy runs
with ``warn_unused_ignores``, so if a decorator erased the signature the ignore would be unused
and the check would fail.
"""

from __future__ import annotations

import asyncio

from sqlalchemy.orm import Session

from taskkit.db import atomic_update, db_retry, ensure_connection, safe_bulk_insert, with_savepoint
from taskkit.db.models import ModelRun, Prediction
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


@ensure_connection
@db_retry(max_attempts=3, delay=0.5)
def create_run(db: Session, name: str) -> int:
    return 1


@db_retry
@with_savepoint
async def rename(db: Session, run_id: int) -> None: ...


run_id: int = create_run(Session(), "baseline")
create_run(Session(), 3)  # type: ignore[arg-type]
create_run("not a session", "x")  # type: ignore[arg-type]
asyncio.run(rename(Session(), 1))
updated: bool = atomic_update(Session(), ModelRun, 1, {"usage_count": ModelRun.usage_count + 1})
saved, not_saved = safe_bulk_insert(Session(), Prediction, [{"model_run_id": 1}])
bad_record, reason = not_saved[0]
why: str = reason


# -- taskkit.tasks -------------------------------------------------------------------------------

from celery import Celery  # noqa: E402

from taskkit.tasks import ProgressReport, ResilientTask, create_app  # noqa: E402

tasks_app: Celery = create_app("typing")


class Scored(ResilientTask):
    inner_max_attempts = 5
    permanent_errors = (KeyError,)
    lease_key = "run_id"

    def run(self, run_id: int) -> float:
        report: ProgressReport = self.progress(1, 2, "half", loss=0.5)
        percent: float | None = report.percent
        return percent or 0.0


wait: float = Scored().outer_countdown(2)
Scored.inner_max_attempts = "five"  # type: ignore[assignment]
