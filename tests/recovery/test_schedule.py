"""The wait schedule as a pure function: exact values, and properties checked by hypothesis."""

from __future__ import annotations

import random
import warnings

import pytest
from hypothesis import given
from hypothesis import strategies as st

from taskkit.errors import ConfigurationError, TaskkitWarning
from taskkit.recovery import RetryStrategy, delays


@pytest.mark.parametrize(
    ("strategy", "expected"),
    [
        (RetryStrategy.FIXED, [0.5, 0.5, 0.5, 0.5, 0.5]),
        (RetryStrategy.LINEAR, [0.5, 1.0, 1.5, 2.0, 2.5]),
        (RetryStrategy.EXPONENTIAL, [0.5, 1.0, 2.0, 4.0, 8.0]),
        (RetryStrategy.FIBONACCI, [0.5, 0.5, 1.0, 1.5, 2.5]),
    ],
)
def test_each_strategy_follows_its_formula(strategy, expected):
    assert delays(strategy, max_attempts=6, delay=0.5, backoff=2.0) == expected


def test_strategy_names_are_accepted_as_strings():
    assert delays("linear", max_attempts=3, delay=1.0) == [1.0, 2.0]


def test_cap_applies_to_every_wait():
    assert delays(max_attempts=8, delay=1.0, backoff=3.0, max_delay=10.0) == [
        1.0,
        3.0,
        9.0,
        10.0,
        10.0,
        10.0,
        10.0,
    ]


def test_default_cap_is_sixty_seconds():
    assert max(delays(max_attempts=20, delay=1.0, backoff=2.0)) == 60.0


def test_huge_exponents_do_not_overflow():
    waits = delays(max_attempts=3000, delay=1.0, backoff=10.0, max_delay=5.0)
    assert waits[-1] == 5.0


def test_one_attempt_has_no_waits():
    assert delays(max_attempts=1) == []


def test_full_jitter_is_reproducible_with_a_seeded_rng():
    first = delays(max_attempts=5, jitter=True, rng=random.Random(7))
    again = delays(max_attempts=5, jitter=True, rng=random.Random(7))
    assert first == again
    assert first != delays(max_attempts=5)  # it did randomise


def test_decorrelated_jitter_starts_at_delay_and_grows_at_most_threefold():
    rng = random.Random(3)
    waits = delays(RetryStrategy.DECORRELATED, max_attempts=50, delay=0.1, max_delay=30, rng=rng)
    previous = 0.1
    for wait in waits:
        assert 0.1 <= wait <= min(30.0, previous * 3)
        previous = wait


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"max_attempts": 0}, "max_attempts must be an integer >= 1"),
        ({"max_attempts": 2.5}, "max_attempts must be an integer >= 1"),
        ({"delay": -1}, "delay must be a number of seconds >= 0"),
        ({"delay": float("nan")}, "delay must be a number of seconds >= 0"),
        ({"backoff": 0}, "backoff must be a number > 0"),
        ({"max_delay": -5}, "max_delay must be a number of seconds >= 0"),
        ({"jitter": 1.5}, "jitter must be True, False or a share between 0 and 1"),
        ({"jitter": "yes"}, "jitter must be True, False or a share between 0 and 1"),
    ],
)
def test_impossible_options_are_rejected_by_name(options, message):
    with pytest.raises(ConfigurationError, match=message):
        delays(**options)


def test_unknown_strategy_is_rejected():
    with pytest.raises(ConfigurationError, match="unknown retry strategy 'quadratic'; expected"):
        delays("quadratic")


def test_suspicious_options_warn_at_the_callers_line():
    with pytest.warns(TaskkitWarning, match="backoff=0.5 is below 1") as record:
        delays(max_attempts=3, backoff=0.5)
    assert record[0].filename == __file__
    with pytest.warns(TaskkitWarning, match="max_delay=0.1 is below delay=1.0"):
        delays(max_attempts=3, delay=1.0, max_delay=0.1)


settings = st.fixed_dictionaries(
    {
        "strategy": st.sampled_from(list(RetryStrategy)),
        "max_attempts": st.integers(1, 40),
        "delay": st.floats(0, 100, allow_nan=False),
        "backoff": st.floats(1, 10, allow_nan=False),
        "max_delay": st.floats(0, 1000, allow_nan=False),
        "jitter": st.one_of(st.booleans(), st.floats(0, 1, allow_nan=False)),
        "seed": st.integers(0, 2**32),
    }
)


def quiet_delays(**options):
    with warnings.catch_warnings():  # a cap below the delay warns; here it is on purpose
        warnings.simplefilter("ignore", TaskkitWarning)
        return delays(**options)


@given(settings)
def test_waits_are_never_negative_nor_above_the_cap(options):
    seed = options.pop("seed")
    waits = quiet_delays(rng=random.Random(seed), **options)
    assert len(waits) == options["max_attempts"] - 1
    assert all(0 <= w <= options["max_delay"] for w in waits)


@given(settings)
def test_jitter_stays_within_its_share_of_the_unjittered_wait(options):
    seed = options.pop("seed")
    if options["strategy"] is RetryStrategy.DECORRELATED:
        options["strategy"] = RetryStrategy.EXPONENTIAL
    exact = quiet_delays(**{**options, "jitter": False})
    jittered = quiet_delays(rng=random.Random(seed), **options)
    share = 1.0 if options["jitter"] is True else float(options["jitter"])
    for wait, base in zip(jittered, exact, strict=True):
        assert base * (1 - share) - 1e-9 <= wait <= base + 1e-9


@given(settings)
def test_unjittered_waits_never_shrink(options):
    options.pop("seed")
    if options["strategy"] is RetryStrategy.DECORRELATED:
        return
    waits = quiet_delays(**{**options, "jitter": False})
    assert waits == sorted(waits)
