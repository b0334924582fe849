"""``taskkit.http.ResilientClient`` against a real HTTP server on 127.0.0.1 that fails on
command. Waits go through an injected sleep that records them: nothing sleeps through a
backoff. The only real waits are the slow answers of the timeout tests (a fraction of a second).
"""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import Iterator

import httpx
import pytest

from taskkit.errors import CircuitBreakerError, ConfigurationError
from taskkit.http import ResilientClient, breakers
from taskkit.recovery import CircuitState, RetryBudget
from tests.conftest import FakeClock
from tests.http.flaky_server import FlakyServer, Reply, flaky_server, refused_url


@pytest.fixture
def server() -> Iterator[FlakyServer]:
    with flaky_server() as running:
        yield running


def make(url: str, clock: FakeClock, **options: object) -> ResilientClient:
    """A client whose waits are recorded in ``clock.sleeps`` and whose breaker runs on
    ``clock`` (a fresh clock also means a breaker no other test shares)."""
    options.setdefault("delay", 0.1)
    return ResilientClient(url, sleep=clock.sleep, clock=clock, **options)  # type: ignore[arg-type]


# -- retries ------------------------------------------------------------------------------------


def test_get_is_retried_after_5xx_and_returns_the_json(server, clock):
    server.fail(Reply(500), Reply(502))
    server.default = Reply(200, {"users": [1, 2]})
    with make(server.url, clock) as client:
        assert client.get("/users") == {"users": [1, 2]}
    assert [s.method for s in server.calls("/users")] == ["GET"] * 3
    assert len(clock.sleeps) == 2
    assert all(0 <= wait <= 0.1 * 2**i for i, wait in enumerate(clock.sleeps))


def test_exhausted_retries_raise_the_last_http_error(server, clock):
    server.fail(Reply(503), Reply(500), Reply(502))
    with make(server.url, clock) as client, pytest.raises(httpx.HTTPStatusError) as caught:
        client.get("/data")
    assert caught.value.response.status_code == 502
    assert caught.value.taskkit_attempts == 3
    assert "HTTP 502 Bad Gateway from GET http://127.0.0.1" in str(caught.value)
    assert len(server.calls("/data")) == 3


def test_post_is_not_retried_by_default(server, clock):
    server.fail(Reply(500))
    with make(server.url, clock) as client, pytest.raises(httpx.HTTPStatusError):
        client.post("/predict", {"features": [1.0]})
    assert len(server.calls("/predict")) == 1
    assert clock.sleeps == []


def test_post_with_an_idempotency_key_is_retried(server, clock):
    server.fail(Reply(503))
    server.default = Reply(200, {"prediction": 0.5})
    with make(server.url, clock) as client:
        answer = client.post("/predict", {"features": [1.0]}, headers={"Idempotency-Key": "k-1"})
    assert answer == {"prediction": 0.5}
    calls = server.calls("/predict")
    assert [c.headers["idempotency-key"] for c in calls] == ["k-1", "k-1"]


def test_post_is_retried_when_retry_methods_include_it(server, clock):
    server.fail(Reply(500))
    with make(server.url, clock, retry_methods={"GET", "POST"}) as client:
        assert client.post("/jobs", {"a": 1}) == {"ok": True}
    assert len(server.calls("/jobs")) == 2


def test_a_client_error_is_neither_retried_nor_counted_by_the_breaker(server, clock):
    server.fail(Reply(404, {"detail": "no such user"}))
    with make(server.url, clock, failure_threshold=1) as client:
        with pytest.raises(httpx.HTTPStatusError) as caught:
            client.get("/users/9")
        assert caught.value.response.status_code == 404
        assert client.breaker.state is CircuitState.CLOSED
    assert len(server.calls()) == 1
    assert clock.sleeps == []


def test_429_is_retried(server, clock):
    server.fail(Reply(429))
    with make(server.url, clock) as client:
        assert client.get("/limited") == {"ok": True}
    assert len(server.calls("/limited")) == 2


def test_retry_after_in_seconds_is_honoured(server, clock):
    server.fail(Reply(503, headers={"Retry-After": "7"}), Reply(429, headers={"Retry-After": "3"}))
    with make(server.url, clock) as client:
        assert client.get("/busy") == {"ok": True}
    assert clock.sleeps == [7.0, 3.0]


