"""timeout: real interrupts in the main thread, nesting, helper threads, and async cancellation.

These tests measure real (short) durations: a timeout is about wall-clock time. The limits are
tens of milliseconds and every assertion leaves generous slack for a loaded CI machine.
"""

from __future__ import annotations

import asyncio
import inspect
import signal
import threading
import time

import pytest

from taskkit.errors import ConfigurationError, TaskkitError, TimeoutExceeded
from taskkit.recovery import retry, timeout


def test_a_blocking_sleep_in_the_main_thread_is_interrupted():
    @timeout(0.05)
    def stuck() -> None:
        time.sleep(5)

    started = time.monotonic()
    with pytest.raises(TimeoutExceeded) as info:
        stuck()
    assert time.monotonic() - started < 1.0
    assert isinstance(info.value, TimeoutError)
    assert isinstance(info.value, TaskkitError)
    assert "stuck timed out after 0.05s" in str(info.value)


def test_a_busy_loop_is_interrupted():
    @timeout(0.05)
    def spin() -> None:
        while True:
            pass

    with pytest.raises(TimeoutError):
        spin()


def assert_timer_restored(before: tuple[float, float]) -> None:
    """The timer that ran before (pytest-timeout's, under CI) runs on, and nothing else does."""
    after = signal.getitimer(signal.ITIMER_REAL)
    if before[0] == 0:
        assert after == (0.0, 0.0)
    else:
        assert before[0] - 3.0 < after[0] <= before[0]


def test_a_fast_call_returns_and_leaves_no_timer_behind():
    handler = signal.getsignal(signal.SIGALRM)
    timer = signal.getitimer(signal.ITIMER_REAL)

    @timeout(0.5)
    def quick(x: int) -> int:
        return x + 1

    assert quick(1) == 2
    assert_timer_restored(timer)
    assert signal.getsignal(signal.SIGALRM) is handler


def test_inner_timeout_fires_first_and_outer_timer_is_restored():
    @timeout(0.05)
    def inner() -> None:
        time.sleep(5)

    @timeout(2.0)
    def outer() -> str:
        with pytest.raises(TimeoutExceeded, match="inner"):
            inner()
        # the outer timer is running again, with what was left of its 2 s
        remaining, _ = signal.getitimer(signal.ITIMER_REAL)
        assert 1.0 < remaining <= 2.0
        return "outer finished"

    assert outer() == "outer finished"


def test_a_shorter_outer_timeout_still_fires_inside_a_longer_inner_one():
    @timeout(5.0)
    def inner() -> None:
        time.sleep(10)

    @timeout(0.1)
    def outer() -> None:
        inner()

    timer = signal.getitimer(signal.ITIMER_REAL)
    started = time.monotonic()
    with pytest.raises(TimeoutExceeded, match="outer timed out after 0.1s"):
        outer()
    assert time.monotonic() - started < 2.0
    assert_timer_restored(timer)


def test_a_previous_handler_and_timer_of_someone_else_are_restored():
    fired = []

    def theirs(signum, frame):
        fired.append(signum)

    previous = signal.signal(signal.SIGALRM, theirs)
    outer_timer = signal.getitimer(signal.ITIMER_REAL)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.3)

        @timeout(1.0)
        def quick() -> str:
            return "done"

        assert quick() == "done"
        assert signal.getsignal(signal.SIGALRM) is theirs
        remaining, _ = signal.getitimer(signal.ITIMER_REAL)
        assert 0 < remaining <= 0.3
        time.sleep(0.5)  # their timer still fires, into their handler
        assert fired == [signal.SIGALRM]
    finally:
        signal.signal(signal.SIGALRM, previous)
        signal.setitimer(signal.ITIMER_REAL, *outer_timer)


def test_off_the_main_thread_the_caller_stops_waiting():
    outcome = {}

    @timeout(0.05)
    def stuck() -> None:
        time.sleep(0.5)

    @timeout(1.0)
    def fine(x: int) -> int:
        return x * 2

    @timeout(1.0)
    def broken() -> None:
        raise KeyError("boom")

    def in_thread() -> None:
        started = time.monotonic()
        try:
            stuck()
        except TimeoutExceeded as exc:
            outcome["error"] = exc
        outcome["waited"] = time.monotonic() - started
        outcome["value"] = fine(21)
        try:
            broken()
        except KeyError as exc:
            outcome["raised"] = exc

    worker = threading.Thread(target=in_thread)
    worker.start()
    worker.join(5)
    assert isinstance(outcome["error"], TimeoutError)
    assert outcome["waited"] < 0.4  # did not wait for the 0.5 s call
    assert outcome["value"] == 42
    assert isinstance(outcome["raised"], KeyError)


def test_async_calls_are_cancelled():
    cancelled = []

    @timeout(0.05)
    async def stuck() -> None:
        try:
            await asyncio.sleep(5)
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    with pytest.raises(TimeoutExceeded, match="stuck timed out after 0.05s"):
        asyncio.run(stuck())
    assert cancelled == [True]


def test_timeout_covers_all_attempts_of_an_inner_retry():
    attempts = []

    @timeout(0.2)
    @retry(max_attempts=100, delay=0.05, backoff=1)
    def keeps_failing() -> None:
        attempts.append(1)
        raise ConnectionError

    with pytest.raises(TimeoutExceeded):
        keeps_failing()
    assert 2 <= len(attempts) < 100


def test_wrapper_keeps_the_signature():
    @timeout(1)
    def load(path: str, *, mode: str = "rb") -> bytes:
        """Load it."""
        return b""

    assert load.__name__ == "load"
    assert load.__doc__ == "Load it."
    assert inspect.getfullargspec(load).args == ["path"]


@pytest.mark.parametrize("seconds", [0, -1, float("nan"), "5", True])
def test_bad_seconds_are_rejected(seconds):
    with pytest.raises(
        ConfigurationError, match=r"timeout\(seconds=...\) must be a number of seconds > 0"
    ):
        timeout(seconds)
