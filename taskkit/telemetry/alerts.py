"""Alerts when a circuit breaker opens: a log record, a webhook, and your own notifiers.

``alert_on_circuit_open`` (default on) is the one setting: with it, :func:`install_alerts`
(which taskkit's workers and ``taskkit serve`` call at start) subscribes to the event bus and,
when a breaker opens, calls every notifier with a :class:`CircuitAlert`:

- the log notifier: one ERROR record ``taskkit: circuit breaker 'db' opened (was closed)`` on
  the ``taskkit.alerts`` logger, with ``taskkit_event="alert"``, ``breaker`` and ``state``. It
  is a different kind from the breaker's own transition record (``"circuit_state"``, which
  ``log_circuit_state_changes`` governs), so neither setting hides the other;
- the webhook notifier, when ``alert_webhook_url`` is set: a POST of
  ``{"text": ..., "breaker": ..., "state": "open", "previous": ...}`` as JSON (Slack's and
  Mattermost's incoming webhooks read ``text``). It never blocks the code whose call opened the
  breaker: alerts go to a bounded queue (100; more are dropped and said once) that a daemon
  thread posts with a 5 s timeout. A failure is logged once until a POST succeeds again,
  naming the error but never the URL, which is a secret (it carries the webhook's token);
- yours: :func:`add_notifier` takes any callable of one :class:`CircuitAlert`.

Decisions: an alert is sent when a breaker opens from closed, not when a half-open trial fails
and it opens again (that would repeat the alert every ``recovery_timeout`` while the
dependency stays down). A notifier that raises is logged and ignored.

Example::

    from taskkit.telemetry import alerts

    alerts.add_notifier(lambda alert: print("PAGE:", alert.text))
    alerts.install_alerts()  # in your own process; workers and `taskkit serve` do it themselves
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import queue
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass

from pydantic import SecretStr

from taskkit._utils import call_hook
from taskkit.config import Settings, get_settings
from taskkit.recovery import events

__all__ = [
    "CircuitAlert",
    "LogNotifier",
    "Notifier",
    "WebhookNotifier",
    "add_notifier",
    "flush_alerts",
    "install_alerts",
]

logger = logging.getLogger("taskkit.alerts")


@dataclass(frozen=True, slots=True)
class CircuitAlert:
    """A breaker opened: ``breaker`` (its name) went from ``previous`` to ``state``."""

    breaker: str
    state: str
    previous: str
    text: str


#: What a notifier is: any callable of one alert (its return value is ignored).
Notifier = Callable[[CircuitAlert], object]


class LogNotifier:
    """Logs an alert as one ERROR record with ``taskkit_event="alert"``.

    Example::

        LogNotifier()(CircuitAlert("db", "open", "closed", "breaker 'db' opened"))
    """

    def __call__(self, alert: CircuitAlert) -> None:
        logger.error(
            "%s",
            alert.text,
            extra={"taskkit_event": "alert", "breaker": alert.breaker, "state": alert.state},
        )


def _describe(exc: BaseException) -> str:
    """The error of a failed POST without the URL (``str(exc)`` of some errors quotes it)."""
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code}"
    if isinstance(exc, urllib.error.URLError):
        reason = exc.reason
        if isinstance(reason, OSError):
            return f"{type(reason).__name__}: {reason.strerror or type(reason).__name__}"
        return "URLError"
    if isinstance(exc, OSError) and exc.strerror:
        return f"{type(exc).__name__}: {exc.strerror}"
    return type(exc).__name__


_STOP = object()


class WebhookNotifier:
    """POSTs each alert as JSON to ``url`` (``http``/``https``, else ``ValueError``) from a
    daemon thread; never blocks the caller.

    ``timeout`` bounds each POST; ``max_queued`` alerts wait at most (more are dropped). The
    thread starts at the first alert in each process (so a forked pool process has its own).
    :meth:`flush` waits until the queued alerts are sent (tests, shutdown).

    Example::

        notifier = WebhookNotifier("https://hooks.slack.com/services/T000/B000/XXXX")
        notifier(CircuitAlert("db", "open", "closed", "breaker 'db' opened"))
        notifier.flush(timeout=5)
    """

    def __init__(
        self, url: str | SecretStr, *, timeout: float = 5.0, max_queued: int = 100
    ) -> None:
        self._url = url.get_secret_value() if isinstance(url, SecretStr) else url
        if urllib.parse.urlsplit(self._url).scheme.lower() not in {"http", "https"}:
            raise ValueError("the alert webhook URL must be an http:// or https:// URL")
        self.timeout = timeout
        self.max_queued = max_queued
        self._lock = threading.Lock()
        self._pid: int | None = None
        self._queue: queue.Queue[object] = queue.Queue(max_queued)
        self._failing = False
        self._dropping = False

    def __repr__(self) -> str:
        return "WebhookNotifier(url='***')"

    def __call__(self, alert: CircuitAlert) -> None:
        pending = self._started()
        body = {
            "text": alert.text,
            "breaker": alert.breaker,
            "state": alert.state,
            "previous": alert.previous,
        }
        try:
            pending.put_nowait(body)
        except queue.Full:
            if not self._dropping:
                self._dropping = True
                logger.warning(
                    "taskkit: alert webhook is behind (%d alerts queued); dropping alerts",
                    self.max_queued,
                )

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued alert was posted (or failed); False on timeout."""
        done = threading.Event()
        with self._lock:
            if self._pid != os.getpid():
                return True  # nothing was sent from this process
            pending = self._queue
        try:
            pending.put(done, timeout=timeout)
        except queue.Full:
            return False
        return done.wait(timeout)

    def _started(self) -> queue.Queue[object]:
        with self._lock:
            if self._pid != os.getpid():  # first alert, or a forked process: its own thread
                self._pid = os.getpid()
                self._queue = queue.Queue(self.max_queued)
                thread = threading.Thread(
                    target=self._run, args=(self._queue,), name="taskkit-alert-webhook"
                )
                thread.daemon = True
                thread.start()
            return self._queue

    def _run(self, pending: queue.Queue[object]) -> None:
        while True:
            item = pending.get()
            if item is _STOP:
                return
            if isinstance(item, threading.Event):
                item.set()
                continue
            assert isinstance(item, dict)
            self._post(item)

    def _post(self, body: dict[str, str]) -> None:
        request = urllib.request.Request(
            self._url,
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json", "User-Agent": "taskkit-alerts"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                response.read()
        except Exception as exc:
            if not self._failing:
                self._failing = True
                logger.warning(
                    "taskkit: alert webhook POST failed (%s); further failures are not logged "
                    "until one succeeds",
                    _describe(exc),
                )
            return
        if self._failing:
            self._failing = False
            logger.info("taskkit: alert webhook POST succeeds again")
        self._dropping = False


_custom: list[Notifier] = []
_installed: list[Callable[[], None]] = []
_webhooks: list[WebhookNotifier] = []


def add_notifier(notifier: Notifier) -> Callable[[], None]:
    """Call ``notifier(alert)`` for every breaker that opens (once :func:`install_alerts` ran
    with ``alert_on_circuit_open``); returns a function that removes it.

    Example::

        remove = add_notifier(lambda alert: pager.trigger(alert.text))
    """
    _custom.append(notifier)

    def remove() -> None:
        if notifier in _custom:
            _custom.remove(notifier)

    return remove


def flush_alerts(timeout: float | None = 5.0) -> bool:
    """Wait until the webhook alerts queued in this process are posted (or failed); False if
    ``timeout`` seconds were not enough. Runs at interpreter exit with 2 s.

    Example::

        flush_alerts(timeout=5)
    """
    return all(webhook.flush(timeout) for webhook in tuple(_webhooks))


@atexit.register
def _flush_at_exit() -> None:
    flush_alerts(timeout=2.0)


def install_alerts(settings: Settings | None = None) -> Callable[[], None]:
    """Subscribe the notifiers to the event bus when ``settings.alert_on_circuit_open``: the
    log notifier, the webhook notifier when ``alert_webhook_url`` is set, and those of
    :func:`add_notifier`. Idempotent (a second call replaces the first); returns a function
    that unsubscribes them. Does nothing (and returns a no-op) when the setting is off.

    Example::

        uninstall = install_alerts(Settings(alert_webhook_url="https://hooks.example/T0/XXX"))
    """
    settings = settings or get_settings()
    for previous in tuple(_installed):
        previous()
    if not settings.alert_on_circuit_open:
        return lambda: None
    builtin: list[Notifier] = [LogNotifier()]
    webhook: WebhookNotifier | None = None
    if settings.alert_webhook_url is not None:
        try:
            webhook = WebhookNotifier(settings.alert_webhook_url)
        except ValueError as exc:  # the message never quotes the URL
            logger.error("taskkit: no alert webhook: %s", exc)
        else:
            builtin.append(webhook)

    def on_event(event: events.Event) -> None:
        if not isinstance(event, events.CircuitStateChanged):
            return
        if event.new != "open" or event.old == "half_open":
            return
        alert = CircuitAlert(
            breaker=event.name,
            state=event.new,
            previous=event.old,
            text=f"taskkit: circuit breaker {event.name!r} opened (was {event.old})",
        )
        for notifier in (*builtin, *_custom):
            call_hook(notifier, alert)

    unsubscribe = events.subscribe(on_event)
    if webhook is not None:
        _webhooks.append(webhook)

    def uninstall() -> None:
        unsubscribe()
        if webhook in _webhooks:
            _webhooks.remove(webhook)
        if uninstall in _installed:
            _installed.remove(uninstall)

    _installed.append(uninstall)
    return uninstall
