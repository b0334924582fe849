"""CircuitBreaker with local state: transitions on a fake clock, rules, listeners, threads."""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading

import pytest

from taskkit.errors import CircuitBreakerError, ConfigurationError
from taskkit.recovery import CircuitBreaker, CircuitState, events, retry


def failing(exc: BaseException | None = None):
    exc = exc or ConnectionError("down")

    def call():
        raise exc

    return call


def ok():
    return "ok"


def trip(breaker: CircuitBreaker, times: int) -> None:
    for _ in range(times):
        with pytest.raises(ConnectionError):
            breaker.call(failing())


def test_opens_after_the_threshold_of_consecutive_failures(clock):
    breaker = CircuitBreaker(failure_threshold=3, recovery_timeout=30, name="db", clock=clock)
    trip(breaker, 2)
    assert breaker.state is CircuitState.CLOSED
    assert breaker.failure_count == 2
    trip(breaker, 1)
    assert breaker.state is CircuitState.OPEN


def test_a_success_resets_the_failure_streak(clock):
    breaker = CircuitBreaker(failure_threshold=3, clock=clock)
    trip(breaker, 2)
    assert breaker.call(ok) == "ok"
    assert breaker.failure_count == 0
    trip(breaker, 2)
    assert breaker.state is CircuitState.CLOSED


def test_open_rejects_at_once_naming_the_breaker_and_the_seconds_left(clock):
    calls = []
    breaker = CircuitBreaker(failure_threshold=1, recovery_timeout=60, name="ml-api", clock=clock)
    trip(breaker, 1)
    clock.advance(15)
    with pytest.raises(CircuitBreakerError) as info:
        breaker.call(calls.append, 1)
    assert calls == []
    message = str(info.value)
    assert message.startswith("Circuit breaker is OPEN")
    assert "'ml-api'" in message
    assert "45.00s" in message
    assert info.value.retry_after == pytest.approx(45)
    assert info.value.name == "ml-api"
    assert breaker.remaining == pytest.approx(45)


def test_exceptions_outside_expected_pass_through_uncounted(clock):
    breaker = CircuitBreaker(failure_threshold=1, expected_exception=ConnectionError, clock=clock)
    for _ in range(5):
        with pytest.raises(KeyError):
            breaker.call(failing(KeyError("a bug, not an outage")))
    assert breaker.state is CircuitState.CLOSED
    assert breaker.failure_count == 0


def test_after_the_recovery_timeout_state_reads_half_open(clock):
    breaker = CircuitBreaker(failure_threshold=1, recovery_timeout=10, clock=clock)
    trip(breaker, 1)
    clock.advance(9.9)
    assert breaker.state is CircuitState.OPEN
    clock.advance(0.1)
    assert breaker.state is CircuitState.HALF_OPEN
    assert breaker.remaining == 0


def test_half_open_admits_one_probe_and_rejects_the_rest(clock):
    breaker = CircuitBreaker(failure_threshold=1, recovery_timeout=10, name="svc", clock=clock)
    trip(breaker, 1)
    clock.advance(10)
    rejected = []

    def probe():
        # while the probe runs, every other call is turned away
        with pytest.raises(CircuitBreakerError, match="Circuit breaker is HALF_OPEN") as info:
            breaker.call(ok)
        rejected.append(info.value)
        return "probed"

    assert breaker.call(probe) == "probed"
    assert len(rejected) == 1
    assert "1 probe call(s) in flight" in str(rejected[0])
    assert breaker.state is CircuitState.CLOSED


def test_success_threshold_probes_are_needed_to_close(clock):
    breaker = CircuitBreaker(
        failure_threshold=1, recovery_timeout=5, success_threshold=3, clock=clock
    )
    trip(breaker, 1)
    clock.advance(5)
    for expected in (CircuitState.HALF_OPEN, CircuitState.HALF_OPEN, CircuitState.CLOSED):
        breaker.call(ok)
        assert breaker.state is expected


def test_a_failed_probe_reopens_for_a_full_recovery_timeout(clock):
    breaker = CircuitBreaker(failure_threshold=1, recovery_timeout=20, clock=clock)
    trip(breaker, 1)
    clock.advance(20)
    trip(breaker, 1)  # the probe
    assert breaker.state is CircuitState.OPEN
    assert breaker.remaining == pytest.approx(20)


