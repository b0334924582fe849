"""taskkit.telemetry.metrics: the event subscriber, the database and breaker collectors, the
multiprocess directory (real forked processes) and the service's GET /metrics.

Events are emitted here by the test itself, exactly as their sources emit them; the worker
test (``test_metrics_worker.py``) checks the same families fed by a real prefork worker.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.orm import Session

from taskkit.db.models import DeadLetter, ModelRun
from taskkit.recovery import CircuitBreaker, RetryBudget, events, retry
from taskkit.telemetry import metrics


def samples(body: bytes | str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition: (name, sorted labels) -> value."""
    text = body.decode() if isinstance(body, bytes) else body
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(found: dict[Any, float], name: str, **labels: str) -> float | None:
    return found.get((name, tuple(sorted(labels.items()))))


@pytest.fixture(autouse=True)
def _fresh() -> Iterator[None]:
    metrics.uninstall()
    metrics._state.pop("breakers", None)
    metrics._state.pop("budgets", None)
    yield
    metrics.uninstall()
    metrics._state.pop("breakers", None)
    metrics._state.pop("budgets", None)


def test_nothing_is_subscribed_before_install() -> None:
    assert metrics.installed() is None
    handlers = list(events._subscribers)
    metrics.install()
    assert len(events._subscribers) == len(handlers) + 1
    metrics.uninstall()
    assert events._subscribers == handlers


def test_install_is_idempotent() -> None:
    assert metrics.install() is metrics.install()


def test_every_event_lands_in_its_family() -> None:
    metrics.install()
    emit = events.emit
    for attempt, outcome in ((1, "retry"), (2, "escalated")):
        emit(events.TaskAttemptEnded("t.a", "id1", "inner", attempt, outcome, "ConnectionError"))
    emit(events.TaskAttemptEnded("t.a", "id1", "outer", 1, "retry", "ConnectionError", 1.0))
    emit(events.TaskAttemptEnded("t.a", "id1", "inner", 1, "success"))
    emit(events.TaskAttemptEnded("t.a", "id1", "outer", 2, "success"))
    emit(events.TaskFailed("t.b", "id2", "KeyError", attempts=3))
    emit(events.DeadLettered("t.b", 7, "KeyError", task_id="id2"))
    emit(events.LeaseTakenOver("t.c", "id3", "lease:x", "w1", 4))
    emit(events.CheckpointSaved(1, 0, 2048, 0.02, True, task="t.train"))
    emit(events.CheckpointSaved(1, 1, 5_000_000, 0.3, False, task="t.train"))
    emit(events.BatchChunkFinished("t.batch", "id4", "b1", done=8, dead=2, skipped=0))
    emit(events.BatchChunkFinished("t.batch", "id5", "b1", done=1, dead=0, skipped=8))
    emit(events.EpochFinished("t.train", 1, 0, 0.2))
    emit(events.CircuitStateChanged("pricing", "closed", "open"))
    emit(events.RetryScheduled("mod.fetch", 1, 3, 0.5, ConnectionError()))
    emit(events.GaveUp("mod.fetch", 3, "no attempts left", ConnectionError()))
    emit(events.GaveUp("mod.fetch", 1, "the 2s deadline would pass", ConnectionError()))
    emit(events.RunResumed("t.train", 1, "id6", 3))  # no family: resumes are logged, not counted

    found = samples(metrics.render())
    attempts = "taskkit_task_attempts_total"
    assert value(found, attempts, task="t.a", layer="inner", outcome="retry") == 1
    assert value(found, attempts, task="t.a", layer="inner", outcome="escalated") == 1
    assert value(found, attempts, task="t.a", layer="inner", outcome="success") == 1
    assert value(found, attempts, task="t.a", layer="outer", outcome="retry") == 1
    assert value(found, attempts, task="t.a", layer="outer", outcome="success") == 1
    assert value(found, "taskkit_task_terminal_failures_total", task="t.b", error="KeyError") == 1
    assert value(found, "taskkit_dead_lettered_total", task="t.b", error="KeyError") == 1
    assert value(found, "taskkit_lease_takeovers_total", task="t.c") == 1
    assert value(found, "taskkit_checkpoint_save_seconds_count") == 2
    assert value(found, "taskkit_checkpoint_save_seconds_sum") == pytest.approx(0.32)
    assert value(found, "taskkit_checkpoint_bytes_sum") == 5_002_048
    assert value(found, "taskkit_checkpoint_bytes_bucket", le="4096.0") == 1
    assert value(found, "taskkit_batch_items_total", task="t.batch", outcome="done") == 9
    assert value(found, "taskkit_batch_items_total", task="t.batch", outcome="dead") == 2
    assert value(found, "taskkit_batch_items_total", task="t.batch", outcome="skipped") == 8
    assert value(found, "taskkit_run_epoch_seconds_count") == 1
    assert value(found, "taskkit_circuit_state", breaker="pricing") == 2
    assert value(found, "taskkit_circuit_transitions_total", breaker="pricing", to="open") == 1
    assert value(found, "taskkit_retries_total", function="mod.fetch") == 1
    assert (
        value(found, "taskkit_retry_give_ups_total", function="mod.fetch", reason="attempts") == 1
    )
    assert (
        value(found, "taskkit_retry_give_ups_total", function="mod.fetch", reason="deadline") == 1
    )


