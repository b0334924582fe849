"""POST /runs/{id}/resume, /stop and /fork against a real worker subprocess (embedded defaults,
``tests.training.steerapp``): the token, the answers, and what each does to the runs."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery
from fastapi.testclient import TestClient

from taskkit.api import create_api
from taskkit.config import Settings
from taskkit.db.models import ModelRun
from taskkit.db.session import session_scope
from taskkit.tasks import create_app, submit_run
from tests._support.workers import wait_for
from tests.training import steerapp

TOKEN = "control-api-token-5b1e"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def steering(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Celery]:
    with steerapp.steering_worker(
        tmp_path_factory.mktemp("control"), "control-api-key-0123456"
    ) as app:
        yield app


@pytest.fixture
def client(steering: Celery) -> Iterator[TestClient]:
    with TestClient(create_api(Settings(api_token=TOKEN), celery_app=steering)) as test_client:
        yield test_client


def row(run_id: int) -> dict[str, Any]:
    with session_scope() as db:
        run = db.get(ModelRun, run_id)
        assert run is not None
        return {
            "status": run.status,
            "config": run.config,
            "version": run.version,
            "parent": (run.parent_run_id, run.parent_step),
            "task_id": run.task_id,
            "stop": run.stop_requested_at,
        }


def runs() -> int:
    with session_scope() as db:
        return db.query(ModelRun).count()


def wait_status(run_id: int, wanted: str) -> None:
    wait_for(lambda: row(run_id)["status"] == wanted, 90, f"run {run_id} {wanted}", step=0.1)


def submit(app: Celery, **config: Any) -> int:
    run_id, _ = submit_run(app.tasks[steerapp.TASK], {"seed": 3, **config}, name="api")
    return run_id


def test_stop_then_resume_over_http(client: TestClient, steering: Celery) -> None:
    run_id = submit(steering, epochs=10, epoch_pause=0.3)
    wait_for(lambda: len(steerapp.epochs_trained(run_id)) >= 2, 90, "two epochs")

    busy = client.post(f"/runs/{run_id}/resume", headers=AUTH)
    assert busy.status_code == 409, busy.text
    assert "still running on a live worker" in busy.json()["detail"]

    stopping = client.post(f"/runs/{run_id}/stop", headers=AUTH)
    assert stopping.status_code == 202, stopping.text
    assert stopping.json() == {"model_run_id": run_id, "status": "stopping"}
    wait_status(run_id, "stopped")
    again = client.post(f"/runs/{run_id}/stop", headers=AUTH)
    assert again.status_code == 409
    assert again.json()["detail"] == f"training run {run_id} is stopped: there is nothing to stop"

    resumed = client.post(f"/runs/{run_id}/resume", headers=AUTH)
    assert resumed.status_code == 202, resumed.text
    assert resumed.json()["status"] == "queued"
    assert resumed.json()["task_id"] == row(run_id)["task_id"]
    wait_status(run_id, "completed")
    assert [e for e, _ in steerapp.epochs_trained(run_id)] == list(range(10))
    done = client.post(f"/runs/{run_id}/resume", headers=AUTH)
    assert done.status_code == 409
    assert "already completed" in done.json()["detail"]
    assert client.post(f"/runs/{run_id}/stop", headers=AUTH).status_code == 409


def test_fork_over_http(client: TestClient, steering: Celery) -> None:
    parent_id = submit(steering, epochs=6)
    wait_status(parent_id, "completed")  # kept: the final checkpoint (5) and the best one(s)
    parent = row(parent_id)

    missing = client.post(f"/runs/{parent_id}/fork", headers=AUTH, json={"from_step": 99})
    assert missing.status_code == 422
    assert "no checkpoint at step 99 (its checkpoint steps: " in missing.json()["detail"]
    assert "5" in missing.json()["detail"]

    forked = client.post(
        f"/runs/{parent_id}/fork",
        headers=AUTH,
        json={"config": {"alpha": 0.002, "epochs": 8}, "name": "longer"},
    )
    assert forked.status_code == 201, forked.text
    answer = forked.json()
    fork_id = answer["model_run_id"]
    assert answer["parent_run_id"] == parent_id
    assert answer["parent_step"] == 5  # the newest by default
    wait_status(fork_id, "completed")
    assert steerapp.epochs_trained(fork_id) == [(6, 0.002), (7, 0.002)]
    assert row(fork_id)["config"] == {**parent["config"], "alpha": 0.002, "epochs": 8}
    assert row(parent_id) == parent


def test_without_the_token_nothing_changes(client: TestClient, steering: Celery) -> None:
    run_id = submit(steering, epochs=3)
    wait_status(run_id, "completed")
    before, count = row(run_id), runs()

    for headers in ({}, {"Authorization": "Bearer wrong"}):
        for action, body in (("resume", None), ("stop", None), ("fork", {"from_step": 2})):
            answer = client.post(f"/runs/{run_id}/{action}", headers=headers, json=body)
            assert answer.status_code == 401, (action, answer.text)
            assert answer.json()["detail"]

    assert (row(run_id), runs()) == (before, count)


def test_unknown_runs_and_bad_bodies(client: TestClient, steering: Celery) -> None:
    count = runs()
    for action in ("resume", "stop", "fork"):
        for run_id in (987654, 2**70):
            answer = client.post(f"/runs/{run_id}/{action}", headers=AUTH)
            assert answer.status_code == 404, (action, answer.text)
            assert answer.json()["detail"] == f"model run {run_id} not found"
    for body in ({"from_step": -1}, {"steps": 3}, {"config": [1]}, {"name": ""}):
        answer = client.post("/runs/1/fork", headers=AUTH, json=body)
        assert answer.status_code == 422, (body, answer.text)
    assert runs() == count


def test_a_broker_that_does_not_answer_is_a_503_and_changes_nothing(
    steering: Celery,
) -> None:
    run_id = submit(steering, epochs=3, epoch_pause=0.0)
    wait_status(run_id, "completed")
    before, count = row(run_id), runs()
    dead = create_app("dead", settings=Settings(broker_url="redis://127.0.0.1:9/0"))
    api = create_api(Settings(api_token=TOKEN), celery_app=dead)

    with TestClient(api) as client:
        for action in ("resume", "fork"):
            answer = client.post(f"/runs/{run_id}/{action}", headers=AUTH)
            assert answer.status_code == 503, (action, answer.text)
            assert "127.0.0.1:9" in answer.json()["detail"]

    assert (row(run_id), runs()) == (before, count)