def test_retry_after_as_an_http_date_is_measured_from_the_answers_date(server, clock):
    server.fail(
        Reply(
            503,
            headers={"Retry-After": "Wed, 21 Oct 2015 07:28:04 GMT"},
            date="Wed, 21 Oct 2015 07:28:00 GMT",
        )
    )
    with make(server.url, clock) as client:
        assert client.get("/busy") == {"ok": True}
    assert clock.sleeps == [4.0]


def test_a_retry_after_beyond_max_delay_gives_up_at_once_and_says_when(server, clock):
    server.fail(Reply(503, headers={"Retry-After": "120"}))
    with make(server.url, clock, max_delay=30.0) as client:
        with pytest.raises(httpx.HTTPStatusError) as caught:
            client.get("/busy")
    assert caught.value.retry_after == 120.0
    assert "Retry-After: 120s" in str(caught.value)
    assert len(server.calls("/busy")) == 1
    assert clock.sleeps == []


def test_a_read_timeout_is_retried(server, clock):
    server.fail(Reply(200, {"late": True}, delay=3.0))
    server.default = Reply(200, {"late": False})
    # generous attempts: on a loaded machine a fast answer may miss the timeout too
    with make(server.url, clock, timeout=0.5, max_attempts=5) as client:
        assert client.get("/slow") == {"late": False}
    assert len(server.calls("/slow")) >= 2


def test_connection_refused_is_retried_then_raises_connect_error(clock):
    url = refused_url()
    with make(url, clock) as client, pytest.raises(httpx.ConnectError) as caught:
        client.get("/x")
    assert len(clock.sleeps) == 2
    assert f"(GET {url}/x)" in str(caught.value)


def test_a_post_that_never_left_is_retried(clock):
    """A refused connection proves the server saw nothing: retrying a POST is safe."""
    with make(refused_url(), clock) as client, pytest.raises(httpx.ConnectError):
        client.post("/predict", {"features": [1.0]})
    assert len(clock.sleeps) == 2


def test_the_retry_budget_caps_retries(server, clock):
    server.fail(Reply(500), Reply(500), Reply(500))
    budget = RetryBudget(ratio=0.0, min_per_second=0.0, max_tokens=1, clock=clock)
    with make(server.url, clock, budget=budget) as client, pytest.raises(httpx.HTTPStatusError):
        client.get("/data")
    assert len(server.calls("/data")) == 2  # one retry, then the budget is empty


# -- the breaker --------------------------------------------------------------------------------


def test_the_breaker_opens_after_the_threshold_and_rejects_without_calling(server, clock):
    server.fail(*[Reply(500)] * 2)
    with make(server.url, clock, failure_threshold=2, max_attempts=1) as client:
        assert client.breaker.name == f"http:127.0.0.1:{server.port}"
        for _ in range(2):
            with pytest.raises(httpx.HTTPStatusError):
                client.get("/data")
        assert client.breaker.state is CircuitState.OPEN
        with pytest.raises(CircuitBreakerError, match="Circuit breaker is OPEN"):
            client.get("/data")
        assert len(server.calls("/data")) == 2
        # use_circuit=False bypasses it, as the seed's client does
        assert client.get("/data", use_circuit=False) == {"ok": True}
    assert len(server.calls("/data")) == 3


def test_a_call_that_fails_after_its_retries_is_one_breaker_failure(server, clock):
    server.fail(*[Reply(503)] * 3)
    with make(server.url, clock, failure_threshold=2) as client:
        with pytest.raises(httpx.HTTPStatusError):
            client.get("/data")
        assert client.breaker.failure_count == 1
        assert client.breaker.state is CircuitState.CLOSED


def test_probe_closes_an_open_breaker_once_the_server_is_healthy(server, clock):
    server.fail(Reply(500))
    with make(server.url, clock, failure_threshold=1, max_attempts=1) as client:
        with pytest.raises(httpx.HTTPStatusError):
            client.get("/data")
        assert client.breaker.state is CircuitState.OPEN
        server.health = 503
        assert client.probe() is False
        assert client.breaker.state is CircuitState.OPEN
        server.health = 200
        assert client.probe("/health") is True
        assert client.breaker.state is CircuitState.CLOSED  # long before recovery_timeout
        assert client.get("/data") == {"ok": True}


def test_probe_of_an_unreachable_host_is_false(clock):
    with make(refused_url(), clock) as client:
        assert client.probe() is False


def test_clients_of_one_host_share_its_breaker_and_breakers_lists_it(server, clock):
    first = make(server.url, clock)
    second = make(server.url + "/v2", clock)
    try:
        assert first.breaker is second.breaker
        assert first.breaker in breakers()
    finally:
        first.close()
        second.close()


