"""``batch_with_retry``: run a function over many items, retrying each item on its own."""

from __future__ import annotations

import heapq
import logging
import random
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Generic, NamedTuple, TypeVar

from taskkit._utils import TEST_MODE, call_hook, check_int, is_control_flow, qualified_name
from taskkit.recovery._budget import Budget
from taskkit.recovery._circuit import CircuitBreaker
from taskkit.recovery._retry import ExceptionTypes, Retrying
from taskkit.recovery._schedule import RetryStrategy, seconds

__all__ = ["BatchResult", "batch_with_retry"]

T = TypeVar("T")
R = TypeVar("R")

logger = logging.getLogger("taskkit.recovery")


class BatchResult(NamedTuple, Generic[T, R]):
    """What ``batch_with_retry`` returns; unpacks as ``successful, failed``."""

    #: Results of the items that succeeded, in input order.
    successful: list[R]
    #: ``(item, exception)`` for each item that ran out of retries, in input order.
    failed: list[tuple[T, BaseException]]


class _Retry(NamedTuple):
    due: float
    position: int
    attempt: int
    wait: float


def batch_with_retry(
    items: Iterable[T],
    process_func: Callable[[T], R],
    batch_size: int = 100,
    max_retries: int = 2,
    *,
    delay: float = 1.0,
    backoff: float = 2.0,
    max_delay: float | None = None,
    jitter: bool | float = False,
    strategy: RetryStrategy | str = RetryStrategy.EXPONENTIAL,
    exceptions: ExceptionTypes = (Exception,),
    give_up_on: ExceptionTypes = (),
    on_progress: Callable[[int, int], object] | None = None,
    circuit: CircuitBreaker | None = None,
    budget: Budget | None = None,
    sleep: Callable[[float], object] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    rng: random.Random | None = None,
) -> BatchResult[T, R]:
    """Call ``process_func(item)`` for every item; retry each failing item on its own.

    Returns ``BatchResult(successful, failed)``, which unpacks as a pair: the results of the
    items that succeeded, in input order, and ``(item, exception)`` for the items that
    exhausted their retries, in input order. One bad item never stops the batch.

    ``max_retries`` counts retries after the first attempt, as in Celery: ``max_retries=2``
    means at most 3 attempts per item. Waits follow the same schedule and options as ``retry``
    (``delay``, ``backoff``, ``strategy``, ``max_delay``, ``jitter``, ``retry_after``);
    ``PermanentError`` and ``give_up_on`` fail an item at once.

    Decision: a failed item is not retried in place. It is scheduled for ``now + wait`` and the
    batch moves on; due retries run after each batch of ``batch_size`` items, and at the end the
    function sleeps only until the next retry is due. Each item still waits at least its
    schedule, but waits overlap with other work instead of adding up: 100 failing items among
    10,000 cost one schedule of waiting, not 100.

    Optional: ``on_progress(done, total)`` after each batch and each round of retries (``done``
    counts items that succeeded or failed for good); ``circuit``, a ``CircuitBreaker`` every
    call goes through (its rejections are failed attempts that wait the breaker's
    ``retry_after``); ``budget``, a ``RetryBudget`` (no token, no retry). ``sleep``, ``clock``
    and ``rng`` are injectable.

    Example::

        successful, failed = batch_with_retry(item_ids, process_item, batch_size=50,
                                              max_retries=2, delay=0.2)
        for item_id, error in failed:
            logger.error("item %s failed: %s", item_id, error)
    """
    check_int("batch_size", batch_size, 1)
    check_int("max_retries", max_retries, 0)
    policy = Retrying(
        max_attempts=max_retries + 1,
        delay=delay,
        backoff=backoff,
        max_delay=max_delay,
        jitter=jitter,
        strategy=strategy,
        exceptions=exceptions,
        give_up_on=give_up_on,
        rng=rng,
        _stacklevel=3,
    )
    run = _BatchRun(
        items if isinstance(items, Sequence) else list(items),
        process_func,
        policy,
        circuit,
        budget,
        on_progress,
        sleep,
        clock,
    )
    return run.execute(batch_size)


