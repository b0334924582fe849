"""OpenTelemetry spans per attempt (``taskkit.telemetry.tracing``), read from the SDK's
in-memory exporter: the span itself, then a real in-process Celery worker with
opentelemetry-instrumentation-celery's ``CeleryInstrumentor`` on (Redis broker)."""

from __future__ import annotations

import collections
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.instrumentation.celery import CeleryInstrumentor
from opentelemetry.instrumentation.celery.utils import MESSAGING_MESSAGE_ID
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from taskkit.config import reset_settings
from taskkit.errors import CircuitBreakerError
from taskkit.recovery import CircuitBreaker, events
from taskkit.tasks import ResilientTask
from taskkit.telemetry import tracing
from tests._support.apps import redis_test_app
from tests._support.workers import in_process_worker, wait_for

_PROVIDER_LOCK = threading.Lock()


def sdk_provider() -> TracerProvider:
    """The process's SDK tracer provider, set once (OpenTelemetry refuses to replace it)."""
    with _PROVIDER_LOCK:
        provider = trace.get_tracer_provider()
        if not isinstance(provider, TracerProvider):
            trace.set_tracer_provider(TracerProvider())
            provider = trace.get_tracer_provider()
    assert isinstance(provider, TracerProvider), "another SDK provider was set in this process"
    return provider


@pytest.fixture
def exporter(monkeypatch: pytest.MonkeyPatch) -> Iterator[InMemorySpanExporter]:
    """Spans finished during the test, with tracing on (the default setting)."""
    monkeypatch.delenv("TASKKIT_TRACING", raising=False)
    reset_settings()
    memory = InMemorySpanExporter()
    sdk_provider().add_span_processor(SimpleSpanProcessor(memory))
    yield memory
    memory.shutdown()  # a processor cannot be removed: a shut exporter keeps nothing more
    tracing._forget_subscription()  # leave the event bus as this test found it
    reset_settings()


def by_name(spans: Any, prefix: str) -> list[ReadableSpan]:
    return sorted(
        (span for span in spans if span.name.startswith(prefix)),
        key=lambda span: span.start_time or 0,
    )


# -- the span ----------------------------------------------------------------------------------


def test_an_attempt_span_is_a_child_of_the_current_span_and_current_while_the_body_runs(
    exporter,
):
    tracer = trace.get_tracer("test")
    with tracer.start_as_current_span("run/billing.charge") as parent:
        with tracing.attempt_span("billing.charge", "id-1", outer_attempt=1, inner_attempt=1):
            inside = trace.get_current_span()
        assert trace.get_current_span() is parent

    (attempt,) = by_name(exporter.get_finished_spans(), "attempt/")
    assert attempt.name == "attempt/billing.charge"
    assert inside.get_span_context().span_id == attempt.context.span_id
    assert attempt.parent is not None
    assert attempt.parent.span_id == parent.get_span_context().span_id
    assert attempt.context.trace_id == parent.get_span_context().trace_id
    assert dict(attempt.attributes or {}) == {
        "celery.task_name": "billing.charge",
        "celery.task_id": "id-1",
        "retry.layer": "first",
        "retry.attempt": 1,
        "retry.outer_attempt": 1,
    }
    assert attempt.status.status_code is StatusCode.UNSET
    assert attempt.instrumentation_scope is not None
    assert attempt.instrumentation_scope.name == tracing.TRACER_NAME


@pytest.mark.parametrize(
    ("outer", "inner", "layer"),
    [
        (1, 1, "first"),
        (1, 2, "inner"),
        (1, 3, "inner"),
        (2, 1, "outer"),
        (4, 1, "outer"),
        (2, 2, "inner"),
    ],
)
def test_the_layer_names_what_started_the_attempt(exporter, outer, inner, layer):
    assert tracing.layer_of(outer_attempt=outer, inner_attempt=inner) == layer
    with tracing.attempt_span("t", "id", outer_attempt=outer, inner_attempt=inner):
        pass
    (span,) = exporter.get_finished_spans()
    assert span.attributes is not None
    assert span.attributes["retry.layer"] == layer
    assert span.attributes["retry.attempt"] == inner
    assert span.attributes["retry.outer_attempt"] == outer


def test_a_body_that_raises_ends_its_span_with_the_exception_and_status_error(exporter):
    with (
        pytest.raises(ConnectionError, match="refused"),
        tracing.attempt_span("t", "id", outer_attempt=1, inner_attempt=1),
    ):
        raise ConnectionError("refused")

    (span,) = exporter.get_finished_spans()
    assert span.status.status_code is StatusCode.ERROR
    assert span.status.description == "ConnectionError: refused"
    (event,) = span.events
    assert event.name == "exception"
    assert event.attributes is not None
    assert event.attributes["exception.type"] == "ConnectionError"
    assert event.attributes["exception.message"] == "refused"
    assert "Traceback" in str(event.attributes["exception.stacktrace"])


