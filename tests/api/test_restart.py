"""A restart of the service loses nothing (issue 16: "durable: everything it shows comes from the
database, Redis and the broker, so a restart loses nothing").

``taskkit serve`` runs as a process of its own on the embedded defaults (SQLite database and
broker under a temp ``TASKKIT_HOME``, with a token), on a free port. Over HTTP a run is made
(``POST /train`` with an ``Idempotency-Key``; no worker runs, so it stays queued and its task
waits in the embedded broker); a dead letter is written through the store, as a worker's would
be. The service is SIGKILLed (no shutdown hook runs) and a new one started on the same home and
port: it gives the same answers (the run, the run list, the letter, the letter list), the same
key returns the same run without making another, and the run's task still waits in the broker.
"""

from __future__ import annotations

import signal
import socket
import sqlite3
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from taskkit.db.migrate import upgrade
from taskkit.db.session import dispose_engines
from taskkit.deadletter import DeadLetterStore
from tests._support.commands import TASKKIT, clean_env
from tests._support.letters import letter_entry
from tests._support.workers import REPO, wait_for

TOKEN = "restart-test-token-3b9e51"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
KEY = "restart-key-0001"
BODY = {"name": "survives-restart", "model_type": "sgd", "epochs": 2, "seed": 7}
TRAIN_TASK = "workers.training.train_model"  # POST /train's default, in workers.app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def service(home: Path, port: int, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """``taskkit serve`` on ``home``, answering on ``port``; SIGKILLed on the way out if the
    test has not killed it."""
    with log.open("ab") as out:
        process = subprocess.Popen(
            [str(TASKKIT), "serve", "--port", str(port), "--log-level", "warning"],
            cwd=REPO,
            env=clean_env(TASKKIT_HOME=str(home), TASKKIT_API_TOKEN=TOKEN),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:

        def ready() -> bool:
            assert process.poll() is None, log.read_text()
            try:
                return httpx.get(f"http://127.0.0.1:{port}/health/live", timeout=1).is_success
            except httpx.HTTPError:
                return False

        wait_for(ready, 60, "taskkit serve to answer", step=0.2)
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)


def queued_messages(home: Path) -> list[tuple[str, str]]:
    """(queue, payload) of every message in the embedded broker's file."""
    with sqlite3.connect(f"{(home / 'queue.db').as_uri()}?mode=ro", uri=True) as connection:
        return sorted(connection.execute("SELECT queue, payload FROM messages"))


def answers(http: httpx.Client, run_id: int, letter_id: int) -> dict[str, Any]:
    """What the service shows of the run and the letter, by every read endpoint (the run's
    ``last_seen`` among them: the time ``heartbeat_age`` counts from)."""
    shown: dict[str, Any] = {}
    for path in (
        f"/runs/{run_id}",
        "/runs",
        f"/models/{run_id}",
        f"/dead-letters/{letter_id}",
        "/dead-letters",
    ):
        response = http.get(path)
        assert response.status_code == 200, f"GET {path}: {response.status_code} {response.text}"
        shown[path] = response.json()
    return shown


def train(http: httpx.Client) -> httpx.Response:
    response = http.post("/train", json=BODY, headers={**AUTH, "Idempotency-Key": KEY})
    assert response.status_code == 200, response.text
    return response


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    """A migrated embedded home (SQLite database ``taskkit.db``)."""
    home = tmp_path / "home"
    home.mkdir()
    upgrade(f"sqlite:///{home / 'taskkit.db'}")
    yield home
    dispose_engines()


def test_a_killed_service_restarts_with_everything_it_showed(home: Path, tmp_path: Path) -> None:
    port, log = free_port(), tmp_path / "serve.log"
    base = f"http://127.0.0.1:{port}"

    with service(home, port, log) as first, httpx.Client(base_url=base, timeout=10) as http:
        made = train(http)
        run_id = made.json()["model_run_id"]
        assert made.json() == {"model_run_id": run_id, "status": "queued"}
        assert "idempotent-replayed" not in made.headers
        assert train(http).json() == made.json()  # the key before the restart, for contrast

        store = DeadLetterStore(f"sqlite:///{home / 'taskkit.db'}", queue="")
        store.record([letter_entry(TRAIN_TASK, batch="nightly", key="item-7")])
        (letter,) = store.list(status=None)

        before = answers(http, run_id, letter.id)
        waiting = queued_messages(home)
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    assert first.returncode == -signal.SIGKILL

    # what was shown, as a check that the test looks at something
    assert before[f"/runs/{run_id}"]["status"] == "queued"
    assert before[f"/runs/{run_id}"]["name"] == BODY["name"]
    assert [r["id"] for r in before["/runs"]["runs"]] == [run_id]
    assert before[f"/dead-letters/{letter.id}"]["error_type"] == "KeyError"
    assert [x["id"] for x in before["/dead-letters"]["letters"]] == [letter.id]
    assert len(waiting) == 1
    assert TRAIN_TASK in waiting[0][1]

    with service(home, port, log), httpx.Client(base_url=base, timeout=10) as http:
        after = answers(http, run_id, letter.id)
        # the one answer that moves with the clock: seconds since the run was last seen
        aged = [shown[f"/runs/{run_id}"].pop("heartbeat_age") for shown in (before, after)]
        assert 0 <= aged[0] <= aged[1]
        assert after == before
        again = train(http)
        assert again.json() == {"model_run_id": run_id, "status": "queued"}
        assert again.headers["idempotent-replayed"] == "true"
        assert [r["id"] for r in http.get("/runs").json()["runs"]] == [run_id]  # no second run
        assert queued_messages(home) == waiting  # nothing sent again, nothing lost
