"""Real Celery workers on the embedded default broker (no ``TASKKIT_BROKER_URL``).

The app is ``tests.broker.brokerapp``; everything lives under the test's ``TASKKIT_HOME``. The
visibility timeout is the smallest allowed (5 s), so a killed worker's task comes back within
seconds.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests._support.commands import clean_env, run_command
from tests._support.workers import REPO, WorkerProcess, wait_for

APP = "tests.broker.brokerapp"
VISIBILITY = 5


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


@pytest.fixture
def env(home: Path) -> dict[str, str]:
    return clean_env(
        TASKKIT_HOME=str(home),
        TASKKIT_VISIBILITY_TIMEOUT=str(VISIBILITY),
        PYTHONPATH=str(REPO),
    )


@pytest.fixture
def workers(tmp_path: Path, env: dict[str, str]) -> Iterator[list[WorkerProcess]]:
    started: list[WorkerProcess] = []
    yield started
    for worker in started:
        worker.stop()
        print(worker.log()[-3000:])


def start(
    workers: list[WorkerProcess], name: str, tmp_path: Path, env: dict[str, str]
) -> WorkerProcess:
    worker = WorkerProcess(name, tmp_path, app=APP, concurrency=1, env=env)
    workers.append(worker)
    worker.wait_ready()
    return worker


def send(env: dict[str, str], task: str, name: str) -> None:
    """Publish from a separate process, as a user's client would."""
    code = f"from {APP} import {task}; {task}.delay({name!r})"
    done = run_command([sys.executable, "-c", code], cwd=REPO, env=env)
    assert done.returncode == 0, done.stderr


def lines(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


def unacked_task_rows(home: Path) -> int:
    with sqlite3.connect(home / "queue.db") as db:
        count: int = db.execute(
            "SELECT count(*) FROM messages "
            "WHERE queue NOT LIKE '%pidbox%' AND queue NOT LIKE 'celeryev%'"
        ).fetchone()[0]
    return count


def test_celery_inspect_ping_gets_an_answer_on_the_embedded_broker(workers, tmp_path, env):
    start(workers, "ping", tmp_path, env)
    answer = run_command(
        [sys.executable, "-m", "celery", "-A", APP, "inspect", "ping", "--timeout", "10"],
        cwd=REPO,
        env=env,
    )
    assert answer.returncode == 0, answer.stdout + answer.stderr
    assert "pong" in answer.stdout
    assert "1 node online" in answer.stdout


def test_a_task_in_flight_at_a_whole_worker_kill_runs_again_on_a_restarted_worker(
    workers, tmp_path, env, home
):
    first = start(workers, "first", tmp_path, env)
    send(env, "hold", "job")
    wait_for(lambda: len(lines(home / "started" / "job")) == 1, 60, "the task to start")
    first.kill()

    start(workers, "second", tmp_path, env)
    wait_for(
        lambda: len(lines(home / "started" / "job")) == 2,
        VISIBILITY + 60,
        "the killed worker's task to be delivered again",
    )
    (home / "release").touch()
    wait_for(lambda: lines(home / "done" / "job"), 60, "the task to finish")
    wait_for(lambda: unacked_task_rows(home) == 0, 30, "the acknowledged message to be deleted")
    assert len(lines(home / "done" / "job")) == 1


def test_a_live_worker_keeps_its_task_past_the_visibility_timeout(workers, tmp_path, env, home):
    """The keeper extends the message's timeout: a second worker never gets a copy."""
    start(workers, "holder", tmp_path, env)
    send(env, "hold", "long")
    wait_for(lambda: lines(home / "started" / "long"), 60, "the task to start")
    start(workers, "idle", tmp_path, env)
    time.sleep(VISIBILITY + 2)  # well past the timeout the keeper keeps pushing back
    assert len(lines(home / "started" / "long")) == 1
    (home / "release").touch()
    wait_for(lambda: lines(home / "done" / "long"), 60, "the task to finish")
    wait_for(lambda: unacked_task_rows(home) == 0, 30, "the acknowledged message to be deleted")
    assert len(lines(home / "started" / "long")) == 1


def test_task_events_reach_celery_events_on_the_embedded_broker(workers, tmp_path, env, home):
    """Events go through a topic exchange whose bindings live in the file: any process sees them."""
    env = {**env, "TASKKIT_WORKER_EVENTS": "1"}
    start(workers, "events", tmp_path, env)
    dump_path = tmp_path / "events.log"
    with dump_path.open("wb") as dump_log:
        dump = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", APP, "events", "--dump"],
            cwd=REPO,
            env=env,
            stdout=dump_log,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_for(lambda: "starting capture" in dump_path.read_text(), 60, "the receiver")
            # The receiver binds its queue just after it says so: send until one is seen.
            deadline = time.monotonic() + 60
            while "task succeeded" not in dump_path.read_text():
                assert time.monotonic() < deadline, "no task-succeeded event in 60 s"
                send(env, "record", "watched")
                time.sleep(2)
        finally:
            dump.terminate()
            dump.wait(timeout=30)
    assert "task sent" in dump_path.read_text()