def test_a_password_in_an_error_message_never_reaches_the_span(exporter):
    with (
        pytest.raises(ConnectionError),
        tracing.attempt_span("t", "id", outer_attempt=1, inner_attempt=1),
    ):
        raise ConnectionError("redis://:s3cret-pw@cache:6379/0 refused")

    (span,) = exporter.get_finished_spans()
    text = span.to_json()
    assert "s3cret-pw" not in text
    assert span.status.description == "ConnectionError: redis://:***@cache:6379/0 refused"
    (event,) = span.events
    assert event.attributes is not None
    assert event.attributes["exception.message"] == "redis://:***@cache:6379/0 refused"
    assert "redis://:***@cache" in str(event.attributes["exception.stacktrace"])


def test_a_breaker_that_opens_during_the_attempt_sets_circuit_state_even_under_a_child_span(
    exporter,
):
    breaker = CircuitBreaker(failure_threshold=2, name="pricing", expected_exception=OSError)

    def down() -> None:
        raise OSError("down")

    with tracing.attempt_span("t", "id", outer_attempt=1, inner_attempt=1):
        with trace.get_tracer("test").start_as_current_span("http GET /price"):
            for _ in range(2):
                with pytest.raises(OSError, match="down"):
                    breaker.call(down)
        breaker.reset()  # open -> closed: the last change wins the attribute

    (attempt,) = by_name(exporter.get_finished_spans(), "attempt/")
    assert attempt.attributes is not None
    assert attempt.attributes["circuit.state"] == "closed"
    assert attempt.attributes["circuit.name"] == "pricing"
    changes = [dict(e.attributes or {}) for e in attempt.events]
    assert changes == [
        {"circuit.name": "pricing", "circuit.old_state": "closed", "circuit.new_state": "open"},
        {"circuit.name": "pricing", "circuit.old_state": "open", "circuit.new_state": "closed"},
    ]
    assert attempt.status.status_code is StatusCode.UNSET  # the body handled the errors


def test_a_breaker_rejection_that_escapes_the_body_sets_circuit_state(exporter):
    breaker = CircuitBreaker(failure_threshold=1, recovery_timeout=60, name="ml-api")
    with pytest.raises(ZeroDivisionError):
        breaker.call(lambda: 1 / 0)  # opened before the attempt: no transition inside it

    with (
        pytest.raises(CircuitBreakerError),
        tracing.attempt_span("t", "id", outer_attempt=2, inner_attempt=1),
    ):
        breaker.call(lambda: 1)

    (span,) = exporter.get_finished_spans()
    assert span.attributes is not None
    assert span.attributes["circuit.state"] == "open"
    assert span.attributes["circuit.name"] == "ml-api"
    assert span.status.status_code is StatusCode.ERROR


def test_breaker_changes_outside_an_attempt_touch_no_span(exporter):
    breaker = CircuitBreaker(failure_threshold=1, name="outside")
    with tracing.attempt_span("t", "id", outer_attempt=1, inner_attempt=1):
        pass  # subscribes taskkit's breaker-state handler
    with trace.get_tracer("test").start_as_current_span("plain"), pytest.raises(KeyError):
        breaker.call(lambda: {}["x"])
    assert breaker.state == "open"
    for span in exporter.get_finished_spans():
        assert "circuit.state" not in (span.attributes or {})
        assert not span.events


def test_no_subscriber_until_the_first_attempt_span_and_none_after_forgetting(exporter):
    tracing._forget_subscription()
    before = events.active()
    with tracing.attempt_span("t", "id", outer_attempt=1, inner_attempt=1):
        assert events.active()
    tracing._forget_subscription()
    assert events.active() is before


def test_tracing_off_in_the_settings(exporter, monkeypatch):
    monkeypatch.setenv("TASKKIT_TRACING", "false")
    reset_settings()
    try:
        assert tracing.enabled() is False
    finally:
        monkeypatch.delenv("TASKKIT_TRACING")
        reset_settings()
    assert tracing.enabled() is True


def test_without_opentelemetry_tracing_is_off_and_the_span_does_nothing(exporter, monkeypatch):
    for name in [m for m in sys.modules if m == "opentelemetry" or m.startswith("opentelemetry.")]:
        monkeypatch.setitem(sys.modules, name, None)  # import fails like an absent package
    tracing._available.cache_clear()
    try:
        assert tracing.enabled() is False
        with tracing.attempt_span("t", "id", outer_attempt=1, inner_attempt=1):
            ran = True
        assert ran
        tracing.record_circuit_state("b", "open")  # no attempt span: nothing to do
    finally:
        monkeypatch.undo()
        tracing._available.cache_clear()
    assert tracing.enabled() is True


NO_PROVIDER_YET = """
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from taskkit.recovery import events
from taskkit.telemetry import tracing

assert not tracing.enabled()  # opentelemetry installed, tracing on, but no provider set
with tracing.attempt_span("t", "id", outer_attempt=1, inner_attempt=1):
    assert not trace.get_current_span().is_recording()
assert not events.active()  # nothing subscribed either
trace.set_tracer_provider(TracerProvider())  # as a worker_process_init handler would
assert tracing.enabled()
with tracing.attempt_span("t", "id", outer_attempt=1, inner_attempt=1):
    assert trace.get_current_span().is_recording()
print("ok")
"""


