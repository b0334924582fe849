"""POST /train over HTTP with a real worker (a subprocess), real PostgreSQL and Redis: the run
completes and its event stream delivers every epoch in order, then closes; an Idempotency-Key
makes one run however many times (and however concurrently) it is sent; a token is needed; a
broker that is down is a 503 and makes nothing."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, func, select

from taskkit.api import create_api
from taskkit.config import Settings, get_settings, reset_settings
from taskkit.db.models import ModelRun
from taskkit.db.session import session_scope
from taskkit.tasks import ResilientTask, TrainingTask, create_app, submit_run
from tests._support.workers import WorkerProcess
from tests.api import trainapp
from tests.api.runhelpers import AUTH, TOKEN, serving, sse_events

EPOCHS = 5


def body(**extra: Any) -> dict[str, Any]:
    return {
        "name": "over-http",
        "model_type": "sgd",
        "task": trainapp.train.name,
        "epochs": EPOCHS,
        "seed": 3,
        "batch_size": 200,
        **extra,
    }


@pytest.fixture
def env(
    redis_url: str,
    pg_schema_url: str,
    pg_engine: Engine,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[dict[str, str]]:
    """PostgreSQL, Redis, a checkpoint folder and the token, for this process and its worker."""
    values = {
        "TASKKIT_DATABASE_URL": pg_schema_url,
        "TASKKIT_CHECKPOINT_DIR": str(tmp_path / "checkpoints"),
        "TASKKIT_SECRET_KEY": "train-api-tests-signing-key",
        "TASKKIT_API_TOKEN": TOKEN,
    }
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    reset_settings()
    trainapp.app.conf.taskkit_database_url = pg_schema_url
    yield values
    trainapp.app.control.purge()  # a run sent with no worker is not trained by a later test
    reset_settings()


@pytest.fixture
def api(env: dict[str, str]) -> Any:
    api = create_api(get_settings(), celery_app=trainapp.app)
    api.state.events_interval = 0.05
    return api


@pytest.fixture
def client(api: Any) -> Iterator[TestClient]:
    with TestClient(api) as client:
        yield client


def runs(**where: Any) -> list[ModelRun]:
    with session_scope() as db:
        found = list(db.scalars(select(ModelRun).filter_by(**where).order_by(ModelRun.id)))
        db.expunge_all()
        return found


def count_runs() -> int:
    with session_scope() as db:
        return int(db.scalar(select(func.count()).select_from(ModelRun)) or 0)


# -- the must-show: a real worker --------------------------------------------------------------


@pytest.fixture
def worker(env: dict[str, str], tmp_path: Path) -> Iterator[WorkerProcess]:
    trainapp.app.control.purge()
    worker = WorkerProcess(
        "train-api", tmp_path, app="tests.api.trainapp", queue=trainapp.QUEUE, env=env
    )
    try:
        worker.wait_ready()
        yield worker
    finally:
        worker.stop()


def test_a_run_submitted_over_http_completes_and_streams_every_epoch_in_order(
    api: Any, worker: WorkerProcess
) -> None:
    """The worker trains at its own pace (nothing holds an epoch until the stream has seen it):
    the stream sends each epoch from the run's history, however many end between two reads."""
    with serving(api) as base:
        submitted = httpx.post(f"{base}/train", json=body(), headers=AUTH, timeout=30)
        assert submitted.status_code == 200, submitted.text
        run_id = submitted.json()["model_run_id"]
        assert submitted.json() == {"model_run_id": run_id, "status": "queued"}

        url = f"{base}/runs/{run_id}/events"
        with httpx.stream("GET", url, timeout=60) as stream:
            events = list(sse_events(stream.iter_lines()))
        # The list is whole: the service closed the stream.

        shown = httpx.get(f"{base}/runs/{run_id}", timeout=30).json()
        model = httpx.get(f"{base}/models/{run_id}", timeout=30).json()

    epochs = [e["data"] for e in events if e.get("event") == "epoch"]
    assert [e["epoch"] for e in epochs] == list(range(1, EPOCHS + 1))
    assert all(set(e["metrics"]) == {"loss", "score"} for e in epochs)
    progress = [e["data"] for e in events if e.get("event") == "progress"]
    assert all(set(p["metrics"]) >= {"loss", "score"} for p in progress if p["epoch"])
    assert progress[-1]["status"] == "completed"
    assert progress[-1]["epoch"] == EPOCHS
    assert events[-1] == {"event": "end", "data": {"run_id": run_id, "status": "completed"}}
    assert shown["status"] == "completed"
    assert shown["progress"]["epoch"] == EPOCHS
    assert shown["checkpoints"], "the completed run keeps its final checkpoint"
    assert shown["checkpoints"][-1]["step"] == EPOCHS - 1
    assert model["status"] == "completed"
    assert model["final_score"] is not None


