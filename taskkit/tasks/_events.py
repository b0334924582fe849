"""Celery custom events for Flower and ``celery events``, and the worker's shared event clock.

**Custom events.** While a worker sends task events (``-E``, ``worker_send_task_events``,
``TASKKIT_WORKER_EVENTS``), a subscriber of ``taskkit.recovery.events`` turns taskkit's
task-level events into Celery events beside ``task-progress``, each carrying the task's
``uuid`` so Flower files it under the task, and its own fields:

=======================  ===================================================================
``task-inner-retry``     ``attempt``, ``error_type``, ``wait`` (an inner attempt failed and
                         another follows in the same delivery)
``task-dead-lettered``   ``letter_id``, ``error_type``, ``batch_id``, ``item_key``
``task-lease-takeover``  ``key``, ``previous_owner``, ``fencing_token``
``task-checkpoint``      ``step``, ``bytes``, ``seconds``, ``is_best``, ``run_id``
``task-batch-summary``   ``done``, ``dead``, ``skipped``, ``batch_id``
=======================  ===================================================================

Field names avoid those of Celery's own task state (``name``, ``state``, ``retries``,
``result``...): a monitor merges an event's fields into the task it tracks. With events off
the subscriber is not installed, so nothing is built or sent. The subscriber is installed at
``worker_init``, in the main process, and a prefork pool's processes inherit it when they
fork. An event raised outside the task's thread (a checkpoint written by the background writer)
goes to the one task running in the process, if there is exactly one. A failed send (broker
down) is logged and pauses sending for ``PAUSE_AFTER_FAILURE`` seconds in that process, so an
outage does not cost every event a connection attempt.

**The event clock.** Every Celery event carries ``clock``, a Lamport clock value taken from
``app.clock`` (``EventDispatcher._prepare_event`` calls ``app.clock.forward()``). A prefork pool
process is a fork of the worker: it starts with a *copy* of the worker's clock and forwards
only that copy, once per event it sends, while the worker's own clock moves on with every
``task-received``, ``task-started``, ``task-succeeded``, heartbeat and control message. So a
``task-progress`` sent from a pool process carried a clock far behind the events the worker
had sent before it (Flower showed ``Clock => 18`` while the worker was near 100).

The fix: ``SharedLamportClock`` replaces ``app.clock`` at ``worker_init``, before the pool
forks, so the worker and every pool process use one clock in shared memory. It is an array of
64-bit slots (``multiprocessing.RawArray``, an anonymous shared mapping a fork inherits): slot 0
is the worker's main process, slot ``i + 1`` the pool process of index ``i`` (billiard gives
each pool process an index below the pool's size; a replacement process takes the index of the
one that exited, so two live processes never share a slot; there are slots for twice the pool's
size, ``--autoscale``'s maximum included, so ``pool_grow`` has room). ``forward()`` reads the
largest slot, adds one and stores the result in the caller's own slot; the clock's ``value`` is
the largest slot. Every process thus starts from the largest value any process has sent, and an
event sent after another (in any process of the worker) gets a larger clock.

Why slots, and not one shared counter behind a ``multiprocessing`` lock: Celery SIGKILLs pool
processes (hard time limits, ``terminate``), and a process killed while holding a shared lock
would leave it held forever, freezing every event of the worker, its main loop included. Here
each slot has a single writer, so no lock is shared between processes; a per-process thread
lock (created again in a forked child) keeps the threads of one process from moving their slot
backwards. A process forked by a task's own code shares its parent's slot. The clock is shared
only with processes forked from the worker (Celery's prefork pool on Linux and macOS); a pool
that spawns its processes would give them a fresh clock.

Example (what a worker does at start, and what its pool processes see)::

    from celery import Celery

    app = Celery("jobs")
    app.clock = SharedLamportClock(processes=2, initial_value=app.clock.value)
    assert app.clock.forward() == 1 and app.clock.value == 1
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

import billiard.process
from celery import signals
from celery._state import get_current_task
from kombu.clocks import LamportClock

from taskkit.recovery import events

__all__ = [
    "EVENT_TYPES",
    "PAUSE_AFTER_FAILURE",
    "SharedLamportClock",
    "celery_event",
    "install_shared_clock",
]

logger = logging.getLogger("taskkit.tasks")

#: The custom event types taskkit sends (besides ``task-progress``).
EVENT_TYPES = (
    "task-inner-retry",
    "task-dead-lettered",
    "task-lease-takeover",
    "task-checkpoint",
    "task-batch-summary",
)

#: Seconds a process sends no custom events after a send failed (the broker is down).
PAUSE_AFTER_FAILURE = 30.0


class SharedLamportClock(LamportClock):
    """A Lamport clock shared by a worker and the pool processes it forks (module docstring).

    ``processes`` is the largest number of pool processes (one slot each, plus the main
    process's). Drop-in for ``kombu.clocks.LamportClock``: ``value``, ``forward``, ``adjust``,
    ``sort_heap``; Celery may set ``mutex`` (its event loop does), which this clock does not use.

    Example::

        clock = SharedLamportClock(processes=2)
        clock.adjust(41)  # a message from another node carried clock 41
        assert clock.forward() == 43
    """

    def __init__(self, processes: int, initial_value: int = 0) -> None:
        self._slots = multiprocessing.RawArray(ctypes.c_uint64, max(1, processes) + 1)
        self._slots[0] = max(0, int(initial_value))
        self._own: int | None = 0
        self._lock = threading.Lock()
        self.mutex: Any = self._lock
        ref = weakref.ref(self)

        def forked() -> None:
            clock = ref()
            if clock is not None:
                clock._after_fork()

        os.register_at_fork(after_in_child=forked)

    def _after_fork(self) -> None:
        self._lock = threading.Lock()
        self._own = None  # found on first use: the pool process's index is set after the fork

    def _slot(self) -> int:
        own = self._own
        if own is None:
            own = self._own = _slot_of_this_process(len(self._slots))
        return own

    @property
    def value(self) -> int:
        """The largest value any process of the worker has sent."""
        return int(max(self._slots))

    @value.setter
    def value(self, value: int) -> None:
        with self._lock:
            self._slots[self._slot()] = max(0, int(value))

    def forward(self) -> int:
        with self._lock:
            value = int(max(self._slots)) + 1
            self._slots[self._slot()] = value
            return value

    def adjust(self, other: int) -> int:
        with self._lock:
            value = int(max(*self._slots, int(other))) + 1
            self._slots[self._slot()] = value
            return value

    def __repr__(self) -> str:
        return f"<SharedLamportClock: {self.value}>"


def _slot_of_this_process(slots: int) -> int:
    """Slot ``index + 1`` for billiard's pool process of ``index``; 0 (the main process's)
    for a process that is not a pool process or has an index beyond the slots."""
    index = getattr(billiard.process.current_process(), "index", None)
    if isinstance(index, int) and 0 <= index < slots - 1:
        return index + 1
    return 0


def install_shared_clock(app: Any, processes: int) -> SharedLamportClock:
    """Replace ``app.clock`` by a ``SharedLamportClock`` that continues from its value; done at
    ``worker_init``, before the pool forks and before the worker's own event dispatcher, gossip
    and control consumers take ``app.clock``.

    Example::

        from celery import Celery

        app = Celery("jobs")
        clock = install_shared_clock(app, processes=4)
        assert app.clock is clock
    """
    clock = app.clock
    if isinstance(clock, SharedLamportClock):
        return clock
    shared = SharedLamportClock(processes, initial_value=getattr(clock, "value", 0))
    app.clock = shared
    return shared


# -- custom events ---------------------------------------------------------------------------


def _plain(value: object) -> object:
    """``value`` if JSON has it as is, else its text (ids can be UUIDs or other objects)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def celery_event(event: events.Event) -> tuple[str, str | None, dict[str, Any]] | None:
    """The Celery event for a taskkit event: ``(type, task id or None, fields)``, or None when
    the event has no Celery counterpart (most of them: successes, outer retries Celery reports
    itself, breaker changes...).

    Example::

        from taskkit.recovery import events

        ev = events.TaskAttemptEnded("jobs.fit", "id-1", "inner", 1, "retry", "OSError", 0.5)
        assert celery_event(ev) == (
            "task-inner-retry",
            "id-1",
            {"attempt": 1, "error_type": "OSError", "wait": 0.5},
        )
    """
    if isinstance(event, events.TaskAttemptEnded):
        if event.layer != "inner" or event.outcome != "retry":
            return None
        fields: dict[str, Any] = {
            "attempt": event.attempt,
            "error_type": event.error_type,
            "wait": event.wait,
        }
        return "task-inner-retry", event.task_id, fields
    if isinstance(event, events.DeadLettered):
        fields = {
            "letter_id": _plain(event.letter_id),
            "error_type": event.error_type,
            "batch_id": event.batch_id,
            "item_key": _plain(event.item_key),
        }
        return "task-dead-lettered", event.task_id, fields
    if isinstance(event, events.LeaseTakenOver):
        fields = {
            "key": event.key,
            "previous_owner": event.previous_owner,
            "fencing_token": event.fencing_token,
        }
        return "task-lease-takeover", event.task_id, fields
    if isinstance(event, events.CheckpointSaved):
        fields = {
            "step": event.step,
            "bytes": event.size,
            "seconds": event.seconds,
            "is_best": event.is_best,
            "run_id": _plain(event.run_id),
        }
        return "task-checkpoint", None, fields
    if isinstance(event, events.BatchChunkFinished):
        fields = {
            "done": event.done,
            "dead": event.dead,
            "skipped": event.skipped,
            "batch_id": event.batch_id,
        }
        return "task-batch-summary", event.task_id, fields
    return None