def test_no_label_holds_an_id() -> None:
    metrics.install()
    events.emit(events.TaskAttemptEnded("t.a", "task-id-123", "outer", 1, "success", run_id=99))
    events.emit(events.DeadLettered("t.a", 4242, "KeyError", task_id="task-id-123", batch_id="b-9"))
    events.emit(events.LeaseTakenOver("t.a", "task-id-123", "lease:k-7", "w-1", 5, run_id=99))
    labels = {value for _, pairs in samples(metrics.render()) for _, value in pairs}
    assert labels
    assert not labels & {"task-id-123", "4242", "b-9", "99", "lease:k-7", "w-1", "5"}


def test_the_recovery_primitives_feed_it() -> None:
    metrics.install()
    calls = []

    @retry(max_attempts=3, delay=0, exceptions=(ConnectionError,))
    def fetch() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("down")
        return "ok"

    assert fetch() == "ok"
    breaker = CircuitBreaker(failure_threshold=1, recovery_timeout=60, name="geo")
    with pytest.raises(ValueError):
        breaker.call(_raise)
    found = samples(metrics.render())
    retried = [k for k in found if k[0] == "taskkit_retries_total"]
    assert len(retried) == 1
    assert found[retried[0]] == 2
    assert "fetch" in dict(retried[0][1])["function"]
    assert value(found, "taskkit_circuit_state", breaker="geo") == 2
    assert value(found, "taskkit_circuit_transitions_total", breaker="geo", to="open") == 1


def _raise() -> None:
    raise ValueError("boom")


def test_tracked_breakers_and_budgets_are_read_at_scrape() -> None:
    metrics.install()
    quiet = CircuitBreaker(name="quiet")
    metrics.track_breaker(quiet)
    budget = RetryBudget(ratio=0.1, min_per_second=0.0, max_tokens=5)
    metrics.track_budget("geocoder", budget)
    assert budget.try_spend()
    assert budget.try_spend()
    extra = [metrics.BreakerCollector(), metrics.BudgetCollector()]
    found = samples(metrics.render(extra=extra))
    assert value(found, "taskkit_circuit_state", breaker="quiet") == 0
    assert value(found, "taskkit_retry_budget_tokens", budget="geocoder") == 3


def test_one_family_per_name_when_collectors_overlap() -> None:
    metrics.install()
    events.emit(events.CircuitStateChanged("pricing", "closed", "open"))
    body = metrics.render(extra=[metrics.BreakerCollector()]).decode()
    assert body.count("# TYPE taskkit_circuit_state gauge") == 1
    assert body.count('taskkit_circuit_state{breaker="pricing"}') == 1


