"""A worker subprocess with ``TASKKIT_LOG_FORMAT=json``: its log file, parsed line by line, has
one JSON record per event of a task that retries inner and outer and then fails for good, every
taskkit record names its task, Celery's own records are JSON too, an opened breaker writes its
transition and one alert; the ``LOG_*`` settings drop their kinds in the worker.

The worker imports this module as its Celery app (real Redis broker; prefork and solo pools)."""

from __future__ import annotations

import json
import logging
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from taskkit.recovery import CircuitBreaker
from taskkit.tasks import ResilientTask
from tests._support.apps import redis_test_app
from tests._support.workers import WorkerProcess, wait_for

kit = redis_test_app("logs")
app = kit.app


@app.task(base=ResilientTask, bind=True, inner_max_attempts=2, max_retries=1)
def doomed(self: ResilientTask) -> None:
    """Always a transient error: inner retry, outer retry, inner retry, then terminal."""
    raise ConnectionError("the service is down")


@app.task(base=ResilientTask, bind=True)
def trip(self: ResilientTask, breaker: str) -> str:
    """Open a breaker, and log a record without any task fields."""
    logging.getLogger("taskkit.test_logs_worker").warning("tripping %s", breaker)
    circuit = CircuitBreaker(failure_threshold=1, recovery_timeout=600, name=breaker)

    def fail() -> None:
        raise ConnectionError("down")

    try:
        circuit.call(fail)
    except ConnectionError:
        pass
    return "tripped"


class _Hook(BaseHTTPRequestHandler):
    bodies: list[dict[str, Any]] = []

    def do_POST(self) -> None:
        length = int(self.headers["Content-Length"])
        _Hook.bodies.append(json.loads(self.rfile.read(length)))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def _records(log: str) -> list[dict[str, Any]]:
    """Every log record of the worker: each line that is not the banner is one JSON object."""
    records = []
    for line in log.splitlines():
        if line.startswith("{"):
            records.append(json.loads(line))
    return records


def _run(
    tmp_path: Path, name: str, *, posted: bool = False, pool: str = "prefork", **env: str
) -> tuple[list[dict[str, Any]], str, str]:
    worker = WorkerProcess(
        name,
        tmp_path,
        app=__name__,
        queue=kit.queue,
        pool=pool,
        env={"TASKKIT_LOG_FORMAT": "json", "TASKKIT_HOME": str(tmp_path / "home"), **env},
    )
    try:
        worker.wait_ready()
        failed = doomed.delay()
        tripped = trip.delay(f"{kit.prefix}-{name}")
        assert tripped.get(timeout=60) == "tripped"
        with pytest.raises(ConnectionError):
            failed.get(timeout=60)
        wait_for(
            lambda: '"terminal_failure"' in worker.log() and '"alert"' in worker.log(),
            30,
            "the terminal failure and the alert in the worker's log",
        )
        if posted:
            wait_for(lambda: _Hook.bodies, 30, "the alert webhook's POST from the pool process")
    finally:
        worker.stop()
    return _records(worker.log()), failed.id, tripped.id


def _of(records: list[dict[str, Any]], task_id: str) -> list[dict[str, Any]]:
    return [r for r in records if r.get("task_id") == task_id and r.get("taskkit_event")]


@pytest.mark.parametrize("pool", ["prefork", "solo"])
def test_one_json_record_per_event_in_the_worker_log(tmp_path: Path, pool: str):
    _Hook.bodies.clear()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/hook/secret-token"
    try:
        records, failed, tripped = _run(
            tmp_path, pool, posted=True, pool=pool, TASKKIT_ALERT_WEBHOOK_URL=url
        )
    finally:
        server.shutdown()
        server.server_close()
    breaker = f"{kit.prefix}-{pool}"
    assert [(b["breaker"], b["state"]) for b in _Hook.bodies] == [(breaker, "open")]
    assert not any("secret-token" in json.dumps(r) for r in records)
    assert any(r["logger"].startswith("celery") and "ready." in r["message"] for r in records)
    for record in records:
        assert {"time", "level", "logger", "message"} <= set(record)

    events = Counter(
        (r["taskkit_event"], r.get("layer"), r.get("attempt")) for r in _of(records, failed)
    )
    kinds = Counter(r["taskkit_event"] for r in _of(records, failed))
    assert events[("retry", "inner", 1)] == 2  # one per delivery
    assert events[("retry", "outer", 1)] == 1
    assert events[("terminal_failure", "outer", 2)] == 1
    assert kinds == {"retry": 3, "terminal_failure": 1, "dead_letter": 1}
    for record in _of(records, failed):
        assert record["task"] == doomed.name

    (mine,) = [r for r in records if r["message"] == f"tripping {breaker}"]
    assert (mine["task"], mine["task_id"]) == (trip.name, tripped)
    (transition,) = [
        r for r in records if r.get("taskkit_event") == "circuit_state" and breaker in r["message"]
    ]
    assert transition["task_id"] == tripped
    (alert,) = [r for r in records if r.get("taskkit_event") == "alert"]
    assert (alert["breaker"], alert["state"], alert["level"]) == (breaker, "open", "ERROR")


def test_the_log_settings_apply_in_the_worker(tmp_path: Path):
    records, failed, _ = _run(
        tmp_path,
        "quiet",
        TASKKIT_LOG_RETRY_ATTEMPTS="0",
        TASKKIT_LOG_CIRCUIT_STATE_CHANGES="0",
    )
    kinds = Counter(r.get("taskkit_event") for r in records if r.get("taskkit_event"))
    assert kinds["retry"] == kinds["gave_up"] == kinds["circuit_state"] == 0
    assert Counter(r["taskkit_event"] for r in _of(records, failed)) == {
        "terminal_failure": 1,
        "dead_letter": 1,
    }
    assert kinds["alert"] == 1