def test_half_open_max_calls_bounds_concurrent_probes(clock):
    breaker = CircuitBreaker(
        failure_threshold=1, recovery_timeout=1, half_open_max_calls=2, clock=clock
    )
    trip(breaker, 1)
    clock.advance(1)
    admitted = [breaker._backend.acquire(), breaker._backend.acquire()]
    assert all(a.probe for a in admitted)
    with pytest.raises(CircuitBreakerError, match="2 probe call"):
        breaker._backend.acquire()


def test_a_probe_that_never_reports_gives_its_slot_up_after_probe_timeout(clock):
    breaker = CircuitBreaker(failure_threshold=1, recovery_timeout=10, probe_timeout=3, clock=clock)
    trip(breaker, 1)
    clock.advance(10)
    breaker._backend.acquire()  # a probe whose caller hangs forever
    with pytest.raises(CircuitBreakerError):
        breaker.call(ok)
    clock.advance(3)
    assert breaker.call(ok) == "ok"
    assert breaker.state is CircuitState.CLOSED


def test_an_uncounted_exception_in_a_probe_frees_the_slot(clock):
    breaker = CircuitBreaker(
        failure_threshold=1, recovery_timeout=1, expected_exception=ConnectionError, clock=clock
    )
    trip(breaker, 1)
    clock.advance(1)
    with pytest.raises(KeyError):
        breaker.call(failing(KeyError()))
    assert breaker.state is CircuitState.HALF_OPEN
    assert breaker.call(ok) == "ok"
    assert breaker.state is CircuitState.CLOSED


def test_failure_rate_rule_opens_over_the_window(clock):
    breaker = CircuitBreaker(
        failure_threshold=1000,
        failure_rate_threshold=0.5,
        minimum_calls=10,
        window=60,
        clock=clock,
    )
    # alternate: never two failures in a row, but half of all calls fail
    for i in range(9):
        clock.advance(1)
        if i % 2:
            breaker.call(ok)
        else:
            trip(breaker, 1)
    assert breaker.state is CircuitState.CLOSED  # 9 calls: below minimum_calls
    clock.advance(1)
    breaker.call(ok)  # 10 calls, 5 failures
    assert breaker.state is CircuitState.CLOSED  # the rule is checked when a failure lands
    trip(breaker, 1)  # 11 calls, 6 failures: 55%
    assert breaker.state is CircuitState.OPEN


def test_failures_that_left_the_window_no_longer_count(clock):
    breaker = CircuitBreaker(
        failure_threshold=1000,
        failure_rate_threshold=0.5,
        minimum_calls=4,
        window=10,
        clock=clock,
    )
    trip(breaker, 3)
    clock.advance(20)  # those three are out of the window now
    for _ in range(3):
        breaker.call(ok)
    trip(breaker, 1)  # 4 calls in the window, 1 failure: 25%
    assert breaker.state is CircuitState.CLOSED


def test_slow_calls_count_as_failures_but_return_their_result(clock):
    breaker = CircuitBreaker(failure_threshold=2, slow_call_duration=1.0, clock=clock)

    def slow():
        clock.advance(1.5)
        return "late"

    assert breaker.call(slow) == "late"
    assert breaker.call(slow) == "late"
    assert breaker.state is CircuitState.OPEN


def test_listeners_hear_every_change_and_a_broken_one_is_isolated(clock, caplog):
    heard = []

    def broken(*args):
        raise RuntimeError("listener bug")

    breaker = CircuitBreaker(
        failure_threshold=1,
        recovery_timeout=5,
        name="svc",
        listeners=[broken],
        clock=clock,
    )
    breaker.add_listener(lambda b, old, new: heard.append((b.name, old, new)))
    with caplog.at_level(logging.ERROR, logger="taskkit.recovery"):
        trip(breaker, 1)
        clock.advance(5)
        breaker.call(ok)
    assert heard == [
        ("svc", CircuitState.CLOSED, CircuitState.OPEN),
        ("svc", CircuitState.OPEN, CircuitState.HALF_OPEN),
        ("svc", CircuitState.HALF_OPEN, CircuitState.CLOSED),
    ]
    # An alert notifier another test installed may report the opening too (taskkit.alerts).
    hooks = [r.getMessage() for r in caplog.records if r.name != "taskkit.alerts"]
    assert hooks == ["taskkit: hook 'broken' raised; ignored"] * 3