# -- the database -------------------------------------------------------------------------------


@pytest.fixture
def clean(db: Session, engine: Any) -> Session:
    """``db`` on empty tables (another module may have left rows in this session's schema)."""
    from tests.conftest import empty_tables

    empty_tables(engine)
    return db


def _letter(status: str, n: int) -> DeadLetter:
    return DeadLetter(
        task_name="t.x", item_key=f"k{n}", batch_id="b", payload={}, error_type="E", status=status
    )


def test_dead_letters_and_runs_come_from_the_database(clean: Session, db_url: str) -> None:
    db = clean
    now = datetime.now(UTC)
    db.add_all([_letter("dead", n) for n in range(3)] + [_letter("replayed", 9)])
    db.add_all(
        [
            ModelRun(name="fresh", model_type="m", status="running", heartbeat_at=now),
            ModelRun(
                name="stale",
                model_type="m",
                status="running",
                heartbeat_at=now - timedelta(seconds=120),
            ),
            ModelRun(name="done", model_type="m", status="completed"),
        ]
    )
    db.commit()
    collector = metrics.DatabaseCollector(db_url, lease_ttl=15)
    found = samples(metrics.render(extra=[collector]))
    assert value(found, "taskkit_dead_letters", status="dead") == 3
    assert value(found, "taskkit_dead_letters", status="replayed") == 1
    assert value(found, "taskkit_runs", status="running", stale="true") == 1
    assert value(found, "taskkit_runs", status="running", stale="false") == 1
    assert value(found, "taskkit_runs", status="completed", stale="false") == 1


def test_the_database_is_read_once_per_window(clean: Session, db_url: str) -> None:
    db = clean
    now = [100.0]
    collector = metrics.DatabaseCollector(db_url, ttl=5.0, clock=lambda: now[0])
    first = samples(metrics.render(extra=[collector]))
    db.add(_letter("dead", 1))
    db.commit()
    again = samples(metrics.render(extra=[collector]))
    assert collector.queries == 1
    assert value(first, "taskkit_dead_letters", status="dead") == 0
    assert value(again, "taskkit_dead_letters", status="dead") == 0
    now[0] += 5.0
    later = samples(metrics.render(extra=[collector]))
    assert collector.queries == 2
    assert value(later, "taskkit_dead_letters", status="dead") == 1


def test_an_unreachable_database_serves_the_last_reading(clean: Session, db_url: str) -> None:
    db = clean
    now = [0.0]
    collector = metrics.DatabaseCollector(db_url, ttl=1.0, clock=lambda: now[0])
    db.add(_letter("dead", 1))
    db.commit()
    assert value(samples(metrics.render(extra=[collector])), "taskkit_dead_letters", status="dead")
    collector.url = "postgresql+psycopg://postgres@127.0.0.1:1/none"
    now[0] += 2
    found = samples(metrics.render(extra=[collector]))
    assert value(found, "taskkit_dead_letters", status="dead") == 1
    assert collector.queries == 2


# -- multiprocess ----------------------------------------------------------------------------------

CHILD = """
import os, sys
from pathlib import Path
from taskkit.telemetry import metrics
from taskkit.recovery import events

path = Path(sys.argv[1])
metrics.prepare_multiprocess_dir(path)
pids = []
for n in range(2):
    pid = os.fork()
    if pid == 0:
        metrics.install()
        events.emit(events.TaskAttemptEnded("t.a", "i", "outer", 1, "success"))
        events.emit(events.BatchChunkFinished("t.b", "i", "b", done=5, dead=1, skipped=0))
        events.emit(events.CircuitStateChanged("pricing", "closed", "half_open" if n else "open"))
        metrics.installed().stop_flusher()  # what worker_process_shutdown does
        if n == 0:
            metrics.mark_dead(os.getpid())
        os._exit(0)
    pids.append(pid)
for pid in pids:
    os.waitpid(pid, 0)
sys.stdout.write(metrics.render().decode())
"""


