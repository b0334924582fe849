"""``taskkit tasks show``: a real worker subprocess runs a task that retries in process, reports
progress and holds a lease; the command reads the result backend and the lease store."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from taskkit.cli import app
from tests._support.workers import WorkerProcess, wait_for
from tests.cli import taskapp

pytestmark = pytest.mark.redis

APP = ["--app", "tests.cli.taskapp"]
WIDE = {"COLUMNS": "200"}


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    process = WorkerProcess(
        "tkcli-task",
        tmp_path_factory.mktemp("tasks-show"),
        app="tests.cli.taskapp",
        queue=taskapp.kit.queue,
        concurrency=2,
    )
    try:
        process.wait_ready()
        yield process
    finally:
        process.stop()


def show(runner: CliRunner, *args: str) -> Result:
    return runner.invoke(app, ["tasks", "show", *args, *APP], env={"COLUMNS": "120"})


def meta(task_id: str) -> dict[str, Any]:
    return taskapp.app.backend.get_task_meta(task_id)


def current(task_id: str) -> Any:
    """The ``current`` of the task's progress meta (None: no progress stored)."""
    result = meta(task_id).get("result")
    return result.get("current") if isinstance(result, dict) else None


def test_tasks_show_of_a_running_task_with_progress_an_inner_retry_and_a_lease(
    runner: CliRunner, worker: WorkerProcess
):
    key = uuid.uuid4().hex[:8]
    result = taskapp.crawl.delay(key, 10)

    wait_for(lambda: current(result.id) == 3, 60, "progress 3")
    shown = show(runner, result.id, "--json")
    table = show(runner, result.id)

    assert shown.exit_code == 0, shown.output
    record = json.loads(shown.stdout)
    assert record["state"] == "PROGRESS"
    assert record["name"] == taskapp.crawl.name
    assert record["attempts"] == {"outer": 1, "outer_max": 3, "inner": 2, "inner_max": 3}
    assert record["progress"] == {
        "current": 3,
        "total": 10,
        "percent": 30.0,
        "description": "crawling",
        "metrics": {"pages": 3, "errors": 0.5},
    }
    lease = record["lease"]
    assert lease["key"] == f"{taskapp.crawl.name}:{key}"
    assert lease["holder"].startswith(f"task {result.id} on ")
    assert 0 <= lease["heartbeat_age"] <= lease["ttl"] == 6.0
    assert table.exit_code == 0, table.output
    text = table.stdout
    assert "PROGRESS" in text
    assert "outer 1 of 3, inner 2 of 3" in text
    assert "30%  3/10" in text
    assert "━" in text  # the progress bar
    assert "pages=3" in text
    assert f"held by task {result.id} on " in text
    assert "heartbeat " in text

    taskapp.kit.counter.set(taskapp.go_key(key), 1, ex=600)
    watched = show(runner, result.id, "--watch", "--interval", "0.1", "--timeout", "60")

    assert watched.exit_code == 0, watched.output
    lines = watched.stdout.splitlines()
    assert lines[-1].startswith("done") or "SUCCESS" in watched.stdout
    assert any(line.startswith(f"task {result.id}: SUCCESS") for line in lines)
    assert "hunter2" not in watched.stdout  # the result's URL password is masked
    assert "https://crawler:***@example.com/x" in watched.stdout
    final = json.loads(show(runner, result.id, "--json").stdout)
    assert final["state"] == "SUCCESS"
    assert final["result"] == {"pages": 10, "url": "https://crawler:***@example.com/x"}
    assert final["attempts"]["outer"] == 1
    assert final["lease"] is None


def test_tasks_show_of_a_failed_task_and_watch_exit_1(runner: CliRunner, worker: WorkerProcess):
    result = taskapp.broken.delay("/data/x.csv")

    watched = show(runner, result.id, "--watch", "--interval", "0.1", "--timeout", "60")
    shown = show(runner, result.id, "--json")

    assert watched.exit_code == 1, watched.output
    assert watched.stderr.startswith(f"error: task {result.id} ended FAILURE: cannot parse")
    assert "ValueError: cannot parse /data/x.csv" in watched.stdout
    assert "traceback" in watched.stdout
    record = json.loads(shown.stdout)
    assert record["state"] == "FAILURE"
    assert record["error"] == {"type": "ValueError", "message": "cannot parse /data/x.csv"}
    assert record["attempts"]["outer"] == 1


def test_tasks_show_of_an_unknown_id_exits_3(runner: CliRunner, redis_url: str):
    task_id = str(uuid.uuid4())

    result = show(runner, task_id)

    assert result.exit_code == 3, result.output
    assert result.stderr.startswith(f"error: no task {task_id} in the result backend redis://")
    assert len(result.stderr.splitlines()) == 1


