"""retry: attempts, waits (recorded, never slept), what is and is not retried, and identity."""

from __future__ import annotations

import asyncio
import inspect
import logging
import random
from datetime import timedelta

import pytest

from taskkit.errors import ConfigurationError, PermanentError, RetryLater, TaskkitWarning
from taskkit.recovery import RetryBudget, RetryStrategy, events, retry
from taskkit.testing import no_waits


class Flaky:
    """Raises the given errors in turn, then returns ``result``."""

    def __init__(self, *errors: BaseException, result: object = "ok") -> None:
        self.errors = list(errors)
        self.calls = 0
        self.result = result

    def __call__(self, *args: object, **kwargs: object) -> object:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return self.result


def test_succeeds_after_transient_failures_with_the_scheduled_waits(clock):
    flaky = Flaky(ConnectionError("a"), ConnectionError("b"))
    wrapped = retry(max_attempts=3, delay=0.5, backoff=3.0, sleep=clock.sleep, clock=clock)(flaky)
    assert wrapped() == "ok"
    assert flaky.calls == 3
    assert clock.sleeps == [0.5, 1.5]


def test_the_last_exception_itself_propagates_with_the_attempt_count(clock):
    last = ConnectionError("third")
    flaky = Flaky(ConnectionError("first"), ConnectionError("second"), last)
    wrapped = retry(max_attempts=3, delay=0.1, sleep=clock.sleep)(flaky)
    with pytest.raises(ConnectionError) as info:
        wrapped()
    assert info.value is last
    assert info.value.taskkit_attempts == 3
    assert "gave up on" in info.value.__notes__[-1]
    assert "after 3 attempt(s)" in info.value.__notes__[-1]
    # The earlier attempts' errors are not chained onto the one that propagates.
    assert info.value.__context__ is None


def test_a_zero_delay_never_calls_sleep():
    def forbidden_sleep(seconds):
        raise AssertionError(f"slept {seconds}")

    flaky = Flaky(OSError(), OSError())
    assert retry(max_attempts=3, delay=0, sleep=forbidden_sleep)(flaky)() == "ok"


def test_only_listed_exceptions_are_retried(clock):
    flaky = Flaky(KeyError("not listed"))
    wrapped = retry(max_attempts=5, delay=1, exceptions=(OSError,), sleep=clock.sleep)(flaky)
    with pytest.raises(KeyError):
        wrapped()
    assert flaky.calls == 1
    assert clock.sleeps == []


def test_a_single_exception_class_is_accepted(clock):
    flaky = Flaky(OSError())
    assert retry(exceptions=OSError, sleep=clock.sleep)(flaky)() == "ok"


@pytest.mark.parametrize(
    "error", [PermanentError("bad input"), LookupError("declared permanent")], ids=type
)
def test_permanent_errors_are_never_retried(clock, error):
    flaky = Flaky(error)
    wrapped = retry(max_attempts=5, give_up_on=(LookupError,), sleep=clock.sleep)(flaky)
    with pytest.raises(type(error)) as info:
        wrapped()
    assert flaky.calls == 1
    assert info.value.taskkit_attempts == 1
    assert "is never retried" in info.value.__notes__[-1]


def test_retry_after_on_the_exception_sets_the_minimum_wait(clock):
    class RateLimited(Exception):
        retry_after = 7.5

    flaky = Flaky(RateLimited(), RetryLater("busy", retry_after=2), OSError())
    wrapped = retry(max_attempts=4, delay=1.0, backoff=2.0, sleep=clock.sleep)(flaky)
    assert wrapped() == "ok"
    # 7.5 > 1.0 (schedule); max(2.0, 2) = 2.0; the plain OSError waits the schedule's 4.0.
    assert clock.sleeps == [7.5, 2.0, 4.0]


def test_retry_after_may_be_a_timedelta(clock):
    error = ConnectionError()
    error.retry_after = timedelta(seconds=3)  # type: ignore[attr-defined]
    assert retry(delay=0.1, sleep=clock.sleep)(Flaky(error))() == "ok"
    assert clock.sleeps == [3.0]


def test_a_retry_after_beyond_max_delay_gives_up_instead_of_waiting(clock):
    flaky = Flaky(RetryLater("come back tomorrow", retry_after=86_400))
    wrapped = retry(max_attempts=5, max_delay=60, sleep=clock.sleep)(flaky)
    with pytest.raises(RetryLater) as info:
        wrapped()
    assert flaky.calls == 1
    assert clock.sleeps == []
    assert "exceeds max_delay=60s" in info.value.__notes__[-1]