def test_forked_processes_are_aggregated(tmp_path: Path) -> None:
    import subprocess

    path = tmp_path / "metrics"
    path.mkdir()
    (path / "counter_1.db").write_bytes(b"left by an earlier worker")
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(path)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
        timeout=60,
    ).stdout
    found = samples(out)
    attempts = "taskkit_task_attempts_total"
    assert value(found, attempts, task="t.a", layer="outer", outcome="success") == 2
    assert value(found, "taskkit_batch_items_total", task="t.b", outcome="done") == 10
    # the process marked dead (open) no longer counts: the live one is half-open
    assert value(found, "taskkit_circuit_state", breaker="pricing") == 1
    assert not (path / "counter_1.db").exists()


FLUSHED = """
import os, sys, time
from pathlib import Path
from taskkit.telemetry import metrics
from taskkit.recovery import events

path = Path(sys.argv[1])
metrics.prepare_multiprocess_dir(path)
pid = os.fork()
if pid == 0:
    metrics.install()  # a pool process: its thread flushes every FLUSH_SECONDS
    events.emit(events.TaskAttemptEnded("t.a", "i", "outer", 1, "success"))
    time.sleep(60)
    os._exit(0)
try:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and b"t.a" not in metrics.render(multiprocess=path):
        time.sleep(0.05)
    sys.stdout.write(metrics.render(multiprocess=path).decode())
finally:
    os.kill(pid, 9)
    os.waitpid(pid, 0)
"""


def test_a_pool_process_flushes_its_task_attempts_while_alive(tmp_path: Path) -> None:
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    out = subprocess.run(
        [sys.executable, "-c", FLUSHED, str(tmp_path / "metrics")],
        capture_output=True,
        text=True,
        env=env,
        check=True,
        timeout=60,
    ).stdout
    found = samples(out)
    attempts = "taskkit_task_attempts_total"
    assert value(found, attempts, task="t.a", layer="outer", outcome="success") == 1


def test_attempts_counted_in_memory_show_in_this_process_at_once() -> None:
    metrics.install()
    events.emit(events.TaskAttemptEnded("t.a", "i", "inner", 1, "success"))
    found = samples(metrics.render())
    assert (
        value(found, "taskkit_task_attempts_total", task="t.a", layer="inner", outcome="success")
        == 1
    )


# -- the service ----------------------------------------------------------------------------------


def test_the_service_answers_metrics_without_a_token(
    clean: Session, db_url: str, redis_url: str
) -> None:
    db = clean
    from fastapi.testclient import TestClient

    from taskkit.api import create_api
    from taskkit.api._breakers import register
    from taskkit.config import Settings

    db.add(_letter("dead", 1))
    db.commit()
    settings = Settings(database_url=db_url, broker_url=redis_url, api_token="t0k3n-metrics")  # type: ignore[arg-type]
    api = create_api(settings, celery_app=object())
    register(api, CircuitBreaker(name="svc-breaker"))
    with TestClient(api) as client:
        answer = client.get("/metrics")
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/plain")
    found = samples(answer.text)
    assert value(found, "taskkit_dead_letters", status="dead") == 1
    assert value(found, "taskkit_circuit_state", breaker="svc-breaker") == 0
    assert "t0k3n" not in answer.text


def test_a_worker_without_a_metrics_port_subscribes_and_serves_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from taskkit.config import reset_settings
    from taskkit.tasks import _metrics as wiring

    monkeypatch.delenv("TASKKIT_METRICS_PORT", raising=False)
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    reset_settings()
    try:
        before = list(events._subscribers)
        wiring._prepare(sender=None)
        wiring._subscribe_pool_process()
        wiring._serve()
        assert events._subscribers == before
        assert metrics.installed() is None
        assert "PROMETHEUS_MULTIPROC_DIR" not in os.environ
        assert "server" not in wiring._serving
    finally:
        reset_settings()
