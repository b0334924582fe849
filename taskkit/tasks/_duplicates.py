"""Duplicate deliveries: a copy of work whose lease a live task holds is dropped, and counted.

A task with a ``lease_key`` takes the key's lease before its body runs. A delivery that finds
the lease held by a live task is a duplicate of work already being done:

- a copy of the same task id (the broker delivered it again while the owner runs): dropped,
  and a watcher copy is sent after ``lease_ttl`` that takes over if the owner has died by then
  (``ResilientTask._take_lease``);
- another task id for the same key (a resubmitted run, a batch chunk sent twice): dropped with
  Celery's ``Ignore``. Its result is stored as ``IGNORED``, with the key and the holder as its
  meta; it is never a ``FAILURE``, never runs ``on_failure`` and never becomes a dead letter.

Decision: the second kind gets no watcher. The lease says both deliveries are the same work,
and the holder's own message is ``acks_late``: if the holder dies, its message is delivered
again (a pool process: retried at once, ``taskkit.tasks._requeue``; a whole worker: after the
visibility timeout) and the work is done by it. Dropping the duplicate therefore loses
nothing, and a watcher would only run the work a second time once the holder finished. (Before
issue 15 such a copy failed with ``LeaseHeld``, was dead-lettered, and a batch chunk
dead-lettered its items while the holder was still running them.)

Every drop of either kind (watcher copies excepted: they are taskkit's own) is counted and
announced:

- the count: in Redis, ``taskkit:duplicates:<task name>`` (shared by the fleet) when leases
  live in Redis, else in this process; ``duplicate_count(task)`` reads it;
- a WARNING log line ``taskkit: <task>[<id>] is a duplicate ...`` naming the key and holder;
- the ``duplicate_dropped`` signal (sender: the task; ``task_id``, ``key``, ``holder``), the
  hook for metrics (issue 17); a receiver that raises is logged by Celery's dispatcher, never
  fails the task.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from typing import Any

from celery.utils.dispatch import Signal

from taskkit.tasks._lease import LeaseOwner

__all__ = ["DUPLICATES_KEY", "duplicate_count", "duplicate_dropped", "record_duplicate"]

logger = logging.getLogger("taskkit.tasks")

#: The Redis counter of a task's dropped duplicates (next to its leases).
DUPLICATES_KEY = "taskkit:duplicates:{task}"

#: Sent in the worker when a delivery is dropped as a duplicate: sender is the task, with
#: ``task_id``, ``key`` (the lease key) and ``holder`` (the ``LeaseOwner`` holding it).
duplicate_dropped = Signal(name="taskkit_duplicate_dropped")

#: Duplicates counted in this process, by task name (when leases do not live in Redis).
_local: Counter[str] = Counter()
_local_lock = threading.Lock()


def _redis_client(task: Any) -> Any:
    return getattr(task.lease_store(), "client", None)


def record_duplicate(task: Any, task_id: str, key: str, holder: LeaseOwner | None) -> None:
    """Count, log and announce that ``task_id`` of ``task`` was dropped as a duplicate of the
    work ``holder`` does under lease ``key``. Never raises: a counter in a Redis that is down is
    only logged."""
    logger.warning(
        "taskkit: %s[%s] is a duplicate: lease %r is held by %s; dropped",
        task.name,
        task_id,
        key,
        holder.describe() if holder else "a live task",
    )
    try:
        client = _redis_client(task)
        if client is not None:
            client.incr(DUPLICATES_KEY.format(task=task.name))
        else:
            with _local_lock:
                _local[task.name] += 1
    except Exception:
        logger.warning("taskkit: could not count the duplicate %s[%s]", task.name, task_id)
    duplicate_dropped.send(sender=task, task_id=task_id, key=key, holder=holder)


def duplicate_count(task: Any) -> int:
    """Deliveries of ``task`` dropped as duplicates so far: across the fleet when its leases
    live in Redis, else in this process.

    Example::

        from taskkit.tasks import duplicate_count

        print(duplicate_count(train))        # e.g. 2: two copies of running runs were dropped
    """
    client = _redis_client(task)
    if client is not None:
        return int(client.get(DUPLICATES_KEY.format(task=task.name)) or 0)
    with _local_lock:
        return _local[task.name]
