"""Alert notifiers of an opened breaker: the log record, the webhook (against a real local HTTP
server), custom notifiers, the ``alert_on_circuit_open`` switch, and the webhook URL kept out of
every log record."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from taskkit.config import Settings
from taskkit.recovery import CircuitBreaker
from taskkit.telemetry import alerts
from taskkit.telemetry.alerts import (
    CircuitAlert,
    WebhookNotifier,
    add_notifier,
    flush_alerts,
    install_alerts,
)

SECRET = "T0SECRET/B0SECRET/xoxb-hush"


class _Hook:
    """A local HTTP server (port 0) that keeps the JSON bodies POSTed to it."""

    def __init__(self, status: int = 200) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.paths: list[str] = []
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers["Content-Length"])
                hook.paths.append(self.path)
                hook.bodies.append(json.loads(self.rfile.read(length)))
                self.send_response(status)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/services/{SECRET}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hook() -> Iterator[_Hook]:
    server = _Hook()
    yield server
    server.close()


@pytest.fixture(autouse=True)
def _uninstalled() -> Iterator[None]:
    yield
    for uninstall in tuple(alerts._installed):
        uninstall()


def _open(name: str) -> CircuitBreaker:
    breaker = CircuitBreaker(failure_threshold=1, recovery_timeout=60, name=name)

    def fail() -> None:
        raise ConnectionError("down")

    with pytest.raises(ConnectionError):
        breaker.call(fail)
    return breaker


def test_the_webhook_receives_a_post_when_a_breaker_opens(hook: _Hook):
    install_alerts(Settings(alert_webhook_url=hook.url))
    _open("payments")
    assert flush_alerts(timeout=10)
    assert hook.paths == [f"/services/{SECRET}"]
    (body,) = hook.bodies
    assert body["breaker"] == "payments"
    assert body["state"] == "open"
    assert body["previous"] == "closed"
    assert "payments" in body["text"]
    assert "opened" in body["text"]


def test_nothing_is_posted_when_alert_on_circuit_open_is_off(hook: _Hook):
    install_alerts(Settings(alert_webhook_url=hook.url, alert_on_circuit_open=False))
    assert alerts._installed == []
    _open("off")
    # Turned on again, a later breaker posts: the server got that one and only that one.
    install_alerts(Settings(alert_webhook_url=hook.url))
    _open("on")
    assert flush_alerts(timeout=10)
    assert [body["breaker"] for body in hook.bodies] == ["on"]


def test_the_log_notifier_writes_one_alert_record(caplog: pytest.LogCaptureFixture):
    install_alerts(Settings())
    with caplog.at_level(logging.INFO):
        _open("db")
    (alert,) = [r for r in caplog.records if getattr(r, "taskkit_event", None) == "alert"]
    assert alert.levelno == logging.ERROR
    assert alert.name == "taskkit.alerts"
    assert (alert.breaker, alert.state) == ("db", "open")
    assert alert.getMessage() == "taskkit: circuit breaker 'db' opened (was closed)"


def test_custom_notifiers_get_the_alert_and_a_failing_one_is_isolated():
    seen: list[CircuitAlert] = []

    def broken(alert: CircuitAlert) -> None:
        raise RuntimeError("pager down")

    remove_broken = add_notifier(broken)
    remove = add_notifier(seen.append)
    try:
        install_alerts(Settings())
        _open("queue")
        breaker = _open("queue-2")
        breaker.reset()
    finally:
        remove()
        remove_broken()
    assert [(a.breaker, a.state, a.previous) for a in seen] == [
        ("queue", "open", "closed"),
        ("queue-2", "open", "closed"),
    ]


def test_a_failed_trial_that_opens_the_breaker_again_does_not_alert_again():
    seen: list[CircuitAlert] = []
    remove = add_notifier(seen.append)
    now = [0.0]
    try:
        install_alerts(Settings())
        breaker = CircuitBreaker(
            failure_threshold=1, recovery_timeout=10, name="flappy", clock=lambda: now[0]
        )

        def fail() -> None:
            raise ConnectionError("down")

        with pytest.raises(ConnectionError):
            breaker.call(fail)
        now[0] = 11.0  # half-open: the trial fails, open again
        with pytest.raises(ConnectionError):
            breaker.call(fail)
    finally:
        remove()
    assert [a.breaker for a in seen] == ["flappy"]


def test_install_is_idempotent():
    seen: list[CircuitAlert] = []
    remove = add_notifier(seen.append)
    try:
        install_alerts(Settings())
        install_alerts(Settings())
        _open("twice")
    finally:
        remove()
    assert len(seen) == 1


@pytest.mark.parametrize("status", [500, None])
def test_a_failing_webhook_is_logged_once_without_its_url(
    caplog: pytest.LogCaptureFixture, status: int | None
):
    if status is None:  # nobody listens: connection refused
        closed = _Hook()
        closed.close()
        url = closed.url
    else:
        failing = _Hook(status)
        url = failing.url
    try:
        install_alerts(Settings(alert_webhook_url=url))
        with caplog.at_level(logging.DEBUG):
            _open("one")
            _open("two")
            assert flush_alerts(timeout=10)
    finally:
        if status is not None:
            failing.close()
    failures = [r for r in caplog.records if "webhook" in r.getMessage()]
    assert len(failures) == 1, [r.getMessage() for r in failures]
    assert failures[0].levelno == logging.WARNING
    for record in caplog.records:
        shown = record.getMessage() + (caplog.text or "")
        assert SECRET not in shown
        assert "SECRET" not in shown
        assert "/services/" not in shown
    assert "T0SECRET" not in repr(alerts._webhooks)


def test_the_caller_is_never_blocked_by_a_full_queue(caplog: pytest.LogCaptureFixture):
    stuck = threading.Event()
    notifier = WebhookNotifier("http://127.0.0.1:9/never", max_queued=2)
    notifier._post = lambda body: stuck.wait(10)  # type: ignore[method-assign]
    alert = CircuitAlert("x", "open", "closed", "x opened")
    with caplog.at_level(logging.WARNING):
        for _ in range(10):
            notifier(alert)  # returns at once: the thread holds one, the queue two
    stuck.set()
    assert notifier.flush(timeout=10)
    dropped = [r for r in caplog.records if "dropping" in r.getMessage()]
    assert len(dropped) == 1


def test_a_webhook_url_that_is_not_http_is_refused_without_showing_it(
    caplog: pytest.LogCaptureFixture,
):
    url = f"file:///etc/{SECRET}"
    with pytest.raises(ValueError, match="http") as refused:
        WebhookNotifier(url)
    assert SECRET not in str(refused.value)
    seen: list[CircuitAlert] = []
    remove = add_notifier(seen.append)
    try:
        with caplog.at_level(logging.INFO):
            install_alerts(Settings(alert_webhook_url=url))
            _open("still-alerts")
    finally:
        remove()
    assert [a.breaker for a in seen] == ["still-alerts"]  # the other notifiers still run
    assert alerts._webhooks == []
    assert "no alert webhook" in caplog.text
    assert SECRET not in caplog.text
