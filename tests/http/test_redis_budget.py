"""The retry budget of ``ResilientClient`` shared through Redis (issue 16 audit).

With ``redis_url`` a host's budget is a ``RedisRetryBudget`` (``host_policy``), one bucket per
host for every process of the fleet: here two clients with clocks of their own (so neither
shares the other's in-process breaker or budget object: two processes, in effect) call a real
HTTP server on 127.0.0.1 that fails every request. Once one client has spent the bucket on
retries the other's failed call is not retried; the bucket refills as ``RetryBudget``
documents (``min_per_second`` tokens a second, ``ratio`` a call) and the refill is spent by
whichever client fails next.

No real waits: backoffs go through the clients' injected ``sleep``. ``RedisRetryBudget`` takes
no clock: its script refills by the Redis server's ``TIME``, and real time trickles tokens in
while the test runs (a loaded machine takes over half a second for the first client's eleven
requests), which would make the counts below a matter of luck. So the script's clock is the
one thing swapped: it reads the seconds from a Redis key of the test's own, which ``advance``
moves on; the rest (the host's budget made by ``host_policy``, the deposit of calls, the
spend, the bucket shared by key) runs as shipped.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
import redis

from taskkit.http import ResilientClient
from taskkit.recovery import RedisRetryBudget, _redis_budget
from tests.conftest import FakeClock
from tests.http.flaky_server import FlakyServer, Reply, flaky_server

#: RetryBudget's defaults, which the host's budget uses: a full bucket, a token a second, a
#: fifth of a token a call.
MAX_TOKENS, PER_SECOND, RATIO = 10, 1.0, 0.2
MAX_ATTEMPTS = 40


@pytest.fixture
def server() -> Iterator[FlakyServer]:
    with flaky_server() as running:
        running.default = Reply(500)  # the host fails every request until told otherwise
        yield running


def attempts(server: FlakyServer, client: ResilientClient, path: str) -> int:
    """Requests one failing ``client.get(path)`` made (the first attempt and its retries)."""
    before = len(server.calls(path))
    with pytest.raises(httpx.HTTPStatusError) as caught:
        client.get(path)
    made = len(server.calls(path)) - before
    assert caught.value.taskkit_attempts == made  # type: ignore[attr-defined]
    return made


#: The script's clock, and what replaces it: seconds from the key ``KEYS[1]:clock``.
SERVER_TIME = (
    "local t = redis.call('TIME')\nlocal now = tonumber(t[1]) + tonumber(t[2]) / 1000000\n"
)
TEST_TIME = "local now = tonumber(redis.call('GET', KEYS[1] .. ':clock'))\n"


@pytest.fixture
def budget_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """Budgets made from here on refill by the test's clock in Redis, not the server's."""
    script = _redis_budget._REFILL_AND_SPEND
    assert SERVER_TIME in script  # the script changed: this test must follow it
    monkeypatch.setattr(_redis_budget, "_REFILL_AND_SPEND", script.replace(SERVER_TIME, TEST_TIME))


def advance(redis_client: redis.Redis, key: str, seconds: float) -> None:
    """Move the bucket ``key``'s clock on by ``seconds``."""
    redis_client.incrbyfloat(f"{key}:clock", seconds)


def tokens(redis_client: redis.Redis, key: str) -> float:
    return float(redis_client.hget(key, "tokens"))


@pytest.mark.usefixtures("budget_clock")
def test_two_clients_share_one_retry_budget_in_redis(
    server: FlakyServer, redis_url: str, redis_client: redis.Redis, key_prefix: str
) -> None:
    one, other = FakeClock(), FakeClock()
    options = {
        "redis_url": redis_url,
        "redis_prefix": key_prefix,
        "max_attempts": MAX_ATTEMPTS,
        "failure_threshold": 1000,  # the breaker stays out of the way: budgets only
        "delay": 0.1,
    }
    a = ResilientClient(server.url, sleep=one.sleep, clock=one, **options)  # type: ignore[arg-type]
    b = ResilientClient(server.url, sleep=other.sleep, clock=other, **options)  # type: ignore[arg-type]
    key = f"{key_prefix}budget:{{http:127.0.0.1:{server.port}}}"
    redis_client.set(f"{key}:clock", 1_000_000.0)
    try:
        assert a.budget is not b.budget
        assert isinstance(a.budget, RedisRetryBudget)
        assert isinstance(b.budget, RedisRetryBudget)
        assert a.budget.key == b.budget.key == key

        # a's failing call retries on the shared bucket (full: MAX_TOKENS; its own call's
        # RATIO does not fit) until it is empty, long before its MAX_ATTEMPTS
        assert attempts(server, a, "/a") == 1 + MAX_TOKENS
        assert len(one.sleeps) == MAX_TOKENS
        assert redis_client.exists(key)
        assert 0 < redis_client.ttl(key) <= 86_400
        assert tokens(redis_client, key) == 0

        # b, another process with a budget object of its own, finds the bucket empty: its
        # failed call (RATIO: a fifth of a token) is not retried, nor slept on
        assert attempts(server, b, "/b") == 1
        assert other.sleeps == []
        assert tokens(redis_client, key) == pytest.approx(RATIO)

        # three seconds pass: PER_SECOND tokens a second come in; b's next failed call (3.4
        # tokens with its own) retries three times
        advance(redis_client, key, 3.0)
        assert attempts(server, b, "/b") == 1 + 3
        assert len(other.sleeps) == 3
        assert tokens(redis_client, key) == pytest.approx(0.4)

        # ... so a, next, gets none of that refill (0.6 tokens with its call)
        assert attempts(server, a, "/a") == 1
        assert len(one.sleeps) == MAX_TOKENS

        # calls refill it too (RATIO a call, deposited with the next retry): five calls that
        # succeed and one that fails bring 1.2 tokens: 1.8, one retry
        server.default = Reply(200)
        for _ in range(5):
            assert b.get("/ok") == {"ok": True}
        server.default = Reply(500)
        assert attempts(server, b, "/b") == 1 + 1
        assert tokens(redis_client, key) == pytest.approx(0.8)
    finally:
        a.close()
        b.close()
