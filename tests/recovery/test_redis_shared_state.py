"""Shared breaker state and retry budgets on a real Redis, across threads and OS processes.

Breaker timing here is Redis server time, which tests cannot fake; recovery timeouts are
fractions of a second and assertions compare server timestamps, not sleeps.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time

import pytest
import redis

from taskkit.errors import CircuitBreakerError, CircuitStorageUnavailable, ConfigurationError
from taskkit.recovery import (
    CircuitBreaker,
    CircuitState,
    RedisCircuitStorage,
    RedisRetryBudget,
    retry,
)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def failing():
    raise ConnectionError("down")


def ok():
    return "ok"


def trip(breaker: CircuitBreaker, times: int) -> None:
    for _ in range(times):
        with pytest.raises(ConnectionError):
            breaker.call(failing)


@pytest.fixture
def storage(redis_client, key_prefix) -> RedisCircuitStorage:
    # The exact mode (one round trip per call); test_redis_circuit_staleness.py tests the default.
    return RedisCircuitStorage(redis_client, prefix=key_prefix, max_staleness=0)


def shared(storage: RedisCircuitStorage, name: str, **options) -> CircuitBreaker:
    options.setdefault("failure_threshold", 3)
    options.setdefault("recovery_timeout", 30)
    return CircuitBreaker(name=name, storage=storage, **options)


def test_two_breakers_with_one_name_share_one_state(storage, unique):
    first, second = shared(storage, unique), shared(storage, unique)
    trip(first, 2)
    trip(second, 1)
    assert first.state is CircuitState.OPEN
    with pytest.raises(CircuitBreakerError, match=f"Circuit breaker is OPEN: '{unique}'"):
        second.call(ok)


def test_creating_a_breaker_never_resets_the_shared_state(storage, unique):
    trip(shared(storage, unique), 3)
    latecomer = shared(storage, unique)
    assert latecomer.state is CircuitState.OPEN
    assert 29 < latecomer.remaining <= 30


def test_keys_are_namespaced_by_name_and_hash_tagged(storage, unique, redis_client, key_prefix):
    trip(shared(storage, unique), 3)
    keys = {k.decode() for k in redis_client.scan_iter(match=key_prefix + "*")}
    assert f"{key_prefix}{{{unique}}}" in keys
    assert all(f"{{{unique}}}" in key for key in keys)
    other = shared(storage, unique + "-other")
    assert other.state is CircuitState.CLOSED


def test_one_round_trip_per_call_through_a_healthy_breaker(storage, unique, redis_client):
    breaker = shared(storage, unique)
    # The first use of each script on a server loads it (NOSCRIPT, SCRIPT LOAD): warm up.
    breaker.call(ok)
    trip(breaker, 1)
    breaker.call(ok)
    commands = []
    original = redis_client.execute_command

    def counting(*args, **kwargs):
        commands.append(args[0])
        return original(*args, **kwargs)

    redis_client.execute_command = counting  # type: ignore[method-assign]
    try:
        for _ in range(10):
            breaker.call(ok)
        assert len(commands) == 10
        commands.clear()
        trip(breaker, 1)
        assert len(commands) == 2  # admission + failure report
        commands.clear()
        breaker.call(ok)
        assert len(commands) == 2  # admission + reset of the failure streak
        commands.clear()
        breaker.call(ok)
        assert len(commands) == 1
    finally:
        del redis_client.execute_command


def test_half_open_probe_closes_the_shared_breaker(storage, unique):
    breaker = shared(storage, unique, recovery_timeout=0.2)
    listener_calls = []
    breaker.add_listener(lambda b, old, new: listener_calls.append((old, new)))
    trip(breaker, 3)
    time.sleep(0.25)
    assert breaker.state is CircuitState.HALF_OPEN
    assert breaker.call(ok) == "ok"
    assert breaker.state is CircuitState.CLOSED
    assert listener_calls == [
        (CircuitState.CLOSED, CircuitState.OPEN),
        (CircuitState.OPEN, CircuitState.HALF_OPEN),
        (CircuitState.HALF_OPEN, CircuitState.CLOSED),
    ]


def test_a_probe_that_never_reports_frees_its_slot_after_probe_timeout(storage, unique):
    breaker = shared(storage, unique, recovery_timeout=0.1, probe_timeout=0.3)
    trip(breaker, 3)
    time.sleep(0.15)
    breaker._backend.acquire()  # this prober crashes: it never reports
    with pytest.raises(CircuitBreakerError, match="HALF_OPEN"):
        breaker.call(ok)
    time.sleep(0.35)
    assert breaker.call(ok) == "ok"
    assert breaker.state is CircuitState.CLOSED


def test_failure_rate_rule_in_redis(storage, unique):
    breaker = shared(
        storage,
        unique,
        failure_threshold=100,
        failure_rate_threshold=0.5,
        minimum_calls=4,
        window=60,
    )
    breaker.call(ok)
    trip(breaker, 1)
    breaker.call(ok)
    assert breaker.state is CircuitState.CLOSED
    trip(breaker, 1)  # 4 calls, 2 failures, never two in a row
    assert breaker.state is CircuitState.OPEN


def test_reset_closes_the_breaker_for_everyone(storage, unique):
    first, second = shared(storage, unique), shared(storage, unique)
    trip(first, 3)
    second.reset()
    assert first.state is CircuitState.CLOSED
    assert first.call(ok) == "ok"


# -- Redis unreachable --------------------------------------------------------------------------


def test_unreachable_redis_falls_back_to_local_state_with_one_warning(caplog, unique):
    nobody = "redis://127.0.0.1:1/0"  # nothing listens on port 1
    breaker = CircuitBreaker(
        failure_threshold=3, name=unique, storage=RedisCircuitStorage(nobody, retry_interval=60)
    )
    with caplog.at_level(logging.WARNING, logger="taskkit.recovery"):
        for _ in range(5):
            assert breaker.call(ok) == "ok"
        trip(breaker, 3)
    # the local fallback is a real breaker: it opened
    with pytest.raises(CircuitBreakerError, match="OPEN"):
        breaker.call(ok)
    warnings = [r for r in caplog.records if "Redis unreachable" in r.getMessage()]
    assert len(warnings) == 1
    assert "using local state" in warnings[0].getMessage()


def test_unreachable_redis_can_fail_closed(unique):
    storage = RedisCircuitStorage("redis://127.0.0.1:1/0", on_unavailable="reject")
    breaker = CircuitBreaker(name=unique, storage=storage)
    calls = []
    with pytest.raises(CircuitStorageUnavailable, match="shared state in Redis is unreachable"):
        breaker.call(calls.append, 1)
    assert calls == []


def test_redis_going_away_and_coming_back(private_redis, unique, caplog):
    storage = RedisCircuitStorage(private_redis.url, retry_interval=0.2, max_staleness=0)
    breaker = CircuitBreaker(failure_threshold=2, recovery_timeout=60, name=unique, storage=storage)
    trip(breaker, 2)
    assert breaker.state is CircuitState.OPEN  # shared, in Redis
    private_redis.stop()
    with caplog.at_level(logging.INFO, logger="taskkit.recovery"):
        # local state knows nothing of the shared open state: calls flow again
        assert breaker.call(ok) == "ok"
        private_redis.start()  # a fresh, empty server
        time.sleep(0.25)
        assert breaker.call(ok) == "ok"
    messages = [r.getMessage() for r in caplog.records]
    assert any("Redis unreachable" in m for m in messages)
    assert any("Redis reachable again" in m for m in messages)
    # writes reach the new server again
    trip(breaker, 2)
    assert redis.Redis.from_url(private_redis.url).hget(storage.keys(unique)[0], "state") == b"open"


def test_bad_storage_arguments():
    with pytest.raises(ConfigurationError, match="on_unavailable must be 'local' or 'reject'"):
        RedisCircuitStorage("redis://127.0.0.1:6379/0", on_unavailable="ignore")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="expected a redis.Redis client or a redis:// URL"):
        RedisCircuitStorage(object())  # type: ignore[arg-type]


# -- a fleet of OS processes --------------------------------------------------------------------


def run_fleet(scenario: str, processes: int, **options) -> list[dict]:
    command = [sys.executable, "-m", "tests.recovery.fleet", scenario]
    for key, value in options.items():
        command += [f"--{key.replace('_', '-')}", str(value)]
    env = {**os.environ, "PYTHONPATH": ROOT}
    children = [
        subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(processes)
    ]
    results = []
    for child in children:
        out, err = child.communicate(timeout=60)
        assert child.returncode == 0, err.decode()
        results.append(json.loads(out.decode().strip().splitlines()[-1]))
    return results


def test_a_shared_budget_caps_retries_across_processes(redis_url, key_prefix, unique):
    results = run_fleet("budget", 4, url=redis_url, prefix=key_prefix, name=unique, calls=200)
    calls = sum(r["calls"] for r in results)
    retries = sum(r["attempts"] - r["calls"] for r in results)
    # 5 tokens to start with, plus 0.1 per call. Without the budget: 4 retries per call (3,200).
    assert retries <= 5 + 0.1 * calls
    assert retries >= 0.75 * (5 + 0.1 * calls)


def test_a_shared_budget_falls_back_to_local_when_redis_is_unreachable(unique, caplog):
    budget = RedisRetryBudget(
        "redis://127.0.0.1:1/0", unique, ratio=0.0, min_per_second=0.0, max_tokens=2
    )
    attempts = []

    @retry(max_attempts=10, delay=0, budget=budget)
    def always_fails():
        attempts.append(1)
        raise ConnectionError

    with (
        caplog.at_level(logging.WARNING, logger="taskkit.recovery"),
        pytest.raises(ConnectionError),
    ):
        always_fails()
    assert len(attempts) == 3
    assert sum("Redis unreachable" in r.getMessage() for r in caplog.records) == 1
