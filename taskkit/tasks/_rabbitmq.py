"""RabbitMQ's consumer timeout, made safe for long tasks.

RabbitMQ closes the channel of a consumer that holds a delivery unacknowledged for longer than
its consumer timeout (``consumer_timeout`` in rabbitmq.conf, 30 min by default). taskkit's
tasks are ``acks_late``: the delivery stays unacknowledged while the task runs, so a training
task of an hour closes its worker's channel. Celery then stops the whole worker ("Unrecoverable
error: PreconditionFailed") unless ``broker_channel_error_retry`` is on, and the broker delivers
the task again. taskkit does three things:

1. ``create_app`` turns ``broker_channel_error_retry`` on for an AMQP broker: the worker
   reconnects and keeps running the task. The copy the broker delivers again is not run twice.
   When it comes back to the same worker, that worker's running request adopts it
   (``adopting``): the copy never starts, and the running task acknowledges the new delivery
   when it ends (its own delivery died with the old channel). When another worker takes it, a
   task with a ``lease_key`` finds its lease held and drops the copy (a watcher follows it),
   and a copy that arrives after the task succeeded finds ``SUCCESS`` and is skipped; a task
   without a ``lease_key`` runs a second time there: give long tasks a lease in a fleet.
2. The worker asks for a longer timeout on its own consumers: the ``x-consumer-timeout``
   consumer argument (``TASKKIT_CONSUMER_TIMEOUT``, one day by default; 0 leaves the broker's).
   RabbitMQ 3.12 and later honour it; older ones ignore it. A consumer argument, rather than
   the queue argument, because a queue argument is part of the queue's identity: declaring an
   existing queue with different arguments can fail with ``PRECONDITION_FAILED``, and the
   value could never change.
3. A worker logs one warning when it starts: on RabbitMQ 3.12+, naming the tasks whose time
   limit is longer than the timeout it asks for (``outlasting``); on an older RabbitMQ, that
   the node-wide ``consumer_timeout`` applies. AMQP does not tell a client that value (the
   management API does, but it is often off), so taskkit cannot compare it with task limits.

Example::

    from taskkit.config import Settings
    from taskkit.tasks import create_app

    app = create_app(settings=Settings(broker_url="amqp://guest:guest@rabbit//",
                                       consumer_timeout=6 * 3600))
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Any

from celery import Celery, bootsteps
from celery.worker import state as worker_state

__all__ = [
    "CONSUMER_TIMEOUT_ARGUMENT",
    "ConsumerTimeout",
    "adopting",
    "amqp_defaults",
    "consumer_timeout_supported",
    "effective_consumer_timeout",
    "outlasting",
    "rabbitmq_version",
    "task_time_limits",
    "uses_amqp",
]

logger = logging.getLogger("taskkit.tasks")

#: The ``basic.consume`` argument (milliseconds) that overrides the node's consumer timeout.
CONSUMER_TIMEOUT_ARGUMENT = "x-consumer-timeout"

#: The first RabbitMQ release that honours ``x-consumer-timeout``.
FIRST_SUPPORTING = (3, 12)

#: RabbitMQ's own consumer timeout unless rabbitmq.conf says otherwise (30 min).
RABBITMQ_DEFAULT_TIMEOUT = 1800.0

#: The app setting holding the timeout (seconds) the workers ask for; 0 or None: none.
SETTING = "taskkit_consumer_timeout"

AMQP_SCHEMES = frozenset({"amqp", "amqps", "pyamqp", "librabbitmq"})


def uses_amqp(app: Celery) -> bool:
    """Whether the app's broker speaks AMQP (RabbitMQ).

    Example::

        app = create_app(broker_url="amqp://guest:guest@localhost//")
        assert uses_amqp(app)
    """
    return _scheme(str(app.conf.broker_url or "")) in AMQP_SCHEMES


def _scheme(url: str) -> str:
    return url.split("://", 1)[0].split("+", 1)[0] if "://" in url else ""


def amqp_defaults(broker_url: str, consumer_timeout: float) -> dict[str, Any]:
    """The Celery settings ``create_app`` adds for a broker URL: for AMQP, a channel closed
    under the worker (the consumer timeout) is a reconnect, not the worker's end.

    Example::

        conf = amqp_defaults("amqp://guest:guest@localhost//", 3600)
        assert conf == {"taskkit_consumer_timeout": 3600, "broker_channel_error_retry": True}
    """
    conf: dict[str, Any] = {SETTING: consumer_timeout}
    if _scheme(broker_url) in AMQP_SCHEMES:
        conf["broker_channel_error_retry"] = True
    return conf


def rabbitmq_version(properties: dict[str, Any] | None) -> tuple[int, ...] | None:
    """The broker's version from the AMQP ``connection.start`` server properties, or None.

    Example::

        assert rabbitmq_version({"version": b"3.13.7"}) == (3, 13, 7)
        assert rabbitmq_version({}) is None
    """
    raw = (properties or {}).get("version")
    if isinstance(raw, bytes):
        raw = raw.decode("ascii", "replace")
    if not isinstance(raw, str):
        return None
    match = re.match(r"\d+(?:\.\d+)*", raw.strip())
    return tuple(int(part) for part in match.group().split(".")) if match else None


def consumer_timeout_supported(version: tuple[int, ...] | None) -> bool | None:
    """Whether a RabbitMQ of ``version`` honours ``x-consumer-timeout``; None when unknown.

    Example::

        assert consumer_timeout_supported((3, 10, 8)) is False
        assert consumer_timeout_supported((3, 13, 0)) is True
    """
    if version is None:
        return None
    return version[:2] >= FIRST_SUPPORTING


def effective_consumer_timeout(app: Celery, version: tuple[int, ...] | None) -> float:
    """The consumer timeout (seconds) that applies to the app's workers on a RabbitMQ of
    ``version``: the one they ask for (``TASKKIT_CONSUMER_TIMEOUT``) when the broker honours
    it, else RabbitMQ's default, 30 min (rabbitmq.conf may say otherwise; AMQP does not tell).

    Example::

        app = create_app(broker_url="amqp://guest:guest@localhost//")
        assert effective_consumer_timeout(app, (3, 10, 8)) == 1800.0
    """
    asked = float(app.conf.get(SETTING) or 0)
    return asked if (asked and consumer_timeout_supported(version)) else RABBITMQ_DEFAULT_TIMEOUT


def _timeout_ms(app: Celery) -> int | None:
    seconds = app.conf.get(SETTING)
    return int(seconds * 1000) if seconds else None


def ask_for_consumer_timeout(app: Celery) -> int:
    """Put ``x-consumer-timeout`` on the consumer arguments of every queue the worker consumes;
    return how many queues got it (a queue's own value is kept)."""
    timeout = _timeout_ms(app)
    if timeout is None:
        return 0
    changed = 0
    for queue in app.amqp.queues.consume_from.values():
        arguments = dict(queue.consumer_arguments or {})
        if CONSUMER_TIMEOUT_ARGUMENT not in arguments:
            arguments[CONSUMER_TIMEOUT_ARGUMENT] = timeout
            queue.consumer_arguments = arguments
            changed += 1
    return changed


def adopting(strategy: Callable[..., Any]) -> Callable[..., Any]:
    """A task strategy that hands a redelivered message of a task this worker is still running
    to the running request, instead of starting the task a second time.

    After the channel closed (the consumer timeout, a network blip), the broker delivers the
    running task's message again, to this worker's new channel as often as not. The running
    request's own delivery can no longer be acknowledged (its channel is gone); it
    acknowledges (or rejects) the new one when it ends. If the worker dies first, the new
    delivery comes back as any unacknowledged message does: nothing is lost.
    """
    if getattr(strategy, "__taskkit_adopting__", False):
        return strategy

    def handle(
        message: Any, body: Any, ack: Any, reject: Any, callbacks: Any, **kwargs: Any
    ) -> Any:
        running = _running_request(message, body)
        if running is None:
            return strategy(message, body, ack, reject, callbacks, **kwargs)
        running._message = message
        running._on_ack = ack
        running._on_reject = reject
        logger.warning(
            "taskkit: %s[%s] was delivered again while this worker still runs it (its channel "
            "was closed: the broker's consumer timeout?); the running task will acknowledge "
            "the new delivery",
            running.name,
            running.id,
        )
        return None

    handle.__taskkit_adopting__ = True  # type: ignore[attr-defined]
    return handle


def _running_request(message: Any, body: Any) -> Any:
    """The request this worker runs (or holds) for the task of a redelivered message, if any."""
    if not (getattr(message, "delivery_info", None) or {}).get("redelivered"):
        return None
    headers = getattr(message, "headers", None) or {}
    task_id = headers.get("id") or (body.get("id") if isinstance(body, dict) else None)
    if not task_id:
        return None
    for request in tuple(worker_state.active_requests):
        if request.id == task_id and not request.acknowledged:
            return request
    return None


def task_time_limits(app: Celery, task: Any) -> dict[str, float]:
    """A task's time limits in seconds, its own or else the app-wide ones: the keys
    ``soft_time_limit`` and ``time_limit``, each present only when set.

    Example::

        app = create_app(task_time_limit=7200)
        assert task_time_limits(app, app.tasks["myproject.train"]) == {"time_limit": 7200.0}
    """
    conf = app.conf
    found: dict[str, float] = {}
    for label, app_wide in (
        ("soft_time_limit", "task_soft_time_limit"),
        ("time_limit", "task_time_limit"),
    ):
        value = getattr(task, label, None) or conf.get(app_wide)
        if value:
            found[label] = float(value)
    return found


def outlasting(app: Celery, seconds: float) -> list[str]:
    """Names of the app's tasks whose time limit (own or app-wide, hard or soft) is longer than
    ``seconds``; a task without a limit is not listed (its length is unknown).

    Example::

        app = create_app(task_time_limit=7200)
        assert "myproject.train" in outlasting(app, 3600)
    """
    names = []
    for name, task in sorted(app.tasks.items()):
        if name.startswith("celery."):
            continue
        if any(limit > seconds for limit in task_time_limits(app, task).values()):
            names.append(name)
    return names


class ConsumerTimeout(bootsteps.StartStopStep):
    """Consumer step (AMQP brokers only): ask for ``taskkit_consumer_timeout`` on the worker's
    consumers, hand a redelivered message of a running task to that task (``adopting``), and
    warn once when the broker is too old to honour the timeout."""

    # After Tasks, which builds the task strategies at every (re)start; before the event loop.
    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self._warned = False
        if self.include_if(parent):
            # Before the Tasks step starts consuming (the queues are set up by now).
            ask_for_consumer_timeout(parent.app)

    def include_if(self, parent: Any) -> bool:
        return uses_amqp(parent.app)

    def start(self, parent: Any) -> None:
        ask_for_consumer_timeout(parent.app)  # queues added since (control add_consumer)
        strategies = parent.strategies
        for name in list(strategies):
            strategies[name] = adopting(strategies[name])
        if self._warned:
            return
        self._warned = True
        transport = getattr(getattr(parent, "connection", None), "connection", None)
        version = rabbitmq_version(getattr(transport, "server_properties", None))
        asked = _timeout_ms(parent.app)
        if consumer_timeout_supported(version) is False and asked:
            logger.warning(
                "taskkit: RabbitMQ %s ignores %s (3.12 and later honour it): the node's "
                "consumer_timeout (30 min unless rabbitmq.conf says otherwise) closes the "
                "channel under a task that runs longer. The worker reconnects and the task "
                "does not run twice, but raise consumer_timeout above your longest task",
                ".".join(map(str, version or ())),
                CONSUMER_TIMEOUT_ARGUMENT,
            )
        elif consumer_timeout_supported(version) and asked:
            longer = outlasting(parent.app, asked / 1000)
            if longer:
                logger.warning(
                    "taskkit: the time limit of %s is longer than TASKKIT_CONSUMER_TIMEOUT "
                    "(%gs): RabbitMQ closes the channel under such a task; raise it",
                    ", ".join(longer),
                    asked / 1000,
                )