def test_retry_on_result_retries_rejected_results_and_returns_the_last_one(clock):
    results = iter([None, None, "late", "never reached"])
    calls = []

    @retry(max_attempts=3, delay=0.2, retry_on_result=lambda r: r is None, sleep=clock.sleep)
    def poll():
        calls.append(1)
        return next(results)

    assert poll() == "late"
    assert len(calls) == 3

    always_none = retry(max_attempts=2, delay=0, retry_on_result=lambda r: r is None)(lambda: None)
    assert always_none() is None  # attempts ran out: the last result, since nothing was raised


def test_the_deadline_stops_retrying_before_a_wait_would_cross_it(clock):
    def slow_failure():
        clock.advance(4)  # each attempt takes 4 s of (fake) time
        raise TimeoutError

    wrapped = retry(
        max_attempts=10, delay=1, backoff=1, deadline=10, sleep=clock.sleep, clock=clock
    )(slow_failure)
    with pytest.raises(TimeoutError) as info:
        wrapped()
    # attempt 1 ends at 4 s, +1 s wait, attempt 2 ends at 9 s; another 1 s wait would end at 10 s
    # exactly (allowed), attempt 3 ends at 14 s: no more.
    assert clock.sleeps == [1, 1]
    assert "deadline would pass" in info.value.__notes__[-1]


def test_on_retry_hook_sees_each_failed_attempt(clock):
    seen = []
    flaky = Flaky(OSError("x"), OSError("y"))
    wrapped = retry(max_attempts=3, delay=1.0, on_retry=seen.append, sleep=clock.sleep)(flaky)
    wrapped()
    assert [(s.attempt, str(s.exception), s.wait, s.max_attempts) for s in seen] == [
        (1, "x", 1.0, 3),
        (2, "y", 2.0, 3),
    ]
    assert seen[0].fn is flaky


def test_a_failing_hook_is_logged_and_never_fails_the_call(clock, caplog):
    def broken_hook(state):
        raise RuntimeError("hook bug")

    wrapped = retry(on_retry=broken_hook, delay=0)(Flaky(OSError()))
    with caplog.at_level(logging.ERROR, logger="taskkit.recovery"):
        assert wrapped() == "ok"
    assert "hook 'broken_hook' raised; ignored" in caplog.text


def test_each_retry_is_logged_as_a_warning(caplog):
    wrapped = retry(delay=0)(Flaky(ConnectionError("reset by peer")))
    with caplog.at_level(logging.WARNING, logger="taskkit.recovery"):
        wrapped()
    assert "failed (attempt 1/3): ConnectionError: reset by peer; retrying in 0s" in caplog.text


def test_events_report_retries_and_give_ups():
    seen = []
    unsubscribe = events.subscribe(seen.append)
    try:
        with pytest.raises(OSError):
            retry(max_attempts=2, delay=0)(Flaky(OSError(), OSError()))()
    finally:
        unsubscribe()
    assert [type(e).__name__ for e in seen] == ["RetryScheduled", "GaveUp"]
    assert seen[1].attempts == 2
    assert seen[1].reason == "no attempts left"


def test_a_budget_caps_retries(clock):
    budget = RetryBudget(ratio=0.0, min_per_second=0.0, max_tokens=2, clock=clock)
    always = Flaky(*[OSError() for _ in range(100)])
    wrapped = retry(max_attempts=10, delay=0, budget=budget)(always)
    with pytest.raises(OSError) as info:
        wrapped()
    assert always.calls == 3  # the first attempt and the two retries the bucket held
    assert "retry budget is exhausted" in info.value.__notes__[-1]


def test_jitter_true_is_full_jitter(clock):
    flaky = Flaky(OSError(), OSError(), OSError())
    wrapped = retry(
        max_attempts=4, delay=1.0, jitter=True, rng=random.Random(1), sleep=clock.sleep
    )(flaky)
    wrapped()
    assert all(0 <= wait <= cap for wait, cap in zip(clock.sleeps, [1, 2, 4], strict=True))
    assert clock.sleeps != [1, 2, 4]


def test_policy_previews_its_delays():
    policy = retry(max_attempts=4, delay=0.5, strategy=RetryStrategy.LINEAR)
    assert policy.delays() == [0.5, 1.0, 1.5]


def test_seed_configuration_dicts_are_accepted_as_they_are(clock):
    external_api_retry_config = {
        "max_attempts": 3,
        "delay": 1.0,
        "backoff": 2.0,
        "jitter": True,
        "strategy": RetryStrategy.EXPONENTIAL,
    }
    file_retry_config = {"max_attempts": 2, "delay": 0.5, "exceptions": (IOError, OSError)}
    flaky = Flaky(OSError())
    assert retry(**external_api_retry_config, sleep=clock.sleep)(flaky)() == "ok"
    assert retry(**file_retry_config, sleep=clock.sleep)(Flaky(OSError()))() == "ok"


