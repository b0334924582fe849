"""RetryBudget, the local token bucket (the Redis one is in test_redis_shared_state.py)."""

from __future__ import annotations

import pytest

from taskkit.errors import ConfigurationError
from taskkit.recovery import RetryBudget


def test_starts_full_and_spends_one_token_per_retry(clock):
    budget = RetryBudget(ratio=0.0, min_per_second=0.0, max_tokens=3, clock=clock)
    assert [budget.try_spend() for _ in range(4)] == [True, True, True, False]


def test_calls_earn_a_share_of_a_retry(clock):
    budget = RetryBudget(ratio=0.25, min_per_second=0.0, max_tokens=1, clock=clock)
    assert budget.try_spend()
    for _ in range(3):
        budget.record_call()
    assert not budget.try_spend()  # 0.75 tokens
    budget.record_call()
    assert budget.try_spend()  # 1.0


def test_tokens_trickle_in_over_time_up_to_the_cap(clock):
    budget = RetryBudget(ratio=0.0, min_per_second=2.0, max_tokens=5, clock=clock)
    for _ in range(5):
        assert budget.try_spend()
    assert not budget.try_spend()
    clock.advance(0.5)
    assert budget.try_spend()
    clock.advance(3600)
    assert budget.available == 5


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"ratio": -0.1}, "ratio must be >= 0"),
        ({"min_per_second": -1}, "min_per_second must be >= 0"),
        ({"max_tokens": 0.5}, "max_tokens must be >= 1"),
    ],
)
def test_bad_options(options, message):
    with pytest.raises(ConfigurationError, match=message):
        RetryBudget(**options)
