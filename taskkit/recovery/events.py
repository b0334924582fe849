"""Events that the recovery primitives emit, for metrics and alerting.

Subscribers are plain callables. They are called synchronously, in the thread that caused the
event. The recovery primitives emit only on the unhappy path (a retry, a give-up, a breaker
changing state), never for a call that simply succeeds; taskkit's Celery tasks, checkpoints and
dead letters emit the task-level events below (one per attempt, checkpoint, dead letter...),
and only while someone is subscribed (``active()``). A subscriber that raises is logged and
ignored: observing a failure must never cause one. Events are plain slotted dataclasses, not
frozen ones (a frozen dataclass costs four times as much to build, on a path taken per task
attempt): treat them as read-only.

taskkit's metrics, structured logs, alert notifiers and Celery custom events are subscribers
of this one bus (``taskkit.telemetry``, ``taskkit.tasks``).

Example::

    from taskkit.recovery import events

    def count(event: events.Event) -> None:
        if isinstance(event, events.CircuitStateChanged) and event.new == "open":
            alert(f"breaker {event.name} opened")

    unsubscribe = events.subscribe(count)
    ...
    unsubscribe()
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from taskkit._utils import call_hook

__all__ = [
    "BatchChunkFinished",
    "CheckpointSaved",
    "CircuitStateChanged",
    "DeadLettered",
    "EpochFinished",
    "Event",
    "GaveUp",
    "LeaseTakenOver",
    "RetryScheduled",
    "RunResumed",
    "TaskAttemptEnded",
    "TaskFailed",
    "active",
    "emit",
    "subscribe",
]


@dataclass(slots=True)
class RetryScheduled:
    """An attempt failed and another one follows after ``wait`` seconds."""

    function: str
    attempt: int
    max_attempts: int
    wait: float
    error: BaseException | None


@dataclass(slots=True)
class GaveUp:
    """No more attempts: ``reason`` says why (attempts, deadline, budget, permanent error...)."""

    function: str
    attempts: int
    reason: str
    error: BaseException | None


@dataclass(slots=True)
class CircuitStateChanged:
    """A breaker moved from ``old`` to ``new`` (``"closed"``, ``"open"``, ``"half_open"``)."""

    name: str
    old: str
    new: str


@dataclass(slots=True)
class TaskAttemptEnded:
    """One attempt of a taskkit task ended.

    ``layer`` is ``"inner"`` (one call of the task body inside the worker's in-process retry)
    or ``"outer"`` (one delivery of the task by the broker). ``outcome`` is ``"success"``,
    ``"retry"`` (another attempt of the same layer follows after ``wait`` seconds; for the
    inner layer, an exhausted inner ladder that escalates to the outer one is ``"escalated"``)
    or ``"failure"`` (no attempt follows). ``attempt`` counts from 1 within its layer.
    """

    task: str
    task_id: str
    layer: str
    attempt: int
    outcome: str
    error_type: str | None = None
    wait: float | None = None
    run_id: object = None


@dataclass(slots=True)
class TaskFailed:
    """A taskkit task failed for good (``error_type`` is the exception's class name)."""

    task: str
    task_id: str
    error_type: str
    attempts: int
    run_id: object = None


@dataclass(slots=True)
class DeadLettered:
    """A failed task or batch item was stored in the dead-letter queue as ``letter_id``."""

    task: str
    letter_id: object
    error_type: str
    task_id: str | None = None
    batch_id: str | None = None
    item_key: str | None = None


@dataclass(slots=True)
class LeaseTakenOver:
    """A task took over the lease ``key`` that ``previous_owner`` held and let lapse."""

    task: str
    task_id: str
    key: str
    previous_owner: str | None
    fencing_token: int
    run_id: object = None


@dataclass(slots=True)
class CheckpointSaved:
    """A checkpoint of ``step`` is durable: ``size`` bytes written in ``seconds``."""

    run_id: object
    step: int
    size: int
    seconds: float
    is_best: bool
    task: str | None = None


@dataclass(slots=True)
class BatchChunkFinished:
    """A batch chunk ended: items ``done`` now, ``dead`` (dead-lettered) and ``skipped``
    (already done by an earlier delivery, found in the ledger)."""

    task: str
    task_id: str
    batch_id: str | None
    done: int
    dead: int
    skipped: int


@dataclass(slots=True)
class EpochFinished:
    """A training run finished ``epoch`` (0-based) in ``seconds``."""

    task: str
    run_id: object
    epoch: int
    seconds: float


@dataclass(slots=True)
class RunResumed:
    """A training run resumed at ``epoch`` from its checkpoint of ``epoch - 1``."""

    task: str
    run_id: object
    task_id: str | None
    epoch: int


Event = (
    RetryScheduled
    | GaveUp
    | CircuitStateChanged
    | TaskAttemptEnded
    | TaskFailed
    | DeadLettered
    | LeaseTakenOver
    | CheckpointSaved
    | BatchChunkFinished
    | EpochFinished
    | RunResumed
)

_subscribers: list[Callable[[Event], object]] = []


def subscribe(handler: Callable[[Event], object]) -> Callable[[], None]:
    """Call ``handler(event)`` for every event; return a function that unsubscribes it."""
    _subscribers.append(handler)

    def unsubscribe() -> None:
        if handler in _subscribers:
            _subscribers.remove(handler)

    return unsubscribe


def active() -> bool:
    """Whether anyone is subscribed (so callers can skip building an event)."""
    return bool(_subscribers)


def emit(event: Event) -> None:
    """Deliver ``event`` to every subscriber, isolating their failures."""
    for handler in tuple(_subscribers):
        call_hook(handler, event)