def test_tasks_show_watch_of_a_task_that_never_comes_stops_at_the_timeout(
    runner: CliRunner, redis_url: str
):
    task_id = str(uuid.uuid4())

    result = show(runner, task_id, "--watch", "--interval", "0.05", "--timeout", "0.2")

    assert result.exit_code == 7, result.output
    assert result.stderr.startswith(f"error: task {task_id} is still PENDING after 0.2 s")
    assert f"task {task_id}: PENDING" in result.stdout


def test_tasks_show_with_the_backend_down_exits_1_without_the_password(
    runner: CliRunner, tmp_path: Path
):
    result = runner.invoke(
        app, ["tasks", "show", "x", "--app", "tests.cli.taskapp:down"], env={"COLUMNS": "120"}
    )

    assert result.exit_code == 1, result.output
    assert result.stderr.startswith("error: could not reach the result backend redis://:***@")
    assert "s3cret" not in result.output


def test_tasks_show_on_the_embedded_defaults(runner: CliRunner):
    """SQLite result backend and a file lease: what `taskkit tasks show` reads on a laptop."""
    from celery.app.task import Context

    from taskkit.tasks import LeaseOwner
    from tests.cli import embeddedapp

    assert str(embeddedapp.app.conf.result_backend).startswith("db+sqlite:")
    task_id = str(uuid.uuid4())
    request = Context(
        id=task_id, task=embeddedapp.job.name, args=["k1"], kwargs={}, retries=1,
        hostname="w1@host", delivery_info={"routing_key": "celery"},
    )  # fmt: skip
    progress = {"current": 2, "total": 4, "percent": 50.0, "description": "x", "metrics": {}}
    attempts = {"inner": 3, "outer": 2}
    embeddedapp.app.backend.store_result(
        task_id, {**progress, "attempts": attempts}, "PROGRESS", request=request
    )
    lease = embeddedapp.job.lease_store().acquire(
        f"{embeddedapp.job.name}:k1", LeaseOwner.here(task_id), 10
    )
    assert lease is not None
    try:
        shown = runner.invoke(
            app, ["tasks", "show", task_id, "--app", "tests.cli.embeddedapp"], env=WIDE
        )
        record = json.loads(
            runner.invoke(
                app, ["tasks", "show", task_id, "--json", "--app", "tests.cli.embeddedapp"]
            ).stdout
        )
    finally:
        lease.release()

    assert shown.exit_code == 0, shown.output
    assert "outer 2 of 4, inner 3 of 3" in shown.stdout
    assert f"held by task {task_id} on " in shown.stdout
    assert "a lock file" in shown.stdout
    assert record["attempts"] == {"outer": 2, "outer_max": 4, "inner": 3, "inner_max": 3}
    assert record["progress"] == progress
    assert record["lease"]["holder"].startswith(f"task {task_id} on ")
    assert record["lease"]["heartbeat_age"] is None


def test_tasks_show_of_a_dropped_duplicate_names_the_task_that_runs(runner: CliRunner):
    from celery.app.task import Context

    from tests.cli import embeddedapp

    task_id, holder = str(uuid.uuid4()), str(uuid.uuid4())
    request = Context(id=task_id, task=embeddedapp.job.name, args=["k2"], kwargs={}, retries=0)
    meta = {"duplicate_of": holder, "lease": f"{embeddedapp.job.name}:k2", "holder": "x"}
    embeddedapp.app.backend.store_result(task_id, meta, "IGNORED", request=request)

    shown = runner.invoke(
        app, ["tasks", "show", task_id, "--app", "tests.cli.embeddedapp"], env=WIDE
    )
    watched = runner.invoke(
        app, ["tasks", "show", task_id, "--watch", "--app", "tests.cli.embeddedapp"], env=WIDE
    )

    assert shown.exit_code == 0, shown.output
    assert f"duplicate of  task {holder} (it held lease {embeddedapp.job.name}:k2)" in shown.stdout
    assert watched.exit_code == 0, watched.output  # it ended: another delivery runs the work


def test_tasks_show_counts_the_outer_attempt_of_a_requeued_task(
    runner: CliRunner, worker: WorkerProcess
):
    key = uuid.uuid4().hex[:8]
    result = taskapp.requeued.delay(key)

    wait_for(lambda: current(result.id) == 1, 60, "delivery 2")
    record = json.loads(show(runner, result.id, "--json").stdout)
    taskapp.kit.counter.set(taskapp.go_key(key), 1, ex=600)

    assert record["state"] == "PROGRESS"
    assert record["attempts"] == {"outer": 2, "outer_max": 4, "inner": 1, "inner_max": 2}
    assert record["progress"]["description"] == "second delivery"
