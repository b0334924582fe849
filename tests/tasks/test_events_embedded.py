"""Task events on the embedded broker (``taskkit+sqlite``): a worker subprocess with
``TASKKIT_WORKER_EVENTS=1`` sends task and ``task-progress`` events that a receiver (what
``celery events`` and Flower run) sees, and ``celery inspect active`` reaches it. The worker
imports this module as its Celery app (``TASKKIT_TEST_EVENTS_WORKER`` set)."""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from celery import Celery

from taskkit.config import Settings
from taskkit.db.migrate import upgrade
from taskkit.db.session import create_engine_for
from taskkit.tasks import ResilientTask, create_app
from tests._support.commands import clean_env, run_command
from tests._support.workers import REPO, WorkerProcess, wait_for

NAME = "ev-embedded.steps"


def build_app(settings: Settings | None = None) -> Celery:
    """The app of the worker and of the test (which names its home explicitly)."""
    app = create_app("ev-embedded", settings=settings)

    @app.task(base=ResilientTask, bind=True, name=NAME, progress_interval=0)
    def steps(self: ResilientTask, gate: str, n: int) -> int:
        self.progress(1, n, "step 1")
        deadline = time.monotonic() + 60
        while not Path(gate).exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        for i in range(2, n + 1):
            self.progress(i, n, f"step {i}")
        return n

    return app


if os.environ.get("TASKKIT_TEST_EVENTS_WORKER"):
    app = build_app()


def test_a_monitor_sees_progress_events_on_the_embedded_broker(tmp_path):
    home = tmp_path / "home"
    env = {"TASKKIT_HOME": str(home), "TASKKIT_WORKER_EVENTS": "1"}
    settings = Settings(home=home, worker_events=True)
    engine = create_engine_for(settings.database_url)
    try:
        upgrade(engine)
    finally:
        engine.dispose()
    client = build_app(settings)
    assert settings.embedded_broker
    worker = WorkerProcess(
        "events-embedded",
        tmp_path,
        app=__name__,
        env=clean_env(PYTHONPATH=str(REPO), TASKKIT_TEST_EVENTS_WORKER="1", **env),
    )
    events: list[dict[str, Any]] = []
    receiver = client.events.Receiver(
        client.connection(), handlers={"*": events.append}, node_id=f"ev-{uuid.uuid4()}"
    )
    thread = threading.Thread(
        target=receiver.capture, kwargs={"limit": None, "wakeup": False}, daemon=True
    )
    try:
        worker.wait_ready()
        thread.start()
        with client.events.default_dispatcher() as dispatcher:

            def probed() -> bool:
                dispatcher.send("taskkit-probe")
                time.sleep(0.1)
                return any(e.get("type") == "taskkit-probe" for e in events)

            wait_for(probed, 30, "the event receiver to bind its queue")
        gate = tmp_path / "gate"
        result = client.send_task(NAME, (str(gate), 3))

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
                f"events-embedded@{socket.gethostname()}",
            ],
            cwd=REPO,
            env=clean_env(PYTHONPATH=str(REPO), TASKKIT_TEST_EVENTS_WORKER="1", **env),
        )
        gate.touch()
        assert result.get(timeout=30) == 3
        wait_for(lambda: mine("task-succeeded"), 30, "the task-succeeded event")
    finally:
        receiver.should_stop = True
        thread.join(timeout=10)
        worker.stop()
        print(f"--- worker log ---\n{worker.log()[-4000:]}")

    assert active.returncode == 0, active.stdout + active.stderr
    assert result.id in active.stdout
    assert mine("task-sent")
    assert mine("task-started")
    assert [(e["current"], e["total"], e["description"]) for e in mine("task-progress")] == [
        (1, 3, "step 1"),
        (2, 3, "step 2"),
        (3, 3, "step 3"),
    ]