class _BatchRun(Generic[T, R]):
    def __init__(
        self,
        items: Sequence[T],
        process_func: Callable[[T], R],
        policy: Retrying,
        circuit: CircuitBreaker | None,
        budget: Budget | None,
        on_progress: Callable[[int, int], object] | None,
        sleep: Callable[[float], object],
        clock: Callable[[], float],
    ) -> None:
        self.items = items
        self.call: Callable[[T], R] = (
            process_func if circuit is None else _through(circuit, process_func)
        )
        self.name = qualified_name(process_func)
        self.policy = policy
        self.budget = budget
        self.on_progress = on_progress
        self.sleep = sleep
        self.clock = clock
        self.max_attempts = TEST_MODE.cap(policy.max_attempts)
        self.pending: list[_Retry] = []
        self.recovered: dict[int, R] = {}
        self.dead: dict[int, BaseException] = {}
        self.started = 0  # items whose first attempt has run

    def execute(self, batch_size: int) -> BatchResult[T, R]:
        items, call, budget = self.items, self.call, self.budget
        exceptions = self.policy.exceptions
        first_pass: list[R] = []
        append = first_pass.append
        first_failures: list[int] = []
        total = len(items)
        for start in range(0, total, batch_size):
            stop = min(start + batch_size, total)
            # The hot loop: one call, one append per item that succeeds.
            for index in range(start, stop):
                if budget is not None:
                    budget.record_call()
                try:
                    append(call(items[index]))
                except exceptions as exc:
                    first_failures.append(index)
                    self._schedule(index, 1, None, exc)
            self.started = stop
            self._run_due_retries()
            self._report()
        while self.pending:
            left = self.pending[0].due - self.clock()
            if left > 0:
                self.sleep(left)
            self._run_due_retries()
            self._report()
        if first_failures:
            logger.info(
                "taskkit.batch: %s: %d of %d item(s) needed retries, %d failed for good",
                self.name,
                len(first_failures),
                total,
                len(self.dead),
            )
        return BatchResult(self._merge(first_pass, first_failures), self._failed())

    def _schedule(
        self, index: int, attempt: int, previous: float | None, error: BaseException
    ) -> None:
        """After a failed attempt: queue the item's next attempt, or fail it for good."""
        policy = self.policy
        if is_control_flow(error):
            raise error  # a framework's signal (Celery's Retry...) ends the batch as it is
        if isinstance(error, policy.give_up_on) or attempt >= self.max_attempts:
            self._fail(index, attempt, error)
            return
        wait = policy.wait_before(attempt, previous)
        asked = seconds(getattr(error, "retry_after", None))
        if asked is not None:
            if asked > policy.max_delay:
                self._fail(index, attempt, error)
                return
            wait = max(wait, asked)
        if TEST_MODE.active:
            wait = 0.0
        if self.budget is not None and not self.budget.try_spend():
            self._fail(index, attempt, error)
            return
        heapq.heappush(self.pending, _Retry(self.clock() + wait, index, attempt, wait))

    def _run_due_retries(self) -> None:
        pending, now = self.pending, self.clock()
        exceptions = self.policy.exceptions
        while pending and pending[0].due <= now:
            retry = heapq.heappop(pending)
            try:
                self.recovered[retry.position] = self.call(self.items[retry.position])
            except exceptions as exc:
                self._schedule(retry.position, retry.attempt + 1, retry.wait, exc)

    def _fail(self, index: int, attempts: int, error: BaseException) -> None:
        error.add_note(f"taskkit.batch: item {index} failed after {attempts} attempt(s)")
        self.dead[index] = error

    def _report(self) -> None:
        if self.on_progress is not None:
            call_hook(self.on_progress, self.started - len(self.pending), len(self.items))

    def _merge(self, first_pass: list[R], first_failures: list[int]) -> list[R]:
        if not self.recovered:
            return first_pass
        # Put the recovered items back where they were in the input.
        merged: list[R] = []
        recovered, taken = self.recovered, 0
        failed_first = set(first_failures)
        for index in range(len(self.items)):
            if index in failed_first:
                if index in recovered:
                    merged.append(recovered[index])
            else:
                merged.append(first_pass[taken])
                taken += 1
        return merged

    def _failed(self) -> list[tuple[T, BaseException]]:
        return [(self.items[index], self.dead[index]) for index in sorted(self.dead)]


def _through(circuit: CircuitBreaker, fn: Callable[[T], R]) -> Callable[[T], R]:
    def call(item: T) -> R:
        return circuit.call(fn, item)

    return call
