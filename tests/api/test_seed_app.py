"""The seed's FastAPI snippets against taskkit, with only their imports changed
(``tests/seed/snippets/``): the "Complete Application Example" with its ``POST /train``, whose
training task (``app.tasks.training_tasks`` -> ``tests.api.seedtasks``) a real worker runs on
Redis and PostgreSQL; and "Prediction Endpoint with Circuit Breaker", whose schemas and local
model come from ``taskkit.api`` (``app.schemas.prediction``, ``app.ml_engine.inference``). The
model the seed's ``/train`` made then answers taskkit's own ``/predict`` too."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest.mock import Mock, patch

import pytest
import requests
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import Engine

from taskkit.api import create_api, local_predictor
from taskkit.config import Settings, reset_settings
from taskkit.db.models import ModelRun
from taskkit.db.session import session_scope
from tests._support.workers import WorkerProcess, wait_for
from tests.api.conftest import SECRET_KEY

EPOCHS = 3
#: A row of the example dataset (workers/data/classification.csv has 10 features).
ROW = [0.1, -0.4, 1.2, 0.0, 0.7, -1.1, 0.3, 0.9, -0.2, 0.5]


@pytest.fixture
def seed_env(
    pg_schema_url: str, pg_engine: Engine, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Iterator[dict[str, str]]:
    """The seed's ``get_db`` and taskkit's defaults on this run's PostgreSQL schema, one signing
    key for the worker that seals the model and this process that loads it."""
    values = {
        "TASKKIT_DATABASE_URL": pg_schema_url,
        "TASKKIT_SECRET_KEY": SECRET_KEY,
        "TASKKIT_HOME": str(tmp_path / "home"),
    }
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    reset_settings()
    yield values
    reset_settings()


@pytest.fixture
def seed_worker(seed_env: dict[str, str], tmp_path: Path) -> Iterator[WorkerProcess]:
    from tests.api import seedtasks

    worker = WorkerProcess(
        "seed-app", tmp_path, app="tests.api.seedtasks", queue=seedtasks.kit.queue, env=seed_env
    )
    try:
        worker.wait_ready()
        yield worker
    finally:
        worker.stop()


def status_of(run_id: int) -> str:
    with session_scope(readonly=True) as db:
        run = db.get(ModelRun, run_id)
        return run.status if run is not None else "missing"


def test_the_complete_app_trains_over_post_train_and_its_model_answers_predict(
    seed_env: dict[str, str], seed_worker: WorkerProcess
):
    from tests.seed.snippets import complete_app

    client = TestClient(complete_app.app)

    response = client.post(
        "/train", json={"name": "churn", "model_type": "sgd_classifier", "epochs": EPOCHS}
    )

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "queued"
    run_id = body["model_run_id"]
    wait_for(
        lambda: status_of(run_id) in ("completed", "failed"),
        120,
        f"run {run_id} to complete ({seed_worker.log()[-2000:]})",
        step=0.2,
    )
    model = client.get(f"/models/{run_id}").json()
    assert model == {"id": run_id, "name": "churn", "status": "completed", "accuracy": None}
    with session_scope(readonly=True) as db:
        run = db.get(ModelRun, run_id)
        assert run is not None
        assert run.config == {"name": "churn", "model_type": "sgd_classifier", "epochs": EPOCHS}
        assert run.final_score is not None

    # The model it made is the newest completed one: taskkit's /predict falls back on it.
    settings = Settings(predictor_url=None)
    answer = TestClient(create_api(settings)).post("/predict", json={"features": ROW}).json()
    assert (answer["source"], answer["model_run_id"]) == ("local_fallback", run_id)
    assert answer["prediction"] in (0, 1)

    # ...and the seed's "Prediction Endpoint with Circuit Breaker", through taskkit.api
    from tests.seed.snippets import api_predict

    api_predict.prediction_circuit.reset()
    seed = FastAPI()
    seed.include_router(api_predict.router)
    seed_client = TestClient(seed)
    upstream = Mock(json=lambda: {"prediction": 1, "confidence": 0.97})
    with patch("requests.post", return_value=upstream):
        external = seed_client.post("/predict", json={"features": ROW})
    unset = {"source": None, "fallback_reason": None, "model": None, "model_run_id": None}
    assert external.json() == {
        **unset,
        "prediction": 1,
        "confidence": 0.97,
        "circuit_status": "closed",
    }

    with patch("requests.post", side_effect=requests.ConnectionError("refused")):
        fallen = seed_client.post("/predict", json={"features": ROW})
    assert fallen.status_code == 200, fallen.text
    assert fallen.json() == {
        **unset,
        "prediction": answer["prediction"],
        "model": "local_fallback",
        "confidence": 0.85,
        "circuit_status": "closed",
        "fallback_reason": "refused",
    }
    assert seed_client.post("/predict", json={"features": []}).status_code == 422
    api_predict.prediction_circuit.reset()


def test_the_seed_prediction_endpoint_opens_its_circuit_and_stays_on_the_local_model(
    seed_env: dict[str, str],
):
    from sklearn.linear_model import LogisticRegression

    from taskkit.tasks._runs import mark_completed
    from tests.seed.snippets import api_predict

    with session_scope() as db:
        run = ModelRun(name="local", model_type="logistic", config={}, status="running")
        db.add(run)
        db.flush()
        run_id = run.id
    fitted = LogisticRegression().fit([[0.0, 0.0], [1.0, 1.0]], [0, 1])
    mark_completed(run_id, fitted, 1.0)
    local_predictor.forget()  # the last test's run had this id too (its tables were emptied)
    assert local_predictor.current()[0] == run_id

    api_predict.prediction_circuit.reset()
    client = TestClient(_router_app(api_predict.router))
    with patch("requests.post", side_effect=requests.ConnectionError("refused")) as post:
        answers = [client.post("/predict", json={"features": [1.0, 1.0]}).json() for _ in range(6)]
    assert post.call_count == 5  # failure_threshold=5, then the open circuit is not called
    assert [a["circuit_status"] for a in answers] == ["closed"] * 4 + ["open", "open"]
    assert {a["prediction"] for a in answers} == {1}
    assert answers[-1]["fallback_reason"] is None  # the seed's open branch gives no reason
    api_predict.prediction_circuit.reset()


def _router_app(router: Any) -> FastAPI:
    app = FastAPI()
    app.include_router(router)
    return app