def test_epochs_that_end_faster_than_the_stream_reads_are_each_delivered_in_order(
    api: Any, worker: WorkerProcess
) -> None:
    """No gate: the worker trains 40 epochs of a few milliseconds each while the stream reads
    the database once per 0.5 s, and the progress row is throttled to one write a second; the
    stream still sends every epoch, once, in order, from the run's history."""
    api.state.events_interval = 0.5
    epochs = 40
    with serving(api) as base:
        submitted = httpx.post(
            f"{base}/train",
            json=body(epochs=epochs, checkpoint_every=100),
            headers=AUTH,
            timeout=30,
        )
        assert submitted.status_code == 200, submitted.text
        run_id = submitted.json()["model_run_id"]
        with httpx.stream("GET", f"{base}/runs/{run_id}/events", timeout=60) as stream:
            events = list(sse_events(stream.iter_lines()))
        shown = httpx.get(f"{base}/runs/{run_id}", timeout=30).json()

    sent = [e for e in events if e.get("event") == "epoch"]
    assert [e["data"]["epoch"] for e in sent] == list(range(1, epochs + 1))
    assert [e["id"] for e in sent] == [str(n) for n in range(1, epochs + 1)]
    assert all(set(e["data"]["metrics"]) == {"loss", "score"} for e in sent)
    assert all(e["data"]["run_id"] == run_id for e in sent)
    assert events[-1] == {"event": "end", "data": {"run_id": run_id, "status": "completed"}}
    assert shown["status"] == "completed"


def test_the_same_idempotency_key_sent_concurrently_makes_one_run(
    api: Any, worker: WorkerProcess
) -> None:
    key = f"k-{uuid.uuid4().hex}"
    start = threading.Barrier(8)

    def send(_: int) -> httpx.Response:
        start.wait(10)
        headers = {**AUTH, "Idempotency-Key": key}
        return httpx.post(f"{base}/train", json=body(epochs=2), headers=headers, timeout=30)

    with serving(api) as base, ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(send, range(8)))

    assert [a.status_code for a in answers] == [200] * 8, [a.text for a in answers]
    assert len({a.json()["model_run_id"] for a in answers}) == 1
    made = runs(idempotency_key=key)
    assert len(made) == 1
    assert count_runs() == 1


# -- without a worker --------------------------------------------------------------------------


def test_train_answers_as_the_seed_and_sends_the_training_task(client: TestClient) -> None:
    answer = client.post("/train", json=body(), headers=AUTH)

    assert answer.status_code == 200, answer.text
    run_id = answer.json()["model_run_id"]
    assert answer.json() == {"model_run_id": run_id, "status": "queued"}
    assert "Idempotent-Replayed" not in answer.headers
    [run] = runs(id=run_id)
    assert (run.name, run.model_type, run.status, run.task_name) == (
        "over-http",
        "sgd",
        "queued",
        trainapp.train.name,
    )
    assert run.config == body()
    assert run.idempotency_key is None