def test_the_breaker_is_shared_through_redis(server, redis_url, redis_client, key_prefix):
    """Two clients with breakers of their own (two processes, in effect) share one state."""
    server.fail(*[Reply(500)] * 2)
    one, other = FakeClock(), FakeClock()
    options = {"redis_url": redis_url, "redis_prefix": key_prefix, "failure_threshold": 2}
    a = make(server.url, one, max_attempts=1, **options)
    b = make(server.url, other, max_attempts=1, **options)
    try:
        assert a.breaker is not b.breaker
        for _ in range(2):
            with pytest.raises(httpx.HTTPStatusError):
                a.get("/data")
        assert b.breaker.state is CircuitState.OPEN
        with pytest.raises(CircuitBreakerError):
            b.get("/data")
        assert len(server.calls("/data")) == 2
        keys = {k.decode() for k in redis_client.scan_iter(match=key_prefix + "*")}
        assert f"{key_prefix}circuit:{{http:127.0.0.1:{server.port}}}" in keys
        assert b.probe() is True  # b's probe closes it for a too
        assert a.breaker.state is CircuitState.CLOSED
        assert a.get("/data") == {"ok": True}
    finally:
        a.close()
        b.close()


# -- secrets and bad input ----------------------------------------------------------------------


def test_errors_and_logs_never_show_credentials(server, clock, caplog):
    caplog.set_level(logging.DEBUG)
    server.fail(Reply(500), Reply(500), Reply(500))
    url = server.url.replace("http://", "http://ops:url-s3cret@")
    headers = {"Authorization": "Bearer tok-s3cret"}
    with make(url, clock, headers=headers) as client:
        with pytest.raises(httpx.HTTPStatusError) as caught:
            client.get("/data", params={"api_key": "query-s3cret"})
        shown = [str(caught.value), *caught.value.__notes__, repr(client)]
    assert server.calls("/data")[0].headers["authorization"] == "Bearer tok-s3cret"
    with make(refused_url().replace("http://", "http://ops:url-s3cret@"), clock) as client:
        with pytest.raises(httpx.ConnectError) as refused:
            client.get("/data")
        shown += [str(refused.value), *refused.value.__notes__]
    shown += [r.getMessage() for r in caplog.records if r.name.startswith("taskkit")]
    assert not [text for text in shown if "s3cret" in text]
    # httpx's own INFO log line shows the query string, but never the credentials
    assert "url-s3cret" not in caplog.text
    assert "tok-s3cret" not in caplog.text


@pytest.mark.parametrize(
    ("url", "options", "message"),
    [
        ("ftp://u:pw-s3cret@host/x", {}, "base_url must be an http:// or https:// URL"),
        ("http://127.0.0.1:1", {"timeout": 0}, "timeout must be a number of seconds > 0"),
        ("http://127.0.0.1:1", {"max_attempts": 0}, "max_attempts"),
        ("http://127.0.0.1:1", {"retry_methods": "POST"}, "retry_methods must be a collection"),
        (
            "http://127.0.0.1:1",
            {"redis_url": "http://x:pw-s3cret@h"},
            "redis_url must be a redis://",
        ),
    ],
)
def test_bad_options_are_a_clear_error(url, options, message):
    with pytest.raises(ConfigurationError, match=message) as caught:
        ResilientClient(url, **options)
    assert "s3cret" not in str(caught.value)


def test_without_httpx_the_import_error_names_the_extra():
    code = "import sys; sys.modules['httpx'] = None; import taskkit.http"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert "pip install 'taskkit[api]'" in done.stderr


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"Retry-After": "12"}, 12.0),
        ({"Retry-After": "Wed, 21 Oct 2015 07:28:30 GMT"}, 30.0),  # from the local clock
        ({"Retry-After": "Wed, 21 Oct 2015 07:27:00 GMT"}, 0.0),  # in the past
        ({"Retry-After": "soon"}, None),  # malformed: the backoff applies
        ({"Retry-After": "-5"}, None),
        ({}, None),
    ],
)
def test_retry_after_values(headers, expected):
    from datetime import UTC, datetime

    from taskkit.http._core import retry_after

    response = httpx.Response(503, headers=headers)
    now = datetime(2015, 10, 21, 7, 28, 0, tzinfo=UTC)
    assert retry_after(response, now=lambda: now) == expected
