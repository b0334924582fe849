"""batch_with_retry: per-item retry, input order, overlapping waits, and its options."""

from __future__ import annotations

import pytest

from taskkit.errors import ConfigurationError, PermanentError
from taskkit.recovery import BatchResult, CircuitBreaker, RetryBudget, batch_with_retry
from taskkit.testing import no_waits


class Items:
    """A process function: item ``i`` fails ``failures[i]`` times (or forever with -1)."""

    def __init__(self, failures: dict[int, int] | None = None, error=ConnectionError):
        self.failures = dict(failures or {})
        self.error = error
        self.attempts: dict[int, int] = {}

    def __call__(self, item: int) -> int:
        self.attempts[item] = self.attempts.get(item, 0) + 1
        left = self.failures.get(item, 0)
        if left:
            self.failures[item] = left - 1
            raise self.error(f"item {item}")
        return item * 10


def test_returns_successes_in_input_order_and_failures_as_pairs(clock):
    process = Items({2: 1, 5: -1, 7: 2})
    result = batch_with_retry(
        list(range(10)), process, batch_size=3, max_retries=2, sleep=clock.sleep, clock=clock
    )
    successful, failed = result
    assert isinstance(result, BatchResult)
    assert successful == [0, 10, 20, 30, 40, 60, 70, 80, 90]
    assert [(item, str(error)) for item, error in failed] == [(5, "item 5")]
    assert isinstance(failed[0][1], ConnectionError)


def test_max_retries_counts_retries_after_the_first_attempt_as_in_celery(clock):
    process = Items({0: -1})
    batch_with_retry([0], process, max_retries=2, sleep=clock.sleep, clock=clock)
    assert process.attempts[0] == 3
    process = Items({0: -1})
    batch_with_retry([0], process, max_retries=0, sleep=clock.sleep, clock=clock)
    assert process.attempts[0] == 1


def test_waits_overlap_instead_of_adding_up(clock):
    # 100 items fail twice each. Retried in place, that would be 100 x (1 s + 2 s) of sleep;
    # scheduled, the batch waits one schedule in all.
    process = Items(dict.fromkeys(range(0, 1000, 10), 2))
    successful, failed = batch_with_retry(
        range(1000), process, batch_size=100, delay=1.0, backoff=2.0, sleep=clock.sleep, clock=clock
    )
    assert len(successful) == 1000
    assert failed == []
    assert sum(clock.sleeps) == pytest.approx(3.0)


def test_each_item_waits_at_least_its_schedule(clock):
    times: dict[int, list[float]] = {}

    def process(item):
        times.setdefault(item, []).append(clock())
        clock.advance(0.01)  # each attempt takes a little time
        if len(times[item]) < 3:
            raise OSError
        return item

    batch_with_retry(
        range(5), process, batch_size=2, delay=0.5, backoff=2.0, sleep=clock.sleep, clock=clock
    )
    for attempts in times.values():
        first, second, third = attempts
        assert second - first >= 0.5
        assert third - second >= 1.0


def test_permanent_errors_fail_the_item_at_once(clock):
    process = Items({1: -1}, error=PermanentError)
    _, failed = batch_with_retry([0, 1, 2], process, max_retries=5, sleep=clock.sleep, clock=clock)
    assert [item for item, _ in failed] == [1]
    assert process.attempts[1] == 1


def test_give_up_on_and_unlisted_exceptions(clock):
    process = Items({1: -1}, error=KeyError)
    _, failed = batch_with_retry(
        [0, 1], process, give_up_on=(KeyError,), sleep=clock.sleep, clock=clock
    )
    assert process.attempts[1] == 1
    assert len(failed) == 1
    with pytest.raises(KeyError):  # not in `exceptions`: a bug, so it is not swallowed
        batch_with_retry([0, 1], Items({1: -1}, error=KeyError), exceptions=(OSError,))


def test_progress_is_reported_per_batch_and_ends_at_the_total(clock):
    seen = []
    process = Items({3: 1})
    batch_with_retry(
        range(10),
        process,
        batch_size=4,
        delay=1,
        on_progress=lambda done, total: seen.append((done, total)),
        sleep=clock.sleep,
        clock=clock,
    )
    assert seen[0] == (3, 10)  # item 3 is waiting for its retry
    assert seen[-1] == (10, 10)
    assert [done for done, _ in seen] == sorted(done for done, _ in seen)


def test_a_budget_limits_retries_across_the_batch(clock):
    budget = RetryBudget(ratio=0.0, min_per_second=0.0, max_tokens=3, clock=clock)
    process = Items(dict.fromkeys(range(10), -1))
    _, failed = batch_with_retry(
        range(10), process, max_retries=5, budget=budget, sleep=clock.sleep, clock=clock
    )
    assert len(failed) == 10
    assert sum(process.attempts.values()) == 10 + 3


def test_an_open_circuit_makes_items_wait_its_recovery_timeout(clock):
    breaker = CircuitBreaker(failure_threshold=2, recovery_timeout=5, clock=clock)
    process = Items({0: 1, 1: 1})  # two failures open the breaker
    successful, failed = batch_with_retry(
        range(4),
        process,
        max_retries=3,
        delay=0.1,
        circuit=breaker,
        sleep=clock.sleep,
        clock=clock,
    )
    assert successful == [0, 10, 20, 30]
    assert failed == []
    assert sum(clock.sleeps) == pytest.approx(5.0)  # waited for the breaker, kept the retries
    assert process.attempts[2] == 1  # rejected calls never reached the function


def test_test_mode_removes_the_waits():
    process = Items({0: 2})

    def forbidden(seconds):
        raise AssertionError("no sleeping in test mode")

    with no_waits():
        successful, _ = batch_with_retry([0], process, delay=60, sleep=forbidden)
    assert successful == [0]


def test_any_iterable_is_accepted_and_empty_input_is_fine():
    assert batch_with_retry(iter([1, 2]), lambda x: x + 1) == ([2, 3], [])
    assert batch_with_retry([], lambda x: x) == ([], [])


def test_ten_thousand_items_with_always_and_once_failing_ones(clock):
    always = set(range(0, 10_000, 100))  # 1%
    once = set(range(7, 10_000, 20))  # 5%
    process = Items({**dict.fromkeys(once, 1), **dict.fromkeys(always, -1)})
    successful, failed = batch_with_retry(
        range(10_000), process, batch_size=500, sleep=clock.sleep, clock=clock
    )
    assert sorted(item for item, _ in failed) == sorted(always)
    assert len(successful) + len(failed) == 10_000
    assert successful == [i * 10 for i in range(10_000) if i not in always]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"batch_size": 0}, "batch_size must be an integer >= 1"),
        ({"max_retries": -1}, "max_retries must be an integer >= 0"),
        ({"delay": -1}, "delay must be a number of seconds >= 0"),
    ],
)
def test_bad_options_are_rejected(options, message):
    with pytest.raises(ConfigurationError, match=message):
        batch_with_retry([1], lambda x: x, **options)


def test_suspicious_settings_warn_at_the_callers_line():
    from taskkit.errors import TaskkitWarning

    with pytest.warns(TaskkitWarning, match="max_delay=0.1 is below delay=1") as record:
        batch_with_retry([1], lambda x: x, delay=1, max_delay=0.1)
    assert record[0].filename == __file__
