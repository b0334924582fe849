"""A framework's control flow passes through every primitive untouched."""

from __future__ import annotations

import pytest
from billiard.exceptions import SoftTimeLimitExceeded
from celery.exceptions import Ignore, Reject, Retry

from taskkit.recovery import (
    CircuitBreaker,
    CircuitState,
    batch_with_retry,
    fallback,
    retry,
    safe_execute,
)

SIGNALS = [Retry("retrying in 60s"), Ignore(), Reject("bad message"), SoftTimeLimitExceeded()]


@pytest.mark.parametrize("signal", SIGNALS, ids=lambda e: type(e).__name__)
def test_retry_never_reruns_a_function_that_raised_a_control_flow_signal(signal):
    calls = []

    @retry(max_attempts=5, delay=0)
    def task():
        calls.append(1)
        raise signal

    with pytest.raises(type(signal)):
        task()
    assert calls == [1]


@pytest.mark.parametrize("signal", SIGNALS, ids=lambda e: type(e).__name__)
def test_a_breaker_does_not_count_control_flow_as_failure(signal, clock):
    breaker = CircuitBreaker(failure_threshold=1, clock=clock)
    slow_breaker = CircuitBreaker(failure_threshold=1, slow_call_duration=10, clock=clock)
    for b in (breaker, slow_breaker):  # the lock-free path and the guarded one
        with pytest.raises(type(signal)):
            b.call(lambda: (_ for _ in ()).throw(signal))
        assert b.state is CircuitState.CLOSED


@pytest.mark.parametrize("signal", SIGNALS, ids=lambda e: type(e).__name__)
def test_fallback_and_safe_execute_let_control_flow_through(signal):
    def raises():
        raise signal

    with pytest.raises(type(signal)):
        fallback("value")(raises)()
    with pytest.raises(type(signal)):
        safe_execute(raises, default="value")


def test_batch_with_retry_lets_control_flow_end_the_batch():
    def process(item):
        if item == 2:
            raise Retry("the task asked to be retried")
        return item

    with pytest.raises(Retry):
        batch_with_retry([1, 2, 3], process, delay=0)
