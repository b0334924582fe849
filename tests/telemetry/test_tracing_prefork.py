"""docs/tracing.md's recipe in a real prefork worker subprocess: a tracer provider and
``CeleryInstrumentor`` set up in ``worker_process_init``, spans exported to a file per pool
process (the SDK's ``ConsoleSpanExporter``, one JSON line per span).

This module is also the worker's app (``celery -A tests.telemetry.test_tracing_prefork``).
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Iterator
from typing import Any

import pytest
from celery.signals import worker_process_init

from taskkit.tasks import ResilientTask
from tests._support.apps import redis_test_app
from tests._support.workers import WorkerProcess, wait_for

#: The folder the pool processes write their spans to (set for the worker subprocess only).
SPANS_DIR = "TASKKIT_TEST_SPANS_DIR"

kit = redis_test_app("otelp")
app = kit.app


@app.task(base=ResilientTask, bind=True, max_retries=3)
def flaky(self: ResilientTask, name: str, failures: int) -> int:
    """Fail the first ``failures`` calls with a transient ConnectionError, then succeed."""
    n = int(kit.counter.incr(kit.key("calls", name)))
    kit.counter.expire(kit.key("calls", name), 3600)
    if n <= failures:
        raise ConnectionError(f"call {n} of {name} fails")
    return n


@worker_process_init.connect(weak=False)
def _start_tracing(**_: Any) -> None:
    folder = os.environ.get(SPANS_DIR)
    if not folder:
        return
    from opentelemetry import trace
    from opentelemetry.instrumentation.celery import CeleryInstrumentor
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SimpleSpanProcessor

    out = (pathlib.Path(folder) / f"spans-{os.getpid()}.jsonl").open("a", buffering=1)
    exporter = ConsoleSpanExporter(out=out, formatter=lambda span: span.to_json(indent=None) + "\n")
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    CeleryInstrumentor().instrument()


@pytest.fixture(scope="module")
def traced_worker(
    redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[pathlib.Path]:
    folder = tmp_path_factory.mktemp("spans")
    worker = WorkerProcess(
        "otel-prefork",
        folder,
        app=__name__,
        queue=kit.queue,
        concurrency=2,
        env={SPANS_DIR: str(folder), "TASKKIT_TRACING": "true"},
    )
    try:
        worker.wait_ready()
        yield folder
    finally:
        worker.stop()


def read_spans(folder: pathlib.Path) -> list[dict[str, Any]]:
    spans = []
    for path in folder.glob("spans-*.jsonl"):
        for line in path.read_text().splitlines():
            if line.strip():
                spans.append(json.loads(line))
    return spans


def test_a_prefork_worker_exports_one_attempt_span_per_call_under_its_run_span(traced_worker):
    result = flaky.delay("prefork", 2)
    assert result.get(timeout=60) == 3

    def attempts_and_run() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        spans = read_spans(traced_worker)
        attempts = [s for s in spans if s["attributes"].get("celery.task_id") == result.id]
        runs = [
            s
            for s in spans
            if s["name"] == f"run/{flaky.name}" and result.id in s["attributes"].values()
        ]
        return attempts, runs

    wait_for(lambda: attempts_and_run()[1], 30, "the run span in the span files")
    attempts, (run,) = attempts_and_run()
    attempts.sort(key=lambda s: s["start_time"])
    assert [s["name"] for s in attempts] == [f"attempt/{flaky.name}"] * 3
    assert [s["parent_id"] for s in attempts] == [run["context"]["span_id"]] * 3
    assert {s["context"]["trace_id"] for s in attempts} == {run["context"]["trace_id"]}
    assert [s["attributes"]["retry.layer"] for s in attempts] == ["first", "inner", "inner"]
    assert [s["attributes"]["retry.attempt"] for s in attempts] == [1, 2, 3]
    assert [s["status"]["status_code"] for s in attempts] == ["ERROR", "ERROR", "UNSET"]
    assert [e["name"] for s in attempts for e in s["events"]] == ["exception", "exception"]