def test_state_changes_are_events(clock):
    seen = []
    unsubscribe = events.subscribe(seen.append)
    try:
        breaker = CircuitBreaker(failure_threshold=1, name="evt", clock=clock)
        trip(breaker, 1)
    finally:
        unsubscribe()
    assert seen == [events.CircuitStateChanged("evt", "closed", "open")]


def test_reset_closes_and_forgets(clock):
    breaker = CircuitBreaker(failure_threshold=1, clock=clock)
    trip(breaker, 1)
    breaker.reset()
    assert breaker.state is CircuitState.CLOSED
    assert breaker.call(ok) == "ok"


def test_decorator_keeps_identity_and_counts_like_call(clock):
    breaker = CircuitBreaker(failure_threshold=2, clock=clock)

    @breaker
    def predict(features: list[float], *, model: str = "default") -> float:
        """Predict."""
        raise ConnectionError

    assert predict.__name__ == "predict"
    assert predict.__doc__ == "Predict."
    assert inspect.getfullargspec(predict).args == ["features"]
    for _ in range(2):
        with pytest.raises(ConnectionError):
            predict([1.0])
    with pytest.raises(CircuitBreakerError):
        predict([1.0])


def test_async_functions_are_protected(clock):
    breaker = CircuitBreaker(failure_threshold=1, recovery_timeout=5, clock=clock)

    @breaker
    async def fetch(x: int) -> int:
        if x < 0:
            raise ConnectionError
        return x

    assert inspect.iscoroutinefunction(fetch)
    assert asyncio.run(fetch(3)) == 3
    with pytest.raises(ConnectionError):
        asyncio.run(fetch(-1))
    with pytest.raises(CircuitBreakerError):
        asyncio.run(fetch(3))
    clock.advance(5)
    assert asyncio.run(fetch(4)) == 4
    assert breaker.state is CircuitState.CLOSED


def test_retry_waits_out_an_open_breaker_instead_of_hammering_it(clock):
    breaker = CircuitBreaker(failure_threshold=1, recovery_timeout=10, clock=clock)
    trip(breaker, 1)
    calls = []

    @retry(max_attempts=2, delay=0.1, sleep=clock.sleep)
    @breaker
    def call():
        calls.append(1)
        return "ok"

    assert call() == "ok"
    assert clock.sleeps == [10.0]  # the breaker's retry_after, not the 0.1 s schedule
    assert calls == [1]


def test_the_lock_is_never_held_around_the_protected_call(clock):
    breaker = CircuitBreaker(failure_threshold=100, slow_call_duration=60, clock=clock)
    inside = threading.Barrier(2, timeout=5)

    def meet():
        inside.wait()  # both threads must be inside a protected call at the same time
        return "met"

    results = []
    threads = [
        threading.Thread(target=lambda: results.append(breaker.call(meet))) for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert results == ["met", "met"]


def test_concurrent_failures_are_all_counted(clock):
    breaker = CircuitBreaker(failure_threshold=10_000, clock=clock)
    start = threading.Barrier(8)

    def hammer():
        start.wait()
        for _ in range(500):
            with pytest.raises(ConnectionError):
                breaker.call(failing())

    threads = [threading.Thread(target=hammer) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert breaker.failure_count == 4000


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"failure_threshold": 0}, "failure_threshold must be an integer >= 1"),
        ({"recovery_timeout": 0}, "recovery_timeout must be a number of seconds > 0"),
        ({"expected_exception": "ValueError"}, "expected_exception must be an exception class"),
        ({"failure_rate_threshold": 1.5}, "failure_rate_threshold must be a share in"),
        ({"half_open_max_calls": 0}, "half_open_max_calls must be an integer >= 1"),
        ({"slow_call_duration": -1}, "slow_call_duration must be a number of seconds > 0"),
    ],
)
def test_bad_options_are_rejected_by_name(options, message):
    with pytest.raises(ConfigurationError, match=message):
        CircuitBreaker(**options)


def test_shared_storage_needs_a_name():
    class Storage:
        def bind(self, config, notify, clock):
            raise AssertionError("not reached")

    with pytest.raises(ConfigurationError, match="needs a name"):
        CircuitBreaker(storage=Storage())
