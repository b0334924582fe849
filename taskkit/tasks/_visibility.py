"""The visibility timeout, made safe: live workers keep their messages invisible.

The Redis transport (and taskkit's embedded ``taskkit+sqlite`` broker, ``taskkit.broker``)
moves a delivered-but-unacknowledged message back to its queue once it is
``visibility_timeout`` seconds old, whether its worker is dead or just busy (a long task, or a
retry waiting for its countdown). Celery's default (one hour) makes a dead worker's tasks wait
an hour; a short one runs long tasks several times.

taskkit uses a short timeout (``TASKKIT_VISIBILITY_TIMEOUT``, 30 s) *and* a keeper thread in
every worker that re-stamps the delivery time of each message the worker holds, every third
of the timeout. A live worker's messages therefore never come back; a dead worker's come back
within the timeout (plus one restore sweep, 5 s, on Redis), on any surviving worker. The keeper
is the worker's heartbeat for the broker: it covers every message the worker holds, running or
reserved and not yet started (prefetched), which have no task lease yet.

Without the keeper (``TASKKIT_EXTEND_VISIBILITY=false``, or a transport it does not know),
``check_visibility`` clamps the outer retry waits under the timeout and warns about time limits
that exceed it, at app creation and again when a worker starts.
"""

from __future__ import annotations

import logging
import threading
import time
import warnings
from typing import Any

from celery import Celery, bootsteps

from taskkit.errors import TaskkitWarning
from taskkit.tasks._options import DEFAULTS

__all__ = [
    "VISIBILITY_SAFE_SHARE",
    "VisibilityKeeper",
    "check_visibility",
    "extends_visibility",
    "uses_visibility_timeout",
    "visibility_timeout",
]

logger = logging.getLogger("taskkit.tasks")

#: Share of the visibility timeout a retry countdown may use when nothing extends it.
VISIBILITY_SAFE_SHARE = SAFE_SHARE = 0.9

#: Broker schemes whose transport redelivers an unacknowledged message by its age.
AGE_SCHEMES = frozenset({"redis", "rediss", "sentinel", "sqs", "taskkit"})
#: Of those, the transports whose messages the worker's keeper can re-stamp.
KEEPER_SCHEMES = frozenset({"redis", "rediss", "sentinel", "taskkit"})
#: Celery's visibility timeout when the transport options set none.
CELERY_DEFAULT_TIMEOUT = 3600.0


def _scheme(app: Celery) -> str:
    url = str(app.conf.broker_url or "")
    return url.split("://", 1)[0].split("+", 1)[0] if "://" in url else ""


def uses_visibility_timeout(app: Celery) -> bool:
    """Whether the app's broker redelivers by age (Redis, SQS, the embedded ``taskkit+sqlite``)
    rather than on connection loss (RabbitMQ).

    Example::

        app = create_app(broker_url="redis://localhost:6379/0")
        assert uses_visibility_timeout(app)
    """
    return _scheme(app) in AGE_SCHEMES


def visibility_timeout(app: Celery) -> float:
    """The broker's visibility timeout in seconds (``broker_transport_options``; Celery's
    one hour when they set none).

    Example::

        app = create_app(broker_url="redis://localhost:6379/0")
        assert visibility_timeout(app) == 30.0  # TASKKIT_VISIBILITY_TIMEOUT
    """
    options = app.conf.broker_transport_options or {}
    return float(options.get("visibility_timeout") or CELERY_DEFAULT_TIMEOUT)


def extends_visibility(app: Celery) -> bool:
    """Whether the app's workers keep the messages they hold invisible (the keeper): the
    broker redelivers by age, its transport is one the keeper knows (Redis, the embedded
    broker; not SQS) and ``TASKKIT_EXTEND_VISIBILITY`` is on. When False, retry countdowns
    are clamped to ``VISIBILITY_SAFE_SHARE`` of the timeout and a task running longer than it
    is delivered again while it runs.

    Example::

        app = create_app(broker_url="redis://localhost:6379/0")
        assert extends_visibility(app)  # TASKKIT_EXTEND_VISIBILITY defaults to true
    """
    return bool(app.conf.get("taskkit_extend_visibility", False)) and (
        _scheme(app) in KEEPER_SCHEMES
    )


