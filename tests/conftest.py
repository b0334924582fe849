"""Shared fixtures: real services, fake time.

Tests that need Redis take the ``redis_url`` fixture. When Redis is unreachable they fail, with
the command that starts it; a laptop without Redis can set ``TASKKIT_REQUIRE_SERVICES=0`` to
skip them instead. CI never sets it.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
import redis

REDIS_URL = os.environ.get("TASKKIT_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


def _service_missing(what: str, how: str) -> None:
    message = f"{what} is not reachable; start it with: {how}"
    if os.environ.get("TASKKIT_REQUIRE_SERVICES", "1") == "0":
        pytest.skip(message + " (skipped: TASKKIT_REQUIRE_SERVICES=0)")
    pytest.fail(message + " (set TASKKIT_REQUIRE_SERVICES=0 to skip instead)", pytrace=False)


@pytest.fixture(scope="session")
def redis_url() -> str:
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1)
    try:
        client.ping()
    except redis.exceptions.ConnectionError:
        _service_missing(
            f"Redis at {REDIS_URL}",
            'redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no',
        )
    finally:
        client.close()
    return REDIS_URL


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def unique() -> str:
    """A name no other test (or test run) uses: for breaker names and key prefixes."""
    return f"t-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def key_prefix(redis_client: redis.Redis, unique: str) -> Iterator[str]:
    """A Redis key prefix for one test; its keys are deleted afterwards."""
    prefix = f"taskkit-test:{unique}:"
    yield prefix
    keys = list(redis_client.scan_iter(match=prefix + "*"))
    if keys:
        redis_client.delete(*keys)


class FakeClock:
    """A clock that only moves when told to; ``sleep`` records the wait and moves it."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()