def test_with_no_tracer_provider_set_no_span_is_made_until_one_is():
    env = {**os.environ, "TASKKIT_TRACING": "true"}
    env.pop("OTEL_PYTHON_TRACER_PROVIDER", None)
    done = subprocess.run(
        [sys.executable, "-c", NO_PROVIDER_YET],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


# -- a real worker with CeleryInstrumentor -----------------------------------------------------

kit = redis_test_app("otel")
calls: collections.Counter[str] = collections.Counter()


@kit.app.task(base=ResilientTask, bind=True, max_retries=3)
def flaky(self: ResilientTask, name: str, failures: int) -> int:
    """Fail the first ``failures`` calls with a transient ConnectionError, then succeed."""
    calls[name] += 1
    if calls[name] <= failures:
        raise ConnectionError(f"call {calls[name]} of {name} fails")
    return calls[name]


@pytest.fixture(scope="module")
def instrumented_worker(redis_url: str) -> Iterator[None]:
    instrumentor = CeleryInstrumentor()
    instrumentor.instrument(tracer_provider=sdk_provider())
    try:
        with in_process_worker(kit.app):
            yield
    finally:
        instrumentor.uninstrument()


#: Where a span keeps its task id: taskkit's attempt spans, the instrumentation's run spans.
TASK_ID_KEYS = ("celery.task_id", MESSAGING_MESSAGE_ID)


def spans_of(exporter: InMemorySpanExporter, task_id: str, runs: int) -> list[ReadableSpan]:
    """The finished spans of ``task_id`` once its ``runs`` run spans ended (the run span ends
    after the result is stored, so ``get()`` may return first)."""

    def of_task() -> list[ReadableSpan]:
        return [
            span
            for span in exporter.get_finished_spans()
            if task_id in {(span.attributes or {}).get(key) for key in TASK_ID_KEYS}
        ]

    wait_for(lambda: len(by_name(of_task(), "run/")) >= runs, 30, f"{runs} run span(s)")
    return of_task()


def test_three_attempts_of_one_delivery_are_three_spans_under_celerys_run_span(
    instrumented_worker, exporter
):
    result = flaky.delay("inner", 2)
    assert result.get(timeout=30) == 3

    spans = spans_of(exporter, result.id, runs=1)
    (run,) = by_name(spans, "run/")
    assert run.name == f"run/{flaky.name}"
    attempts = by_name(spans, "attempt/")
    assert len(attempts) == 3
    for attempt in attempts:
        assert attempt.name == f"attempt/{flaky.name}"
        assert attempt.parent is not None
        assert attempt.parent.span_id == run.context.span_id
        assert attempt.context.trace_id == run.context.trace_id
    assert [dict(a.attributes or {}) for a in attempts] == [
        {
            "celery.task_name": flaky.name,
            "celery.task_id": result.id,
            "retry.layer": layer,
            "retry.attempt": n,
            "retry.outer_attempt": 1,
        }
        for n, layer in [(1, "first"), (2, "inner"), (3, "inner")]
    ]
    assert [a.status.status_code for a in attempts] == [
        StatusCode.ERROR,
        StatusCode.ERROR,
        StatusCode.UNSET,
    ]
    assert [e.name for a in attempts[:2] for e in a.events] == ["exception", "exception"]


def test_a_redelivery_after_the_inner_ladder_gave_up_starts_with_an_outer_attempt(
    instrumented_worker, exporter
):
    result = flaky.delay("outer", 4)  # 3 inner attempts fail, the redelivery fails once more
    assert result.get(timeout=30) == 5

    spans = spans_of(exporter, result.id, runs=2)
    runs = by_name(spans, "run/")
    attempts = by_name(spans, "attempt/")
    layers = (
        [(a.attributes or {}).get("retry.outer_attempt", 0) for a in attempts],
        [(a.attributes or {}).get("retry.layer") for a in attempts],
    )
    assert layers == ([1, 1, 1, 2, 2], ["first", "inner", "inner", "outer", "inner"])
    parents = [a.parent.span_id if a.parent else None for a in attempts]
    assert parents == [runs[0].context.span_id] * 3 + [runs[1].context.span_id] * 2
    # one trace: the re-queue's publish span hangs under the first delivery's run span
    assert {span.context.trace_id for span in spans} == {runs[0].context.trace_id}


def test_with_tracing_off_the_worker_makes_no_attempt_spans(
    instrumented_worker, exporter, monkeypatch
):
    monkeypatch.setenv("TASKKIT_TRACING", "false")
    reset_settings()
    result = flaky.delay("off", 1)
    assert result.get(timeout=30) == 2
    spans = spans_of(exporter, result.id, runs=1)
    assert by_name(spans, "attempt/") == []