def check_visibility(app: Celery) -> list[str]:
    """Make countdowns and time limits fit under the visibility timeout; return the warnings.

    With the keeper running, only its own interval must fit. Without it, the outer retry cap
    (``taskkit_outer_max_delay``) is clamped to 90% of the timeout, and a time limit longer than
    the timeout is reported, since such a task would be delivered again while it runs. A task's
    own ``outer_max_delay``, and any explicit ``self.retry(countdown=...)``, are clamped when
    the retry is sent (``ResilientTask.retry``).
    """
    if not uses_visibility_timeout(app):
        return []
    conf = app.conf
    timeout = visibility_timeout(app)
    problems: list[str] = []
    if extends_visibility(app):
        return problems
    safe = timeout * SAFE_SHARE
    cap = conf.get("taskkit_outer_max_delay") or DEFAULTS["outer_max_delay"]
    if cap > safe:
        problems.append(
            f"taskkit_outer_max_delay={cap:g}s is longer than the broker's visibility_timeout "
            f"({timeout:g}s): a waiting retry would be delivered twice; clamped to {safe:g}s"
        )
        conf.taskkit_outer_max_delay = safe
    for setting in ("task_time_limit", "task_soft_time_limit"):
        limit = conf.get(setting)
        if limit and limit > timeout:
            problems.append(
                f"{setting}={limit:g}s is longer than the broker's visibility_timeout "
                f"({timeout:g}s) and visibility is not extended: a task running that long is "
                "delivered again while it runs; set TASKKIT_EXTEND_VISIBILITY=true or give "
                "such tasks a lease_key"
            )
    for problem in problems:
        warnings.warn(problem, TaskkitWarning, stacklevel=3)
    return problems


class VisibilityKeeper(bootsteps.StartStopStep):
    """Consumer step: the worker's heartbeat for the broker, for every message it holds.

    Every third of the visibility timeout it re-stamps the delivery time of each message this
    worker holds, running or reserved-but-not-started; a dead worker stops beating and its
    messages come back. Runs on its own thread, so it keeps going while a ``solo`` pool runs a
    task on the main thread. It only updates messages still held (Redis ``ZADD XX``; on the
    embedded broker, rows whose receipt is still this worker's): an acknowledged message is
    never brought back.
    """

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def include_if(self, parent: Any) -> bool:
        return extends_visibility(parent.app)

    def start(self, parent: Any) -> None:
        interval = visibility_timeout(parent.app) / 3
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._run, args=(parent, interval), name="taskkit-visibility", daemon=True
        )
        self._thread.start()

    def stop(self, parent: Any) -> None:
        self._stop.set()

    shutdown = stop

    def _run(self, consumer: Any, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                extend_held_messages(consumer)
            except Exception:  # a broker blip: the next round comes well before the timeout
                logger.warning("taskkit: could not extend message visibility", exc_info=True)


def extend_held_messages(consumer: Any) -> int:
    """Stamp every message the consumer holds as delivered now; return how many were stamped.

    A channel with an ``extend_visibility(tags)`` method (``taskkit.broker``) does it itself;
    otherwise the Redis unacked index is updated.
    """
    task_consumer = getattr(consumer, "task_consumer", None)
    channel = getattr(task_consumer, "channel", None)
    qos = getattr(channel, "qos", None)
    delivered = getattr(qos, "_delivered", None)
    if channel is None or not delivered:
        return 0
    for _ in range(3):
        try:
            tags = list(delivered)  # the consumer thread may change it while we copy
            break
        except RuntimeError:
            continue
    else:
        return 0
    if not tags:
        return 0
    extend = getattr(channel, "extend_visibility", None)
    if extend is not None:
        return int(extend(tags))
    now = time.time()
    with channel.conn_or_acquire() as client:
        client.zadd(channel.unacked_index_key, dict.fromkeys(tags, now), xx=True)
    return len(tags)
