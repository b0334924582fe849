"""``RedisCircuitStorage(max_staleness=...)`` on a real Redis: what a process may act on alone.

Each "process" here is its own ``RedisCircuitStorage`` with its own connection and its own
breaker clock (a ``FakeClock``), which is all a process has of its own: the cache of the shared
state lives in the breaker's backend. Freshness is this clock, so the bound is tested by moving
it, never by sleeping. Open and recovery times are Redis server time, which tests cannot fake:
the few waits for it are a recovery timeout of 0.05 s, the scale of the bound. The last test
runs real OS processes.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import redis

from taskkit.errors import CircuitBreakerError, CircuitStorageUnavailable, ConfigurationError
from taskkit.recovery import CircuitBreaker, CircuitState, RedisCircuitStorage
from tests.conftest import FakeClock

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

STALENESS = 0.05


def failing() -> None:
    raise ConnectionError("down")


def ok() -> str:
    return "ok"


def trip(breaker: CircuitBreaker, times: int) -> None:
    for _ in range(times):
        with pytest.raises(ConnectionError):
            breaker.call(failing)


class Process:
    """One process of the fleet: its own connection, storage, clock and breaker."""

    def __init__(self, url: str, prefix: str, name: str, **options: object) -> None:
        storage_options = {
            k: options.pop(k)
            for k in ("max_staleness", "on_unavailable", "retry_interval")
            if k in options
        }
        storage_options.setdefault("max_staleness", STALENESS)
        self.client = redis.Redis.from_url(url)
        self.storage = RedisCircuitStorage(self.client, prefix=prefix, **storage_options)
        self.clock = FakeClock()
        options.setdefault("failure_threshold", 3)
        options.setdefault("recovery_timeout", 30)
        options.setdefault("expected_exception", ConnectionError)
        self.breaker = CircuitBreaker(name=name, storage=self.storage, clock=self.clock, **options)
        self.ran = 0

    def call(self) -> str:
        def counted() -> str:
            self.ran += 1
            return "ok"

        return self.breaker.call(counted)

    def fail(self, times: int = 1) -> None:
        trip(self.breaker, times)

    def rejects(self) -> bool:
        """True when the breaker turns a call away without running it."""
        before = self.ran
        try:
            self.call()
        except CircuitBreakerError:
            assert self.ran == before
            return True
        return False

    @contextmanager
    def commands(self) -> Iterator[list[str]]:
        """The Redis commands this process sends inside the block."""
        sent: list[str] = []
        original = self.client.execute_command

        def counting(*args: object, **kwargs: object) -> object:
            sent.append(str(args[0]))
            return original(*args, **kwargs)

        self.client.execute_command = counting  # type: ignore[method-assign]
        try:
            yield sent
        finally:
            del self.client.execute_command

    def close(self) -> None:
        self.client.close()


@pytest.fixture
def fleet(redis_url, key_prefix, unique):
    made: list[Process] = []

    def make(**options: object) -> Process:
        process = Process(redis_url, key_prefix, unique, **options)
        made.append(process)
        return process

    yield make
    for process in made:
        process.close()


def shared_state(redis_client: redis.Redis, key_prefix: str, name: str) -> dict[str, str]:
    raw = redis_client.hgetall(f"{key_prefix}{{{name}}}")
    return {k.decode(): v.decode() for k, v in raw.items()}


def warm(*processes: Process) -> None:
    """Load every script on the server (the first use of a script costs a SCRIPT LOAD)."""
    for process in processes:
        process.call()
        process.fail()
        process.call()
        process.clock.advance(STALENESS)


# -- the healthy path ---------------------------------------------------------------------------


def test_the_default_asks_redis_once_per_max_staleness_on_the_healthy_path(fleet):
    process = fleet()
    assert process.storage.max_staleness == STALENESS  # the default
    warm(process)
    with process.commands() as sent:
        for _ in range(1_000):
            assert process.call() == "ok"
    assert sent == ["EVALSHA"]  # the first call asked; the next 999 acted on its answer
    process.clock.advance(STALENESS - 0.001)
    with process.commands() as sent:
        process.call()
    assert sent == []
    process.clock.advance(0.001)
    with process.commands() as sent:
        process.call()
        process.call()
    assert sent == ["EVALSHA"]  # max_staleness old: asked again
    assert process.ran == 2 + 1_000 + 1 + 2  # warm() ran two


def test_max_staleness_zero_is_one_round_trip_per_call(fleet):
    process = fleet(max_staleness=0)
    warm(process)
    with process.commands() as sent:
        for _ in range(10):
            process.call()
    assert sent == ["EVALSHA"] * 10


def test_bad_max_staleness():
    for bad in (-0.1, True, "50ms", float("nan")):
        with pytest.raises(ConfigurationError, match="max_staleness must be a number of seconds"):
            RedisCircuitStorage("redis://127.0.0.1:6379/0", max_staleness=bad)  # type: ignore[arg-type]


# -- the bound ----------------------------------------------------------------------------------


def test_a_breaker_opened_elsewhere_is_seen_within_max_staleness(fleet):
    opener, other = fleet(), fleet()
    warm(opener, other)
    assert other.call() == "ok"  # other now acts on "closed" for STALENESS
    opener.fail(3)
    assert opener.rejects()  # the process that opened it knows at once
    other.clock.advance(STALENESS - 0.001)
    assert other.call() == "ok"  # stale, inside the bound
    other.clock.advance(0.001)
    with other.commands() as sent:
        assert other.rejects()
        assert other.rejects()  # the rejection is cached too
    assert sent == ["EVALSHA"]
    with pytest.raises(CircuitBreakerError, match="OPEN") as caught:
        other.call()
    assert 29 < caught.value.retry_after <= 30


def test_the_exact_mode_sees_it_on_the_next_call(fleet):
    opener, other = fleet(max_staleness=0), fleet(max_staleness=0)
    warm(opener, other)
    assert other.call() == "ok"
    opener.fail(3)
    assert other.rejects()


def test_failures_are_reported_at_once_and_open_it_across_processes(
    fleet, redis_client, key_prefix, unique
):
    first, second, third = fleet(), fleet(), fleet()
    for process in (first, second, third):
        assert process.call() == "ok"
    with first.commands() as sent:
        first.fail()
    assert sent == ["EVALSHA"]  # admitted from the cache, the failure sent at once
    assert shared_state(redis_client, key_prefix, unique)["failures"] == "1"
    second.fail()
    third.fail()
    state = shared_state(redis_client, key_prefix, unique)
    assert state["state"] == "open"  # not bound-late: open on the third failure
    assert third.rejects()
    for process in (first, second):
        process.clock.advance(STALENESS)
        assert process.rejects()


def test_a_success_resets_the_fleet_streak_once_the_process_knows_of_it(
    fleet, redis_client, key_prefix, unique
):
    failer, other = fleet(), fleet()
    assert other.call() == "ok"  # other acts on "closed, no failures"
    failer.fail(2)
    assert other.call() == "ok"  # does not know of the streak yet: nothing to reset
    assert shared_state(redis_client, key_prefix, unique)["failures"] == "2"
    other.clock.advance(STALENESS)
    assert other.call() == "ok"  # asks, learns of the streak, resets it
    assert shared_state(redis_client, key_prefix, unique)["failures"] == "0"
    # the failing process's own next success always knows
    failer.fail(2)
    assert failer.call() == "ok"
    assert shared_state(redis_client, key_prefix, unique)["failures"] == "0"


def test_reading_the_state_refreshes_what_the_process_acts_on(fleet):
    first, second = fleet(), fleet()
    first.fail(3)
    assert first.rejects()
    second.breaker.reset()  # another process closes it
    assert first.rejects()  # first still acts on "open", for at most STALENESS
    assert first.breaker.state is CircuitState.CLOSED  # a read asks Redis, and is remembered
    assert first.call() == "ok"


def test_the_failure_rate_window_counts_calls_admitted_from_the_cache(fleet):
    process = fleet(failure_threshold=100, failure_rate_threshold=0.5, minimum_calls=4)
    process.call()  # asks Redis: counted at once
    process.fail()  # admitted from the cache: counted with the failure report
    process.call()  # from the cache: waits for the next report
    assert process.breaker.state is CircuitState.CLOSED
    process.fail()  # 4 calls (2 of them sent with this report), 2 failures: 50%
    assert process.breaker.state is CircuitState.OPEN


# -- half-open ----------------------------------------------------------------------------------


def test_one_probe_across_processes_and_no_other_call_while_half_open(fleet):
    recovery = 0.05
    # max_staleness above the recovery timeout is clamped to it: a process that saw the
    # breaker closed just before it opened must ask again before a probe can be admitted.
    opener, a, b = (fleet(recovery_timeout=recovery, max_staleness=10) for _ in range(3))
    warm(a, b)
    assert a.call() == "ok"
    assert b.call() == "ok"
    opener.fail(3)
    time.sleep(recovery + 0.01)  # Redis server time: the breaker may probe now
    for process in (a, b):
        process.clock.advance(recovery)
    probe = a.breaker._backend.acquire()  # a's call is the probe, still running
    assert probe.probe
    with b.commands() as sent:
        assert b.rejects()  # HALF_OPEN: the probe slot is taken
        assert b.rejects()  # cached: not asked again
    assert sent == ["EVALSHA"]
    assert a.rejects()  # a's other threads are turned away too
    assert opener.rejects()
    a.breaker._backend.on_success(probe)  # the probe succeeded: closed for everyone
    assert a.call() == "ok"  # the process whose probe closed it knows at once
    b.clock.advance(recovery)
    assert b.call() == "ok"


def test_a_failed_probe_reopens_it_for_everyone(fleet):
    recovery = 0.05
    a, b = fleet(recovery_timeout=recovery), fleet(recovery_timeout=recovery)
    a.fail(3)
    time.sleep(recovery + 0.01)
    a.clock.advance(recovery)
    with pytest.raises(ConnectionError):
        a.breaker.call(failing)  # the probe
    assert a.rejects()
    assert b.rejects()


# -- Redis unreachable --------------------------------------------------------------------------


def test_redis_down_is_noticed_within_max_staleness_then_local_state(private_redis, unique, caplog):
    process = Process(private_redis.url, "t:", unique, retry_interval=60)
    try:
        assert process.call() == "ok"
        private_redis.stop()
        with caplog.at_level(logging.WARNING, logger="taskkit.recovery"):
            assert process.call() == "ok"  # acting on "closed": Redis not asked
            assert not caplog.records
            process.clock.advance(STALENESS)
            for _ in range(5):
                assert process.call() == "ok"  # asked, failed: local state from now on
            process.fail(3)  # the local fallback is a real breaker
            assert process.rejects()
        warnings = [r.getMessage() for r in caplog.records if "Redis unreachable" in r.getMessage()]
        assert len(warnings) == 1
        assert "using local state" in warnings[0]
    finally:
        process.close()


def test_a_failure_notices_redis_down_at_once(private_redis, unique, caplog):
    process = Process(private_redis.url, "t:", unique, retry_interval=60)
    try:
        assert process.call() == "ok"
        private_redis.stop()
        with caplog.at_level(logging.WARNING, logger="taskkit.recovery"):
            process.fail()  # reported at once: the report fails, the local state counts it
        assert any("Redis unreachable" in r.getMessage() for r in caplog.records)
        process.fail(2)
        assert process.rejects()
    finally:
        process.close()


def test_redis_down_with_reject_fails_closed_after_max_staleness(private_redis, unique):
    process = Process(private_redis.url, "t:", unique, on_unavailable="reject", retry_interval=60)
    try:
        assert process.call() == "ok"
        private_redis.stop()
        assert process.call() == "ok"  # acting on "closed" for at most STALENESS
        process.clock.advance(STALENESS)
        with pytest.raises(CircuitStorageUnavailable, match="shared state in Redis is unreachable"):
            process.call()
        assert process.ran == 2
    finally:
        process.close()


def test_redis_back_after_an_outage(private_redis, unique):
    process = Process(private_redis.url, "t:", unique, retry_interval=0.01)
    try:
        process.call()
        private_redis.stop()
        process.clock.advance(STALENESS)
        assert process.call() == "ok"  # local
        private_redis.start()  # a fresh, empty server
        time.sleep(0.02)  # RedisLink's retry_interval runs on the real clock
        process.fail(3)
        state = redis.Redis.from_url(private_redis.url).hget(
            process.storage.keys(unique)[0], "state"
        )
        assert state == b"open"
    finally:
        process.close()


# -- a fleet of OS processes --------------------------------------------------------------------


def server_time(client: redis.Redis) -> float:
    seconds, micros = client.time()
    return seconds + micros / 1e6


@pytest.mark.parametrize("max_staleness", [STALENESS, 0.0], ids=["cached", "exact"])
@pytest.mark.parametrize("outcome", ["fail", "succeed"])
def test_a_fleet_of_processes_runs_exactly_one_probe(
    redis_url, redis_client, key_prefix, unique, outcome, max_staleness
):
    processes, recovery = 4, 1.0
    command = [
        sys.executable,
        "-m",
        "tests.recovery.circuit_fleet",
        *("--url", redis_url, "--prefix", key_prefix, "--name", unique),
        *("--recovery", str(recovery), "--max-staleness", str(max_staleness)),
        *("--call-seconds", "0.3", "--outcome", outcome),
    ]
    env = {**os.environ, "PYTHONPATH": ROOT}
    children = [
        subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(processes)
    ]
    try:
        for _ in range(processes):  # every process is up and has not called yet
            assert redis_client.blpop([f"{key_prefix}ready"], timeout=60) is not None
        opener = CircuitBreaker(
            failure_threshold=3,
            recovery_timeout=recovery,
            name=unique,
            storage=RedisCircuitStorage(redis_client, prefix=key_prefix),
        )
        trip(opener, 3)
        open_until = float(redis_client.hget(f"{key_prefix}{{{unique}}}", "open_until"))
        until = server_time(redis_client) + recovery + 1.2
        redis_client.rpush(f"{key_prefix}go", *[until] * processes)
        results = []
        for child in children:
            out, err = child.communicate(timeout=60)
            assert child.returncode == 0, err.decode()
            results.append(json.loads(out.decode().strip().splitlines()[-1]))
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
    assert all(r["rejections"] > 0 for r in results), results  # every process was turned away
    rows = [json.loads(r) for r in redis_client.lrange(f"{key_prefix}executions", 0, -1)]
    runs = sorted((s[0] + s[1] / 1e6, e[0] + e[1] / 1e6) for _, s, e in rows)
    assert runs, "the probe never ran"
    assert runs[0][0] >= open_until  # nothing ran while the breaker was open
    if outcome == "fail":
        assert len(runs) == 1  # one probe, failed: open again past the end of the test
    else:
        assert len(runs) > 1  # one probe ran alone; once it closed the breaker, traffic resumed
        assert all(start >= runs[0][1] for start, _ in runs[1:])
