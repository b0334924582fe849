"""RabbitMQ's consumer timeout, made safe for long tasks.

RabbitMQ closes the channel of a consumer that holds a delivery unacknowledged for longer than
its consumer timeout (``consumer_timeout`` in rabbitmq.conf, 30 min by default). taskkit's
tasks are ``acks_late``: the delivery stays unacknowledged while the task runs, so a training
task of an hour closes its worker's channel. Celery then stops the whole worker ("Unrecoverable
error: PreconditionFailed") unless ``broker_channel_error_retry`` is on, and the broker delivers
the task again. taskkit does three things:

1. ``reliable_defaults`` turns ``broker_channel_error_retry`` on for an AMQP broker: the worker
   reconnects and keeps running the task. The copy the broker delivers again is not run twice:
   a task with a ``lease_key`` finds its own lease held and drops the copy (a watcher follows
   it), and a copy that arrives after the task succeeded finds ``SUCCESS`` and is skipped.
   A task without a ``lease_key`` runs again: give long tasks a lease.
2. The worker asks for a longer timeout on its own consumers: the ``x-consumer-timeout``
   consumer argument (``TASKKIT_CONSUMER_TIMEOUT``, one day by default; 0 leaves the broker's).
   RabbitMQ 3.12 and later honour it; older ones ignore it. A consumer argument, rather than
   the queue argument, because a queue argument is part of the queue's identity: declaring an
   existing queue with different arguments can fail with ``PRECONDITION_FAILED``, and the
   value could never change.
3. A worker that starts on a RabbitMQ older than 3.12 logs one warning: the node-wide
   ``consumer_timeout`` applies there, and AMQP does not tell a client its value (the
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
from typing import Any

from celery import Celery, bootsteps

__all__ = [
    "CONSUMER_TIMEOUT_ARGUMENT",
    "ConsumerTimeout",
    "amqp_defaults",
    "consumer_timeout_supported",
    "server_version",
    "uses_amqp",
]

logger = logging.getLogger("taskkit.tasks")

#: The ``basic.consume`` argument (milliseconds) that overrides the node's consumer timeout.
CONSUMER_TIMEOUT_ARGUMENT = "x-consumer-timeout"

#: The first RabbitMQ release that honours ``x-consumer-timeout``.
FIRST_SUPPORTING = (3, 12)

#: The app setting holding the timeout (seconds) the workers ask for; 0 or None: none.
SETTING = "taskkit_consumer_timeout"

AMQP_SCHEMES = frozenset({"amqp", "amqps", "pyamqp", "librabbitmq"})


def uses_amqp(app: Celery) -> bool:
    """Whether the app's broker speaks AMQP (RabbitMQ)."""
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


def server_version(properties: dict[str, Any] | None) -> tuple[int, ...] | None:
    """The broker's version from the AMQP ``connection.start`` server properties, or None."""
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


class ConsumerTimeout(bootsteps.StartStopStep):
    """Consumer step (AMQP brokers only): ask for ``taskkit_consumer_timeout`` on the worker's
    consumers, and warn once when the broker is too old to honour it."""

    requires = ("celery.worker.consumer.connection:Connection",)

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
        if self._warned:
            return
        transport = getattr(getattr(parent, "connection", None), "connection", None)
        version = server_version(getattr(transport, "server_properties", None))
        if consumer_timeout_supported(version) is False and _timeout_ms(parent.app):
            self._warned = True
            logger.warning(
                "taskkit: RabbitMQ %s ignores %s (3.12 and later honour it): the node's "
                "consumer_timeout (30 min unless rabbitmq.conf says otherwise) closes the "
                "channel under a task that runs longer. The worker reconnects; the task's copy "
                "is dropped if the task has a lease_key or has succeeded, and run again "
                "otherwise. Raise consumer_timeout above your longest task, or give long "
                "tasks a lease_key",
                ".".join(map(str, version or ())),
                CONSUMER_TIMEOUT_ARGUMENT,
            )
