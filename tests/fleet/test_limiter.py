"""The fleet limiters' Lua logic on real Redis, with a fake clock: exact admits, denials, waits."""

from __future__ import annotations

import uuid

import pytest
import redis

from taskkit.errors import ConfigurationError
from taskkit.recovery import FleetConcurrency, FleetRateLimit, parse_rate


class Clock:
    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def name() -> str:
    return f"test-{uuid.uuid4().hex[:8]}"


def test_parse_rate() -> None:
    assert parse_rate("600/m") == 10.0
    assert parse_rate("10/s") == 10.0
    assert parse_rate("7200/h") == 2.0
    assert parse_rate("10/5m") == pytest.approx(10 / 300)
    assert parse_rate(2.5) == 2.5
    for bad in ("10", "x/m", "0/m", "10/w", 0, -1):
        with pytest.raises(ConfigurationError):
            parse_rate(bad)  # type: ignore[arg-type]


def test_gcra_spaces_calls_and_names_the_wait(redis_url: str, name: str) -> None:
    clock = Clock()
    limit = FleetRateLimit(redis_url, name, "600/m", clock=clock)  # one every 0.1 s
    assert limit.acquire().allowed
    second = limit.acquire()
    assert not second.allowed
    assert second.wait == pytest.approx(0.1)
    clock.now += 0.04
    assert limit.acquire().wait == pytest.approx(0.06)
    clock.now += 0.06
    assert limit.acquire().allowed
    assert not limit.acquire().allowed
    # Over 10 simulated seconds, asking every millisecond: exactly 100 admitted.
    admitted = 0
    start = clock.now
    while clock.now < start + 10 - 1e-9:
        clock.now += 0.001
        admitted += limit.acquire().allowed
    assert admitted == 100


def test_gcra_burst_and_idle_do_not_bank_more(redis_url: str, name: str) -> None:
    clock = Clock()
    limit = FleetRateLimit(redis_url, name, "1/s", burst=3, clock=clock)
    assert [limit.acquire().allowed for _ in range(4)] == [True, True, True, False]
    clock.now += 3600  # a long quiet spell banks no more than the burst
    assert [limit.acquire().allowed for _ in range(4)] == [True, True, True, False]
    assert limit.acquire().wait == pytest.approx(1.0)


def test_gcra_keys_are_separate(redis_url: str, name: str) -> None:
    clock = Clock()
    limit = FleetRateLimit(redis_url, name, "1/s", clock=clock)
    assert limit.acquire("a").allowed
    assert limit.acquire("b").allowed
    assert not limit.acquire("a").allowed


def test_two_limiters_share_one_limit(redis_url: str, name: str) -> None:
    clock = Clock()
    one = FleetRateLimit(redis_url, name, "1/s", clock=clock)
    two = FleetRateLimit(redis.Redis.from_url(redis_url), name, "1/s", clock=clock)
    assert one.acquire().allowed
    assert not two.acquire().allowed


def test_concurrency_limit_and_expiry(redis_url: str, name: str) -> None:
    clock = Clock()
    limit = FleetConcurrency(redis_url, name, 2, ttl=10, clock=clock)
    first, _ = limit.acquire()
    second, _ = limit.acquire()
    assert first is not None
    assert second is not None
    denied, decision = limit.acquire()
    assert denied is None
    assert not decision.allowed
    assert decision.wait == pytest.approx(5.0)  # earliest expiry 10 s away, capped at max_wait
    clock.now += 8
    assert second.renew()  # second heartbeats; first (a dead holder) does not
    _, decision = limit.acquire()
    assert decision.wait == pytest.approx(2.0)
    clock.now += 2.001
    third, _ = limit.acquire()  # first's slot freed by expiry
    assert third is not None
    assert not first.renew()  # an expired holder is told so
    third.release()
    fourth, _ = limit.acquire()
    assert fourth is not None
    assert limit.holders() == 2


def test_unreachable_redis_fails_closed_or_open(name: str) -> None:
    dead = "redis://127.0.0.1:6419/0"  # nothing listens there
    closed = FleetRateLimit(dead, name, "1/s")
    decision = closed.acquire()
    assert not decision.allowed
    assert decision.unavailable
    assert decision.wait > 0
    open_ = FleetRateLimit(dead, name, "1/s", fail_open=True)
    assert open_.acquire().allowed
    slot, decision = FleetConcurrency(dead, name, 1).acquire()
    assert slot is None
    assert not decision.allowed
    assert decision.unavailable


def test_gcra_reservations_line_callers_up(redis_url: str, name: str) -> None:
    clock = Clock()
    limit = FleetRateLimit(redis_url, name, "10/s", clock=clock)
    assert limit.acquire(reserve=0.25).allowed
    first = limit.acquire(reserve=0.25)
    second = limit.acquire(reserve=0.25)
    assert (first.reserved, first.wait) == (True, pytest.approx(0.1))
    assert (second.reserved, second.wait) == (True, pytest.approx(0.2))
    third = limit.acquire(reserve=0.25)  # 0.3 s away: beyond the horizon, not booked
    assert not third.reserved
    assert not third.allowed
    assert third.wait == pytest.approx(0.3)
    clock.now += 0.3
    assert limit.acquire().allowed  # the booked slots are used; the next free one is at 0.3
