"""The issue's must-show: a prefork worker subprocess (concurrency 2, real Redis broker and
PostgreSQL) runs a mix of tasks, and one scrape of its ``/metrics`` (all pool processes in one
answer) shows counters equal to what the database and the tasks themselves counted.

The mix: a task retried in process (a transient error twice), one re-queued once (an outer
retry), two terminal failures (dead-lettered), a batch with dead items, and a training run
with a checkpoint per epoch.
"""

from __future__ import annotations

import re
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select

from taskkit.config import reset_settings
from taskkit.db.models import BatchItem, DeadLetter, ModelRun, TrainingEpoch
from taskkit.db.session import get_engine, session_scope
from taskkit.tasks import submit_batch, submit_run
from tests._support.workers import WorkerProcess, wait_for
from tests.conftest import empty_tables
from tests.telemetry import metricsapp as apps

EPOCHS = 3
ITEMS = 12
BAD = {2, 5, 7}


@pytest.fixture
def env(
    redis_url: str, pg_schema_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[dict[str, str]]:
    values = {
        "TASKKIT_DATABASE_URL": pg_schema_url,
        "TASKKIT_CHECKPOINT_DIR": str(tmp_path / "checkpoints"),
        "TASKKIT_SECRET_KEY": "metrics-worker-tests",
        "TASKKIT_METRICS_PORT": "0",
        "TASKKIT_METRICS_DIR": str(tmp_path / "metrics"),
    }
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    reset_settings()
    apps.app.conf.taskkit_database_url = pg_schema_url
    yield values
    reset_settings()
    empty_tables(get_engine(pg_schema_url))  # the schema is this session's, shared by tests


@pytest.fixture
def worker(env: dict[str, str], tmp_path: Path) -> Iterator[WorkerProcess]:
    started = WorkerProcess(
        "metrics", tmp_path, app="tests.telemetry.metricsapp", queue=apps.QUEUE, concurrency=2
    )
    try:
        started.wait_ready()
        yield started
    finally:
        started.stop()


def metrics_url(worker: WorkerProcess) -> str:
    found: list[str] = []

    def announced() -> bool:
        found[:] = re.findall(r"taskkit: metrics on http://[^:]+:(\d+)/metrics", worker.log())
        return bool(found)

    wait_for(announced, 30, "the worker to serve /metrics")
    return f"http://127.0.0.1:{found[-1]}/metrics"


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(url, timeout=10) as answer:
        assert answer.status == 200
        text = answer.read().decode()
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def total(found: dict[Any, float], name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    return sum(
        value
        for (sample, pairs), value in found.items()
        if sample == name and labels.items() <= dict(pairs).items()
    )


def test_one_scrape_of_a_prefork_worker_counts_what_happened(worker: WorkerProcess) -> None:
    url = metrics_url(worker)
    nonce = uuid.uuid4().hex[:8]
    inner = apps.inner_flaky.delay(f"inner-{nonce}", 2)
    outer = apps.outer_flaky.delay(f"outer-{nonce}", 1)
    broken = [apps.broken.delay(f"broken-{nonce}-{n}") for n in range(2)]
    batch_items = [{"id": n, "nonce": nonce, "bad": n in BAD} for n in range(ITEMS)]
    submission = submit_batch(apps.items, batch_items, chunk_size=5)
    config = {"epochs": EPOCHS, "seed": 3, "batch_size": 200, "nonce": nonce}
    run_id, train_id = submit_run(apps.train, config, name=f"metrics-{nonce}")

    assert inner.get(timeout=60) == 3
    assert outer.get(timeout=60) == 2
    for sent in broken:
        with pytest.raises(ValueError):
            sent.get(timeout=60)
    summary = submission.get(timeout=60)
    apps.app.AsyncResult(train_id).get(timeout=120)
    assert summary["failed"] == len(BAD)

    with session_scope(readonly=True) as db:
        letters = db.scalar(select(func.count()).select_from(DeadLetter))
        item_letters = db.scalar(
            select(func.count()).select_from(DeadLetter).where(DeadLetter.batch_id.is_not(None))
        )
        done_items = db.scalar(
            select(func.count()).select_from(BatchItem).where(BatchItem.status == "done")
        )
        epochs = db.scalar(
            select(func.count())
            .select_from(TrainingEpoch)
            .where(TrainingEpoch.model_run_id == run_id)
        )
        status = db.get(ModelRun, run_id).status  # type: ignore[union-attr]
    assert status == "completed"
    assert letters == len(broken) + len(BAD)

    found: dict[Any, float] = {}

    def settled() -> bool:
        # The database gauge is cached a few seconds; a pool process adds its task attempts
        # every FLUSH_SECONDS: the scrape that counts is one equal to the one before it.
        before = dict(found)
        found.clear()
        found.update(scrape(url))
        return found == before and total(found, "taskkit_dead_letters", status="dead") == letters

    wait_for(settled, 30, "/metrics to settle at the database's dead letters", step=1.0)
    attempts = "taskkit_task_attempts_total"

    # in-process retries: one delivery, the body called 3 times (2 retries, then a success)
    name = apps.inner_flaky.name
    assert apps.calls(f"inner-{nonce}") == 3
    assert total(found, attempts, task=name, layer="inner") == 3
    assert total(found, attempts, task=name, layer="inner", outcome="retry") == 2
    assert total(found, attempts, task=name, layer="inner", outcome="success") == 1
    assert total(found, attempts, task=name, layer="outer") == apps.kit.deliveries(inner.id) == 1

    # an outer retry: two deliveries, the first escalated and re-queued
    name = apps.outer_flaky.name
    assert apps.kit.deliveries(outer.id) == 2
    assert total(found, attempts, task=name, layer="outer") == 2
    assert total(found, attempts, task=name, layer="outer", outcome="retry") == 1
    assert total(found, attempts, task=name, layer="outer", outcome="success") == 1
    assert total(found, attempts, task=name, layer="inner", outcome="escalated") == 1

    # terminal failures, dead-lettered
    name = apps.broken.name
    failures = "taskkit_task_terminal_failures_total"
    assert total(found, failures, task=name, error="ValueError") == len(broken)
    assert total(found, failures) == len(broken)
    assert total(found, attempts, task=name, layer="outer", outcome="failure") == len(broken)
    assert total(found, "taskkit_dead_lettered_total") == letters
    assert total(found, "taskkit_dead_lettered_total", task=name, error="ValueError") == 2

    # the batch: dead items as in the database, done items as in the ledger
    name = apps.items.name
    assert total(found, "taskkit_batch_items_total", task=name, outcome="dead") == item_letters
    assert total(found, "taskkit_batch_items_total", task=name, outcome="done") == done_items
    assert done_items == ITEMS - len(BAD)
    assert apps.calls(f"item-{nonce}") == ITEMS

    # the training run: an epoch and a checkpoint per epoch
    assert apps.calls(f"epochs-{nonce}") == EPOCHS
    assert total(found, "taskkit_run_epoch_seconds_count") == epochs == EPOCHS
    assert total(found, "taskkit_checkpoint_save_seconds_count") == EPOCHS
    assert total(found, "taskkit_checkpoint_bytes_count") == EPOCHS
    assert total(found, "taskkit_checkpoint_bytes_sum") > 0

    # read from the database at scrape
    assert total(found, "taskkit_runs", status="completed") >= 1
    assert total(found, "taskkit_runs", status="running", stale="true") == 0
    assert total(found, "taskkit_lease_takeovers_total") == 0


def test_metrics_port_option_of_a_solo_worker(
    env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``celery worker --metrics-port 0`` without ``TASKKIT_METRICS_PORT``: a solo pool runs
    tasks in the main process, which then subscribes itself and serves them."""
    import os
    import subprocess
    import sys

    from tests._support.workers import REPO

    monkeypatch.delenv("TASKKIT_METRICS_PORT")
    child_env = {**os.environ, "PYTHONPATH": str(REPO)}
    log_path = tmp_path / "solo.log"
    command = [
        sys.executable, "-m", "celery", "-A", "tests.telemetry.metricsapp", "worker",
        "--pool", "solo", "--queues", apps.QUEUE, "--hostname", "metrics-solo@%h",
        "--loglevel", "INFO", "--without-gossip", "--without-mingle", "--without-heartbeat",
        "--metrics-port", "0",
    ]  # fmt: skip
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command, cwd=REPO, env=child_env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        try:
            found: list[str] = []

            def announced() -> bool:
                if process.poll() is not None:
                    raise AssertionError(log_path.read_text()[-3000:])
                text = log_path.read_text(errors="replace")
                found[:] = re.findall(r"taskkit: metrics on http://[^:]+:(\d+)/metrics", text)
                return bool(found)

            wait_for(announced, 60, "the solo worker to serve /metrics")
            name = f"solo-{uuid.uuid4().hex[:8]}"
            assert apps.inner_flaky.delay(name, 1).get(timeout=60) == 2
            scraped = scrape(f"http://127.0.0.1:{found[-1]}/metrics")
            task = apps.inner_flaky.name
            attempts = "taskkit_task_attempts_total"
            assert total(scraped, attempts, task=task, layer="inner", outcome="retry") == 1
            assert total(scraped, attempts, task=task, layer="outer", outcome="success") == 1
        finally:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
