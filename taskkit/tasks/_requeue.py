"""A task whose pool process died runs again at once, ahead of the queue (Redis, embedded).

Celery 5.7's ``retry_on_worker_lost`` (``ResilientTask`` sets it) sends a task whose pool
process died (SIGKILL, the OOM killer) again as a retry: it counts against ``max_retries``, so a
task that kills its process every time stops. But the retry is a new message, sent with a
countdown (``default_retry_delay``) to the *back* of the queue: with 50 batch chunks waiting,
the killed chunk ran again only after all of them (9 to 24 s measured, ``docs/benchmarks.md``).

Measured where that time went (Redis broker, one worker, prefork, concurrency 2, 50 one-item
chunks queued): the death is noticed within 0.5 s (``_check_pool_processes_often``), the
chunk's Redis lease is free at once (the dead owner is reaped, so provably dead, and taken
over), and no ``LeaseHeld`` retry waits. The rest is the queue: the 2 s countdown and every
chunk ahead of the copy.

The fix, ``FrontRequeueRequest`` (the worker-side request class of ``ResilientTask``): on
kombu's Redis transport the retry is a copy of the delivered message with ``retries`` + 1,
pushed at the consuming end of its queue's list (``RPUSH``; publishing ``LPUSH``-es at the other
end, and consumers ``BRPOP`` from this one), with no countdown. The next free pool process
takes it before anything that was waiting. Everything else is Celery's: the ``RETRY`` state,
the ``task-retried`` event, ``on_retry`` and the ``task_retry`` signal, ``max_retries``.

On taskkit's embedded broker (``taskkit+sqlite``, ``taskkit.broker``) the same copy goes
through the channel's ``_put_front``: in one ``BEGIN IMMEDIATE`` transaction it is inserted
with an id below every row of the file (ready rows are taken by priority, then id) and the held
row of the delivery is deleted, so exactly one of them exists at any moment and the copy is
what the next free pool process takes. The delivery's acknowledgement that follows finds
nothing to delete and says nothing. Measured there (same set-up): 2.4 s from the kill to the
chunk's next start (median of 5), against 16 s with Celery's retry. Most of the 2.4 s is
Celery's threaded pool (this transport has no event loop): it checks its processes every 0.8 s
and fails the task of a dead one only ``worker_lost_wait`` after it found the death (Celery's
10 s; 1 s in ``create_app`` apps).

Decisions:

- Why not a priority: on Redis, priority 0 is kombu's first list and every message without a
  priority is already there; a retry cannot go ahead of them without giving every other message
  a lower default priority (other list names, and a change for every producer).
- Why not a kombu Redis transport subclass (``_put`` pushing a flagged message at the front):
  it must be selected with ``broker_transport``, and a connection's transport name is also its
  URL scheme: ``rediss://`` loses its TLS set-up, and ``as_uri()`` (the worker banner, Flower's
  broker page) shows the class path instead of ``redis://``. A request class changes nothing
  for anything but this one retry.
- Why a copy of the delivered message rather than Celery's rebuilt one: only the rebuilt one
  cannot be pushed at the front without a transport of our own. The copy carries the same
  body (arguments, callbacks, chain, chord) and headers; it gets ``retries`` + 1, no ETA, a new
  delivery tag (the old one is acknowledged), and loses the ``redelivered`` flags (a retry is
  counted by ``retries``, not as a redelivery).
- What it relies on in kombu: the Redis channel's ``_lookup``, ``_get_message_priority``,
  ``_q_for_pri`` and ``conn_or_acquire`` (the code kombu's own restore uses), and the raw
  payload of a virtual-transport message; on the embedded broker, ``_lookup`` and taskkit's
  own ``_put_front``. When any of them is missing (another broker, another kombu), Celery's
  own retry runs: slower, never lost. ``tests/batch/test_requeue.py`` fails if the front
  requeue stops happening, on Redis or on the embedded broker.
- Duplicates: a copy only when the message's exchange and routing key name exactly one queue
  (a copy in each of several would run it once per queue). On Redis the copy is pushed before
  the delivery is acknowledged (a worker killed in between leaves both: the chunk's lease turns
  the second away); on the embedded broker the swap is one transaction, and a delivery no
  longer held under its tag (its visibility timeout passed and another worker took it) is not
  copied: Celery's retry decides, as before.
- Other brokers: RabbitMQ keeps Celery's retry (to the back of the queue after
  ``default_retry_delay``).
"""

from __future__ import annotations

import copy
import logging
from typing import Any, cast

from celery.exceptions import Retry
from celery.signals import task_retry
from celery.worker.request import Request
from kombu.utils.encoding import safe_repr, safe_str
from kombu.utils.json import dumps
from kombu.utils.uuid import uuid

