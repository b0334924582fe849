"""Task events for Flower and ``celery events`` (issue 15 hole 9), on the Redis broker.

A real worker subprocess started with ``TASKKIT_WORKER_EVENTS=1`` (no ``-E``) sends task events;
a real event receiver (what ``celery events`` and Flower run) sees them, ``task-progress`` with
its payload included, and ``celery inspect active`` lists the running task. The worker imports
this module as its Celery app.
"""

from __future__ import annotations

import contextlib
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from taskkit.config import Settings
from taskkit.tasks import ResilientTask, reliable_defaults
from tests._support.apps import KEY_TTL, RUN, redis_test_app
from tests._support.commands import clean_env, run_command
from tests._support.workers import REPO, WorkerProcess, wait_for

pytestmark = pytest.mark.usefixtures("redis_url")

kit = redis_test_app("ev")
app, counter = kit.app, kit.counter


@app.task(base=ResilientTask, bind=True)
def trained(self: ResilientTask, gate: str) -> int:
    """Report progress 1 of 3, wait until the test opens ``gate`` (a Redis key), then 2 and 3."""
    self.progress(1, 3, "epoch 1", loss=0.5)
    deadline = time.monotonic() + 60
    while not counter.get(gate) and time.monotonic() < deadline:
        time.sleep(0.05)
    self.progress(2, 3, "epoch 2", loss=0.25)
    self.progress(3, 3, "epoch 3", loss=0.125)
    return 3


@contextlib.contextmanager
def listening(events: list[dict[str, Any]]) -> Iterator[None]:
    """Collect the app's events in a thread, as ``celery events`` does. Redis delivers events
    to live subscribers only: the block starts once a probe event came back."""
    receiver = app.events.Receiver(
        app.connection(), handlers={"*": events.append}, app=app, node_id=f"ev-{uuid.uuid4()}"
    )
    thread = threading.Thread(
        target=receiver.capture, kwargs={"limit": None, "wakeup": False}, daemon=True
    )
    thread.start()
    try:
        with app.events.default_dispatcher() as dispatcher:

            def probed() -> bool:
                dispatcher.send("taskkit-probe")
                time.sleep(0.05)
                return any(e.get("type") == "taskkit-probe" for e in events)

            wait_for(probed, 10, "the event receiver to subscribe")
        yield
    finally:
        receiver.should_stop = True
        thread.join(timeout=10)


@pytest.fixture
def events_worker(tmp_path) -> Iterator[WorkerProcess]:
    worker = WorkerProcess(
        "events",
        tmp_path,
        app=__name__,
        queue=kit.queue,
        env={"TASKKIT_WORKER_EVENTS": "1"},
    )
    try:
        worker.wait_ready()
        yield worker
    finally:
        worker.stop()
        print(f"--- worker log ---\n{worker.log()[-4000:]}")


def test_a_monitor_sees_task_and_progress_events_and_inspect_lists_the_running_task(
    events_worker,
):
    gate = kit.key("gate", uuid.uuid4().hex)
    events: list[dict[str, Any]] = []
    with listening(events):
        result = trained.delay(gate)

        def mine(kind: str) -> list[dict[str, Any]]:
            return [e for e in events if e.get("type") == kind and e.get("uuid") == result.id]

        wait_for(lambda: mine("task-progress"), 30, "the first task-progress event")

        active = run_command(
            [
                str(Path(sys.executable).with_name("celery")),
                "-A",
                __name__,
                "inspect",
                "active",
                "--timeout",
                "10",
                "--destination",
                f"events@{socket.gethostname()}",
            ],
            cwd=REPO,
            env=clean_env(PYTHONPATH=str(REPO), TASKKIT_TEST_RUN=RUN),
        )
        counter.set(gate, 1, ex=KEY_TTL)
        assert result.get(timeout=30) == 3
        wait_for(lambda: mine("task-succeeded"), 30, "the task-succeeded event")

    assert active.returncode == 0, active.stdout + active.stderr
    assert result.id in active.stdout
    assert kit.name("trained") in active.stdout
    assert mine("task-received")
    assert mine("task-started")
    progress = [
        {k: e[k] for k in ("current", "total", "percent", "description", "metrics")}
        for e in mine("task-progress")
    ]
    assert progress == [
        {"current": n, "total": 3, "percent": p, "description": f"epoch {n}", "metrics": m}
        for n, p, m in (
            (1, 33.33, {"loss": 0.5}),
            (2, 66.67, {"loss": 0.25}),
            (3, 100.0, {"loss": 0.125}),
        )
    ]


def test_the_worker_events_setting_turns_worker_and_client_events_on():
    on = reliable_defaults(Settings(broker_url="redis://127.0.0.1:6379/0", worker_events=True))
    off = reliable_defaults(Settings(broker_url="redis://127.0.0.1:6379/0"))
    assert on["worker_send_task_events"] is on["task_send_sent_event"] is True
    assert off["worker_send_task_events"] is off["task_send_sent_event"] is False


@pytest.mark.parametrize(("events", "dash_e"), [("1", True), ("true", True), ("", False)])
def test_make_worker_events_passes_dash_e(events, dash_e):
    done = run_command(["make", "-n", "worker", f"EVENTS={events}"], cwd=REPO)
    (command,) = [line for line in done.stdout.splitlines() if " worker " in line]
    assert (" -E" in command) is dash_e
