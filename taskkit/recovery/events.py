"""Events that the recovery primitives emit, for metrics and alerting.

Subscribers are plain callables. They are called synchronously, in the thread that caused the
event, only on the unhappy path (a retry, a give-up, a breaker changing state), never for a call
that simply succeeds. A subscriber that raises is logged and ignored: observing a failure must
never cause one.

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
    "CircuitStateChanged",
    "Event",
    "GaveUp",
    "RetryScheduled",
    "active",
    "emit",
    "subscribe",
]


@dataclass(frozen=True, slots=True)
class RetryScheduled:
    """An attempt failed and another one follows after ``wait`` seconds."""

    function: str
    attempt: int
    max_attempts: int
    wait: float
    error: BaseException | None


@dataclass(frozen=True, slots=True)
class GaveUp:
    """No more attempts: ``reason`` says why (attempts, deadline, budget, permanent error...)."""

    function: str
    attempts: int
    reason: str
    error: BaseException | None


@dataclass(frozen=True, slots=True)
class CircuitStateChanged:
    """A breaker moved from ``old`` to ``new`` (``"closed"``, ``"open"``, ``"half_open"``)."""

    name: str
    old: str
    new: str


Event = RetryScheduled | GaveUp | CircuitStateChanged

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