__all__ = ["FrontRequeueRequest", "requeue_at_front"]

logger = logging.getLogger("taskkit.tasks")

#: Headers a copy of a delivered message must not carry into its retry.
_DROPPED_HEADERS = ("redelivered", "taskkit_watcher")
#: What a kombu Redis channel has that the copy needs (kombu's own restore uses them).
_REDIS_NEEDS = ("_lookup", "_get_message_priority", "_q_for_pri", "conn_or_acquire")
#: What a channel of taskkit's embedded broker (``taskkit.broker``) has that the copy needs.
_EMBEDDED_NEEDS = ("_lookup", "_put_front")


def requeue_at_front(message: Any, retries: int) -> bool:
    """Put a copy of ``message`` (a delivered kombu message of Celery's task protocol 2, on
    Redis or taskkit's embedded broker) with ``retries`` at the front of its queue; False when
    ``message`` is not one, or its exchange and routing key do not name exactly one queue, or
    (embedded broker) it is no longer held, and nothing was sent."""
    channel: Any = getattr(message, "channel", None)
    raw = getattr(message, "_raw", None)
    embedded = all(hasattr(channel, name) for name in _EMBEDDED_NEEDS)
    redis = all(hasattr(channel, name) for name in _REDIS_NEEDS)
    if not isinstance(raw, dict) or not (embedded or redis):
        return False
    if not {"id", "task", "retries"} <= set(raw.get("headers") or {}):
        return False  # protocol 1 keeps retries in the body: Celery's retry rebuilds it
    payload = copy.deepcopy(raw)
    headers = payload.setdefault("headers", {})
    properties = payload.setdefault("properties", {})
    delivery_info = properties.setdefault("delivery_info", {})
    for name in _DROPPED_HEADERS:
        headers.pop(name, None)
    delivery_info.pop("redelivered", None)
    payload.pop("redelivered", None)  # the embedded transport also flags the payload
    headers["retries"] = retries
    headers["eta"] = None
    properties["delivery_tag"] = uuid()
    queues = list(
        channel._lookup(delivery_info.get("exchange"), delivery_info.get("routing_key")) or ()
    )
    if len(queues) != 1:
        # No binding (the copy would be lost) or a topic/fanout exchange naming several queues
        # (a copy in each would run it again for every other queue): Celery's retry decides.
        return False
    if embedded:
        # The held row is swapped for the copy in one transaction; an already acknowledged
        # message (a task without acks_late) has no row left to swap.
        held = None if getattr(message, "acknowledged", True) else message.delivery_tag
        return bool(channel._put_front(queues[0], payload, replaces=held))
    priority = channel._get_message_priority(payload, reverse=False)
    body = dumps(payload)
    with channel.conn_or_acquire() as client:
        client.rpush(channel._q_for_pri(queues[0], priority), body)
    return True


class FrontRequeueRequest(Request):
    """Celery's worker request, whose retry after a lost pool process goes to the front of its
    queue at once on Redis and on the embedded broker (see the module docs).
    ``ResilientTask.Request``.

    Example::

        @app.task(base=ResilientTask)   # every ResilientTask uses it; nothing to set
        def ingest(path: str) -> int: ...
    """

    def _retry_worker_lost(self, exc: Any, exc_info: Any) -> bool:
        task = self.task
        request: Any = self._context  # type: ignore[attr-defined]
        if self.store_errors:
            # Before the copy is sent: an idle worker may take it at once and store STARTED.
            task.backend.mark_as_retry(self.id, exc, exc_info.traceback, request=request)
        try:
            sent = requeue_at_front(getattr(self, "_message", None), request.retries + 1)
        except Exception:
            logger.warning(
                "taskkit: could not requeue %s[%s] at the front of its queue; "
                "Celery retries it instead",
                self.task_name,
                self.id,
                exc_info=True,
            )
            sent = False
        if not sent:
            return bool(super()._retry_worker_lost(exc, exc_info))  # type: ignore[misc]
        # The rest of what Celery's Request._retry_worker_lost does (Celery 5.7).
        if task.acks_late:
            self.acknowledge()
        self.send_event(
            "task-retried", exception=safe_repr(exc), traceback=safe_str(exc_info.traceback)
        )
        reason = Retry(exc=exc, when=cast(Any, 0))
        task.request_stack.push(request)
        try:
            task.on_retry(exc, self.id, self.args, self.kwargs, exc_info)
            task_retry.send(sender=task, request=request, reason=reason, einfo=exc_info)
        finally:
            task.request_stack.pop()
        logger.info(
            "taskkit: %s[%s] lost its pool process; running it again ahead of the queue (retry %d)",
            self.task_name,
            self.id,
            request.retries + 1,
        )
        return True
