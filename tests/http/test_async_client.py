"""``taskkit.http.AsyncResilientClient`` against the same failing server, through the async
retry path (the injected sleep records the waits; ``asyncio.run`` drives each test)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import pytest

from taskkit.errors import CircuitBreakerError
from taskkit.http import AsyncResilientClient
from taskkit.recovery import CircuitState
from tests.conftest import FakeClock
from tests.http.flaky_server import FlakyServer, Reply, flaky_server, refused_url


@pytest.fixture
def server() -> Iterator[FlakyServer]:
    with flaky_server() as running:
        yield running


def make(url: str, clock: FakeClock, **options: object) -> AsyncResilientClient:
    options.setdefault("delay", 0.1)
    return AsyncResilientClient(url, sleep=clock.sleep, clock=clock, **options)  # type: ignore[arg-type]


def test_get_is_retried_honouring_retry_after(server, clock):
    server.fail(Reply(503, headers={"Retry-After": "5"}), Reply(500))

    async def scenario():
        async with make(server.url, clock) as client:
            return await client.get("/users")

    assert asyncio.run(scenario()) == {"ok": True}
    assert len(server.calls("/users")) == 3
    assert clock.sleeps[0] == 5.0
    assert len(clock.sleeps) == 2


def test_an_awaitable_sleep_is_awaited(server):
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)

    server.fail(Reply(503, headers={"Retry-After": "2"}))

    async def scenario():
        async with AsyncResilientClient(server.url, sleep=sleep, clock=FakeClock()) as client:
            return await client.get("/x")

    assert asyncio.run(scenario()) == {"ok": True}
    assert waits == [2.0]


def test_post_is_not_retried_by_default(server, clock):
    server.fail(Reply(500))

    async def scenario():
        async with make(server.url, clock) as client:
            await client.post("/predict", {"features": [1.0]})

    with pytest.raises(httpx.HTTPStatusError):
        asyncio.run(scenario())
    assert len(server.calls("/predict")) == 1


def test_connection_refused_is_retried(clock):
    async def scenario():
        async with make(refused_url(), clock) as client:
            await client.get("/x")

    with pytest.raises(httpx.ConnectError):
        asyncio.run(scenario())
    assert len(clock.sleeps) == 2


def test_the_breaker_opens_rejects_without_calling_and_probe_closes_it(server, clock):
    server.fail(Reply(500), Reply(500))

    async def scenario():
        async with make(server.url, clock, failure_threshold=2, max_attempts=1) as client:
            for _ in range(2):
                with pytest.raises(httpx.HTTPStatusError):
                    await client.get("/data")
            assert client.breaker.state is CircuitState.OPEN
            with pytest.raises(CircuitBreakerError):
                await client.get("/data")
            assert len(server.calls("/data")) == 2
            server.health = 500
            assert await client.probe() is False
            server.health = 200
            assert await client.probe() is True
            assert client.breaker.state is CircuitState.CLOSED
            return await client.request("GET", "/data")

    response = asyncio.run(scenario())
    assert response.status_code == 200
    assert len(server.calls("/data")) == 3
