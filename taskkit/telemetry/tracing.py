"""OpenTelemetry spans, one per attempt of a taskkit task (``taskkit[otel]``).

``ResilientTask`` wraps each call of a task's body (each inner attempt of each delivery) in
``attempt_span(...)`` when ``enabled()``. The span is named ``attempt/{task}`` and starts under
the current context, so with ``opentelemetry-instrumentation-celery``'s ``CeleryInstrumentor``
on it is a child of that instrumentation's ``run/{task}`` span (one ``run/`` span per
delivery, one ``attempt/`` span per call of the body inside it). Spans go wherever the
process's tracer provider exports them; taskkit installs no provider and no exporter.

Attributes of an ``attempt/{task}`` span:

- ``celery.task_name``, ``celery.task_id``;
- ``retry.attempt``: the inner attempt, 1, 2, ... within this delivery;
- ``retry.outer_attempt``: the delivery, ``request.retries + 1``;
- ``retry.layer``: which layer of the retry ladder started this attempt: ``"first"`` (the very
  first call: first delivery, first inner attempt), ``"inner"`` (the worker's in-process retry
  called the body again: ``retry.attempt > 1``) or ``"outer"`` (the first call of a
  redelivery after an outer retry: ``retry.attempt == 1`` and ``retry.outer_attempt > 1``);
- ``circuit.state`` and ``circuit.name`` when a ``CircuitBreaker`` changed state during the
  attempt (the last change: ``"closed"``, ``"open"``, ``"half_open"``) or rejected the call
  that the body let escape (``CircuitBreakerError``: ``"open"`` or ``"half_open"``); every
  transition is also a span event ``circuit.state_change`` (``circuit.name``,
  ``circuit.old_state``, ``circuit.new_state``), so two breakers in one attempt both show.

A body that raises ends its span with status ERROR and the exception recorded (an ``exception``
span event with type, message and stack trace, URL passwords masked as in taskkit's logs);
Celery's control flow (``Retry``, ``Ignore``, ``Reject``) raised from a body is recorded the
same way, since the attempt did not complete.

Cost: with tracing off (``TASKKIT_TRACING=false``, or opentelemetry not installed) ``enabled()``
is two cached look-ups, no span is made and opentelemetry is not even imported; with no tracer
provider set in the process, one more look-up, and no span either. With spans made, breakers'
state changes reach them through one subscriber of ``taskkit.recovery.events``, added at the
first attempt span; it does work only for ``CircuitStateChanged`` events, which breakers emit
only on a transition. A breaker call that changes nothing costs the span nothing. The recovery
primitives (``retry``, ``CircuitBreaker``, ``timeout``...) make no spans of their own.

Example::

    from taskkit.telemetry import tracing

    if tracing.enabled():
        with tracing.attempt_span("billing.charge", task_id, outer_attempt=1, inner_attempt=2):
            charge()
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import threading
import traceback
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from taskkit._utils import mask_password
from taskkit.config import get_settings
from taskkit.errors import CircuitBreakerError
from taskkit.recovery import events

if TYPE_CHECKING:
    from opentelemetry.trace import Span, Tracer

__all__ = ["TRACER_NAME", "attempt_span", "enabled", "layer_of", "record_circuit_state"]

#: The instrumentation scope name of taskkit's spans (the tracer's name).
TRACER_NAME = "taskkit"

_NO_PROVIDER: tuple[type, ...] = ()
_provider_seen = False

_subscribe_lock = threading.Lock()
#: Unsubscribes the breaker-state subscriber once it is added (at the first attempt span).
_unsubscribe: Callable[[], None] | None = None
#: The attempt span of the attempt running in this context (a child span of the body's own,
#: an HTTP client's say, may be the current span when a breaker changes state).
_attempt: contextvars.ContextVar[Span | None] = contextvars.ContextVar(
    "taskkit_attempt_span", default=None
)


@functools.cache
def _available() -> bool:
    global _NO_PROVIDER
    try:
        from opentelemetry import trace  # noqa: PLC0415 - imported only when tracing is on
    except ImportError:
        return False
    _NO_PROVIDER = (trace.ProxyTracerProvider, trace.NoOpTracerProvider)
    return True


def enabled() -> bool:
    """Whether taskkit makes spans: the ``tracing`` setting on, opentelemetry-api importable and
    a tracer provider set in this process (without one, spans would go nowhere).

    Cheap (the import check is cached, and so are the settings until ``reset_settings()``); a
    provider set later, in ``worker_process_init`` say, is seen by the next call.

    Example::

        if tracing.enabled():
            ...
    """
    return get_settings().tracing and _available() and _provider_set()


def _provider_set() -> bool:
    global _provider_seen
    if _provider_seen:  # a provider, once set, is never unset
        return True
    from opentelemetry import trace  # noqa: PLC0415 - loaded by _available() already

    # Before set_tracer_provider (or OTEL_PYTHON_TRACER_PROVIDER) the API hands out a proxy
    # whose spans record nothing.
    _provider_seen = not isinstance(trace.get_tracer_provider(), _NO_PROVIDER)
    return _provider_seen


def layer_of(*, outer_attempt: int, inner_attempt: int) -> str:
    """The ``retry.layer`` of an attempt: ``"inner"``, ``"outer"`` or ``"first"``.

    Example::

        layer_of(outer_attempt=1, inner_attempt=1)  # "first"
        layer_of(outer_attempt=3, inner_attempt=2)  # "inner"
        layer_of(outer_attempt=2, inner_attempt=1)  # "outer"
    """
    if inner_attempt > 1:
        return "inner"
    if outer_attempt > 1:
        return "outer"
    return "first"


def _tracer() -> Tracer:
    from opentelemetry import trace  # noqa: PLC0415 - loaded by _available() already

    # Not cached: the global tracer provider may be set after the first call, and
    # get_tracer returns a proxy that follows it anyway; this is a dict look-up.
    return trace.get_tracer(TRACER_NAME)


def record_circuit_state(name: str, state: str, *, old: str | None = None) -> None:
    """Note on the current attempt span that breaker ``name`` is now in ``state``.

    Sets ``circuit.state`` and ``circuit.name`` (the last call wins) and, when ``old`` is
    given, adds a ``circuit.state_change`` span event. Does nothing outside an attempt span
    or when opentelemetry is not installed. taskkit calls it for every ``CircuitStateChanged``
    event while tracing is on; call it yourself for a breaker of your own making.

    Example::

        record_circuit_state("pricing", "open", old="closed")
    """
    span = _attempt.get()
    if span is None or not span.is_recording():
        return
    span.set_attribute("circuit.state", state)
    span.set_attribute("circuit.name", name)
    if old is not None:
        span.add_event(
            "circuit.state_change",
            {"circuit.name": name, "circuit.old_state": old, "circuit.new_state": state},
        )


def _on_event(event: events.Event) -> None:
    if isinstance(event, events.CircuitStateChanged):
        record_circuit_state(event.name, event.new, old=event.old)


def _subscribe_once() -> None:
    global _unsubscribe
    if _unsubscribe is not None:
        return
    with _subscribe_lock:
        if _unsubscribe is None:
            _unsubscribe = events.subscribe(_on_event)


def _forget_subscription() -> None:
    """Remove the breaker-state subscriber (tests: leave the event bus as they found it)."""
    global _unsubscribe
    with _subscribe_lock:
        if _unsubscribe is not None:
            _unsubscribe()
            _unsubscribe = None


@contextlib.contextmanager
def attempt_span(
    task: str, task_id: str, *, outer_attempt: int, inner_attempt: int
) -> Iterator[None]:
    """A span ``attempt/{task}`` around one call of a task's body, current while it runs.

    Records the exception and sets status ERROR when the body raises (the exception goes on).
    Call it only when ``enabled()``; without opentelemetry or a tracer provider it does nothing.

    Example::

        with attempt_span("billing.charge", "9f2c...", outer_attempt=1, inner_attempt=1):
            charge()
    """
    if not (_available() and _provider_set()):
        yield
        return
    from opentelemetry.trace import Status, StatusCode  # noqa: PLC0415 - as above

    _subscribe_once()
    attributes: dict[str, Any] = {
        "celery.task_name": task,
        "celery.task_id": task_id,
        "retry.layer": layer_of(outer_attempt=outer_attempt, inner_attempt=inner_attempt),
        "retry.attempt": inner_attempt,
        "retry.outer_attempt": outer_attempt,
    }
    with _tracer().start_as_current_span(
        f"attempt/{task}",
        attributes=attributes,
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        token = _attempt.set(span)
        try:
            yield
        except BaseException as exc:
            if isinstance(exc, CircuitBreakerError):
                span.set_attribute("circuit.state", exc.state)
                span.set_attribute("circuit.name", exc.name)
            message = mask_password(str(exc))
            span.record_exception(
                exc,
                {
                    "exception.message": message,
                    "exception.stacktrace": mask_password(
                        "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
                    ),
                },
                escaped=True,
            )
            span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {message}"[:200]))
            raise
        finally:
            _attempt.reset(token)