def test_the_same_key_twice_returns_the_same_run_and_another_body_is_refused(
    client: TestClient,
) -> None:
    headers = {**AUTH, "Idempotency-Key": "order-7"}

    first = client.post("/train", json=body(), headers=headers)
    again = client.post("/train", json=body(), headers=headers)
    other = client.post("/train", json=body(epochs=9), headers=headers)

    assert first.status_code == again.status_code == 200
    assert again.json() == first.json()
    assert again.headers["Idempotent-Replayed"] == "true"
    run_id = first.json()["model_run_id"]
    assert other.status_code == 422
    assert other.json() == {
        "detail": f"Idempotency-Key 'order-7' was used for another request (run {run_id}); "
        "use a new key for a new run"
    }
    assert [r.id for r in runs()] == [run_id]


def test_submit_run_with_a_key_returns_the_first_run(env: dict[str, str]) -> None:
    first = submit_run(trainapp.train, {"epochs": 1}, idempotency_key="k1")
    second = submit_run(trainapp.train, {"epochs": 1}, idempotency_key="k1")

    assert second == first
    assert count_runs() == 1


@pytest.mark.parametrize(
    ("headers", "detail"),
    [
        ({}, "missing or wrong bearer token"),
        ({"Authorization": "Bearer wrong"}, "missing or wrong bearer token"),
    ],
)
def test_train_needs_the_token_and_makes_nothing_without_it(
    client: TestClient, headers: dict[str, str], detail: str
) -> None:
    answer = client.post("/train", json=body(), headers=headers)

    assert answer.status_code == 401
    assert answer.json() == {"detail": detail}
    assert count_runs() == 0


@pytest.mark.parametrize(
    ("extra", "headers", "says"),
    [
        ({"task": "tests.nothing.here"}, {}, "'tests.nothing.here' is not a training task"),
        ({"task": "__ping__"}, {}, "'__ping__' is not a training task"),
        ({"name": "x" * 256}, {}, "name"),
        ({"model_type": ""}, {}, "model_type"),
        ({}, {"Idempotency-Key": "k" * 256}, "idempotency-key"),
        ({"name": "a\x00b"}, {}, "NUL character"),
        ({"data": {"paths": ["ok", "bad\x00"]}}, {}, "NUL character"),
        ({"k\x00": 1}, {}, "NUL character"),
    ],
)
def test_a_bad_request_is_a_clear_422_and_makes_nothing(
    client: TestClient, extra: dict[str, Any], headers: dict[str, str], says: str
) -> None:
    answer = client.post("/train", json=body(**extra), headers={**AUTH, **headers})

    assert answer.status_code == 422
    assert says in str(answer.json()["detail"]).lower() or says in str(answer.json()["detail"])
    assert count_runs() == 0


@trainapp.app.task(base=ResilientTask, bind=True, shared=False, name="__ping__")
def _not_training(self: ResilientTask, model_run_id: int, config: dict[str, Any]) -> None:
    """A task of the app that is not a TrainingTask: /train must not send it."""


def test_a_broker_that_is_down_is_a_503_and_makes_no_run(env: dict[str, str]) -> None:
    down = create_app(
        "train-api-down",
        settings=Settings(
            broker_url="redis://127.0.0.1:1/0", result_backend="redis://127.0.0.1:1/0"
        ),
    )

    @down.task(base=TrainingTask, bind=True, shared=False, name="down.train")
    def train(self: TrainingTask, model_run_id: int, config: dict[str, Any]) -> None:
        """Never runs: its broker is down."""

    api = create_api(get_settings(), celery_app=down)
    with TestClient(api) as client:
        answer = client.post("/train", json=body(task="down.train"), headers=AUTH)

    assert answer.status_code == 503
    assert "127.0.0.1:1" in answer.json()["detail"]
    assert answer.headers["Retry-After"] == "5"
    assert count_runs() == 0