def test_bare_decorator_uses_the_defaults(monkeypatch):
    slept = []
    monkeypatch.setattr("time.sleep", slept.append)
    flaky = Flaky(OSError(), OSError())

    @retry
    def fetch():
        return flaky()

    assert fetch() == "ok"
    assert slept == [1.0, 2.0]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"exceptions": "OSError"}, "exceptions must be an exception class or a tuple"),
        ({"give_up_on": (ValueError, 3)}, "give_up_on must be an exception class or a tuple"),
        ({"deadline": 0}, "deadline must be > 0 seconds"),
        ({"budget": object()}, "budget must have record_call"),
        ({"on_retry": "print"}, "on_retry must be callable"),
        ({"strategy": "quadratic"}, "unknown retry strategy 'quadratic'"),
    ],
)
def test_bad_options_fail_when_the_decorator_is_built(options, message):
    with pytest.raises(ConfigurationError, match=message):
        retry(**options)


def test_unknown_option_names_are_rejected():
    with pytest.raises(TypeError, match="max_attempt"):
        retry(max_attempt=3)


def test_retrying_base_exceptions_warns():
    with pytest.warns(TaskkitWarning, match="swallow Ctrl-C"):
        retry(exceptions=(BaseException,))


# -- identity: name, docs, signature ------------------------------------------------------------


def test_wrapper_keeps_name_docstring_wrapped_and_signature():
    def fetch_model(model_id: int, *, version: str = "latest") -> dict:
        """Fetch a model."""
        return {}

    wrapped = retry(max_attempts=2)(fetch_model)
    assert wrapped.__name__ == "fetch_model"
    assert wrapped.__doc__ == "Fetch a model."
    assert wrapped.__wrapped__ is fetch_model
    assert inspect.signature(wrapped) == inspect.signature(fetch_model)
    # What Celery's argument check reads: it does not follow __wrapped__.
    assert inspect.getfullargspec(wrapped).args == ["model_id"]
    assert inspect.getfullargspec(wrapped).kwonlyargs == ["version"]


def test_methods_are_retried_with_self_bound(clock):
    class Client:
        def __init__(self):
            self.flaky = Flaky(OSError())

        @retry(max_attempts=2, delay=0.3, sleep=clock.sleep)
        def get(self, path: str) -> str:
            self.flaky()
            return f"got {path}"

    assert Client().get("/users") == "got /users"
    assert clock.sleeps == [0.3]


# -- async ----------------------------------------------------------------------------------------


def test_async_functions_are_retried_with_async_sleep():
    flaky = Flaky(ConnectionError(), ConnectionError())
    slept = []

    async def fake_sleep(seconds):
        slept.append(seconds)

    @retry(max_attempts=3, delay=0.25, sleep=fake_sleep)
    async def fetch(x: int) -> str:
        await asyncio.sleep(0)
        return f"{flaky()}-{x}"

    assert inspect.iscoroutinefunction(fetch)
    assert asyncio.run(fetch(1)) == "ok-1"
    assert slept == [0.25, 0.5]


def test_async_give_up_raises_the_last_exception():
    @retry(max_attempts=2, delay=0)
    async def broken():
        raise ConnectionError("down")

    with pytest.raises(ConnectionError, match="down") as info:
        asyncio.run(broken())
    assert info.value.taskkit_attempts == 2


def test_async_retry_on_result(clock):
    answers = iter([0, 0, 5])

    @retry(max_attempts=3, delay=0.1, retry_on_result=lambda r: r == 0, sleep=clock.sleep)
    async def count():
        return next(answers)

    assert asyncio.run(count()) == 5
    assert clock.sleeps == [0.1, 0.2]


# -- taskkit.testing ------------------------------------------------------------------------------


def test_test_mode_turns_waits_off_and_caps_attempts():
    def forbidden_sleep(seconds):
        raise AssertionError("test mode must not sleep")

    always = Flaky(*[OSError() for _ in range(10)])
    wrapped = retry(max_attempts=10, delay=30, sleep=forbidden_sleep)(always)
    with no_waits(max_attempts=2), pytest.raises(OSError):
        wrapped()
    assert always.calls == 2


def test_the_fixture_turns_waits_off(taskkit_no_waits):
    flaky = Flaky(OSError(), OSError())
    assert retry(max_attempts=3, delay=3600)(flaky)() == "ok"


def test_suspicious_settings_warn_at_the_line_that_wrote_them():
    with pytest.warns(TaskkitWarning, match="backoff=0.5 is below 1") as record:
        retry(backoff=0.5)
    assert record[0].filename == __file__
    with pytest.warns(TaskkitWarning, match="swallow Ctrl-C") as record:
        retry(exceptions=BaseException)
    assert record[0].filename == __file__