class _Sink:
    """Sends the Celery events of taskkit events, from the task running in this process."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.unsubscribe: Callable[[], None] | None = None
        #: Tasks running in this process (task_prerun/postrun), for events from other threads:
        #: (app, task id, worker hostname).
        self.running: list[tuple[Any, str, str | None]] = []
        self.paused_until = 0.0

    def __call__(self, event: events.Event) -> None:
        found = celery_event(event)
        if found is None:
            return
        kind, task_id, fields = found
        task = get_current_task()
        if task is not None and not task.request.called_directly and task.request.id:
            app, request_id, hostname = task.app, task.request.id, task.request.hostname
        elif len(self.running) == 1:
            app, request_id, hostname = self.running[0]
        else:
            return  # no task to file it under
        if self.paused_until and self.clock() < self.paused_until:
            return
        try:
            with app.events.default_dispatcher(hostname=hostname) as dispatcher:
                dispatcher.send(kind, uuid=task_id or request_id, retry=False, **fields)
        except Exception as exc:
            self.paused_until = self.clock() + PAUSE_AFTER_FAILURE
            logger.info(
                "taskkit: could not send a %s event; no custom events from this process for "
                "%g s: %s",
                kind,
                PAUSE_AFTER_FAILURE,
                exc,
            )


_sink = _Sink()


def _is_taskkit_app(app: Any) -> bool:
    from taskkit.tasks._app import LEASE_SETTING  # noqa: PLC0415  (_app imports this module)

    return app is not None and app.conf.get(LEASE_SETTING) is not None


def _pool_processes(worker: Any) -> int:
    """Slots for the pool processes of ``worker``: twice the most it starts (``--autoscale``'s
    maximum included), for processes added later with ``celery control pool_grow``."""
    sizes: list[object] = [getattr(worker, "concurrency", None)]
    autoscale = (getattr(worker, "options", None) or {}).get("autoscale")
    if isinstance(autoscale, str):
        autoscale = autoscale.partition(",")[0]
        sizes.append(int(autoscale) if autoscale.isdigit() else None)
    elif isinstance(autoscale, (list, tuple)) and autoscale:
        sizes.append(autoscale[0])
    known = [size for size in sizes if isinstance(size, int) and size > 0]
    return 2 * (max(known) if known else (os.cpu_count() or 1))


@signals.worker_init.connect(weak=False)
def _at_worker_init(sender: Any = None, **_: Any) -> None:
    app = getattr(sender, "app", None)
    if not _is_taskkit_app(app):
        return
    install_shared_clock(app, _pool_processes(sender))
    if getattr(sender, "task_events", False) and _sink.unsubscribe is None:
        _sink.unsubscribe = events.subscribe(_sink)


@signals.worker_shutdown.connect(weak=False)
def _at_worker_shutdown(sender: Any = None, **_: Any) -> None:
    unsubscribe, _sink.unsubscribe = _sink.unsubscribe, None
    if unsubscribe is not None:
        unsubscribe()


@signals.task_prerun.connect(weak=False)
def _task_started(
    sender: Any = None, task_id: str | None = None, task: Any = None, **_: Any
) -> None:
    if _sink.unsubscribe is not None and task is not None and task_id:
        entry = (task.app, task_id, getattr(task.request, "hostname", None))
        _sink.running = [*_sink.running, entry]


@signals.task_postrun.connect(weak=False)
def _task_ended(sender: Any = None, task_id: str | None = None, **_: Any) -> None:
    if _sink.running:
        _sink.running = [entry for entry in _sink.running if entry[1] != task_id]
