"""``POST /predict``: an external predictor (a local HTTP server on 127.0.0.1 that fails on
command) called through ``taskkit.http.ResilientClient`` and its breaker, shared in Redis; the
newest completed run's model answers when the breaker is open or the call fails; bad features
are 422, never 500."""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from fastapi.testclient import TestClient
from sklearn.linear_model import LogisticRegression

from taskkit.api import LocalModel, create_api
from taskkit.config import Settings
from taskkit.db.models import ModelRun
from taskkit.db.session import session_scope
from taskkit.tasks._runs import mark_completed
from tests.api.conftest import AUTH

FEATURES = [0.5, -1.0, 2.0]


class Predictor(http.server.BaseHTTPRequestHandler):
    """``/predict`` answers ``{"prediction": 42, "confidence": 0.99}``, ``/health`` 200; both
    500 while ``failing``. ``hits`` lists the paths asked."""

    failing = False
    hits: list[str] = []
    answer: dict[str, Any] = {"prediction": 42, "confidence": 0.99}

    def _answer(self, body: dict[str, Any]) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        self.hits.append(self.path)
        code = 500 if self.failing else 200
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        payload = json.dumps(body if code == 200 else {"error": "boom"}).encode()
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def do_POST(self) -> None:
        self._answer(self.answer)

    def do_GET(self) -> None:
        self._answer({"status": "ok"})

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def predictor(redis_client: redis.Redis) -> Iterator[str]:
    Predictor.failing, Predictor.hits = False, []
    Predictor.answer = {"prediction": 42, "confidence": 0.99}
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Predictor)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    port = server.server_address[1]
    yield f"http://127.0.0.1:{port}"
    server.shutdown()
    server.server_close()
    for pattern in (f"taskkit:circuit:{{http:127.0.0.1:{port}}}*", f"taskkit:budget:*{port}*"):
        keys = list(redis_client.scan_iter(match=pattern))
        if keys:
            redis_client.delete(*keys)


def completed_run(database_url: str, n_features: int = 3) -> tuple[int, Any]:
    """A completed run whose final model (sealed as a worker stores it) is a fitted classifier."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(60, n_features))
    y = (X[:, 0] > 0).astype(int)
    model = LogisticRegression().fit(X, y)
    with session_scope(database_url) as db:
        run = ModelRun(name="local", model_type="logistic", config={}, status="running")
        db.add(run)
        db.flush()
        run_id = run.id
    mark_completed(run_id, model, 0.9, database_url=database_url)
    return run_id, model


def local_answer(model: Any, features: list[float]) -> tuple[int, float]:
    return int(model.predict([features])[0]), float(max(model.predict_proba([features])[0]))


def test_the_breaker_opens_the_local_model_answers_and_a_probe_closes_it(
    api_settings: Settings, predictor: str, tmp_path: Path
):
    """The must-show, with the breaker in this process (its Redis variant is the next test)."""
    run_id, model = completed_run(api_settings.database_url)
    update = {"predictor_url": predictor, "lease_url": (tmp_path / "leases").as_uri()}
    settings = api_settings.model_copy(update=update)
    api = create_api(settings)
    client = TestClient(api)
    breaker_name = "http:" + predictor.removeprefix("http://")
    expected, confidence = local_answer(model, FEATURES)

    first = client.post("/predict", json={"features": FEATURES})
    assert first.status_code == 200, first.text
    assert first.json() == {
        "prediction": 42,
        "confidence": 0.99,
        "source": "external",
        "circuit_status": "closed",
    }

    Predictor.failing = True
    answers = [client.post("/predict", json={"features": FEATURES}).json() for _ in range(5)]
    for answer in answers:
        assert answer["source"] == "local_fallback"
        assert (answer["prediction"], answer["model_run_id"]) == (expected, run_id)
        assert answer["confidence"] == pytest.approx(confidence)
        assert "500" in answer["fallback_reason"]
    assert [a["circuit_status"] for a in answers] == ["closed"] * 4 + ["open"]  # threshold 5
    assert Predictor.hits.count("/predict") == 6  # POST is not retried: one call each

    health = client.get("/health").json()
    assert health["status"] == "degraded"
    assert health["circuits"][breaker_name] == "OPEN"
    breakers = {b["name"]: b for b in client.get("/breakers").json()["breakers"]}
    assert breakers[breaker_name]["state"] == "open"
    assert breakers[breaker_name]["failure_threshold"] == 5

    # open: at most one health probe per interval, and no call to /predict at all
    Predictor.hits.clear()
    api.state.predict_probe_interval = 3600
    for _ in range(3):
        answer = client.post("/predict", json={"features": FEATURES}).json()
        assert (answer["source"], answer["circuit_status"]) == ("local_fallback", "open")
        assert answer["fallback_reason"] == f"circuit breaker {breaker_name} is open"
    assert Predictor.hits == ["/health"]

    # the predictor recovers: the next probe closes the breaker and it answers again
    Predictor.failing = False
    api.state.predict_probe_interval = 0
    recovered = client.post("/predict", json={"features": FEATURES})
    assert recovered.json()["source"] == "external", recovered.json()
    assert recovered.json()["circuit_status"] == "closed"
    assert Predictor.hits[-2:] == ["/health", "/predict"]
    assert client.get("/health").json()["circuits"][breaker_name] == "CLOSED"


def test_the_predictor_breaker_is_shared_in_redis(
    api_settings: Settings, predictor: str, redis_client: redis.Redis
):
    """With a Redis (here the broker's), the predictor's breaker keeps its state there: every
    service process and worker that calls the predictor sees it open."""
    completed_run(api_settings.database_url)
    api = create_api(api_settings.model_copy(update={"predictor_url": predictor}))
    client = TestClient(api)
    breaker_name = "http:" + predictor.removeprefix("http://")
    Predictor.failing = True

    answers = [client.post("/predict", json={"features": FEATURES}).json() for _ in range(5)]

    assert {a["source"] for a in answers} == {"local_fallback"}
    assert redis_client.hget(f"taskkit:circuit:{{{breaker_name}}}", "state") == b"open"
    breakers = {b["name"]: b for b in client.get("/breakers").json()["breakers"]}
    assert (breakers[breaker_name]["state"], breakers[breaker_name]["shared"]) == ("open", True)
    reset = client.post(f"/breakers/{breaker_name}/reset", headers=AUTH)
    assert reset.json()["state"] == "closed"
    assert redis_client.hget(f"taskkit:circuit:{{{breaker_name}}}", "state") is None


def test_an_external_answer_that_does_not_fit_is_answered_locally_not_a_500(
    api_settings: Settings, predictor: str
):
    run_id, _ = completed_run(api_settings.database_url)
    client = TestClient(create_api(api_settings.model_copy(update={"predictor_url": predictor})))
    Predictor.answer = {"prediction": {"label": "churn", "scores": [0.1, 0.9]}, "extra": [1]}
    structured = client.post("/predict", json={"features": FEATURES}).json()
    assert structured["source"] == "external"  # any JSON prediction, extra fields kept
    assert structured["prediction"] == {"label": "churn", "scores": [0.1, 0.9]}
    assert structured["extra"] == [1]

    Predictor.answer = {"prediction": 1, "confidence": "high"}
    response = client.post("/predict", json={"features": FEATURES})

    assert response.status_code == 200
    answer = response.json()
    assert (answer["source"], answer["model_run_id"]) == ("local_fallback", run_id)
    assert answer["fallback_reason"].startswith(
        "the external predictor's answer does not fit: confidence: "
    )


def test_without_a_predictor_the_local_model_answers(api_settings: Settings):
    run_id, model = completed_run(api_settings.database_url)
    client = TestClient(create_api(api_settings))

    answer = client.post("/predict", json={"features": [1, 2.5, -3]})

    assert answer.status_code == 200
    expected, confidence = local_answer(model, [1, 2.5, -3])
    assert answer.json() == {
        "prediction": expected,
        "confidence": pytest.approx(confidence),
        "source": "local_fallback",
        "circuit_status": "none",
        "fallback_reason": "no external predictor (TASKKIT_PREDICTOR_URL)",
        "model": "local_fallback",
        "model_run_id": run_id,
    }


def test_the_newest_completed_run_answers_once_the_cache_refreshes(api_settings: Settings):
    now = [0.0]
    api = create_api(api_settings)
    api.state.local_model = LocalModel(api_settings.database_url, refresh=10, clock=lambda: now[0])
    client = TestClient(api)
    first_id, _ = completed_run(api_settings.database_url)
    assert client.post("/predict", json={"features": FEATURES}).json()["model_run_id"] == first_id

    second_id, _ = completed_run(api_settings.database_url)
    assert client.post("/predict", json={"features": FEATURES}).json()["model_run_id"] == first_id
    now[0] = 10.0
    assert client.post("/predict", json={"features": FEATURES}).json()["model_run_id"] == second_id


@pytest.mark.parametrize(
    ("body", "where"),
    [
        ({"features": []}, "at least 1 item"),
        ({"features": ["1.5"]}, "valid number"),
        ({"features": [True]}, "valid number"),
        ({"features": [0.0] * 10_001}, "at most 10000 items"),
        ({"features": 3}, "valid list"),
        ({}, "Field required"),
        ({"features": [1.0], "extra": 1}, "Extra inputs are not permitted"),
    ],
)
def test_bad_features_are_422_with_the_problem(client: TestClient, body: Any, where: str):
    response = client.post("/predict", json=body)
    assert response.status_code == 422
    assert where in json.dumps(response.json()["detail"])


def test_nan_and_infinity_are_422(client: TestClient):
    for literal in ("NaN", "Infinity", "-Infinity"):
        response = client.post(
            "/predict",
            content=f'{{"features": [1.0, {literal}]}}',
            headers={"Content-Type": "application/json"},
        )
        assert response.status_code == 422, literal
        assert "finite number" in response.text


def test_a_feature_count_the_model_was_not_trained_on_is_422(api_settings, client: TestClient):
    run_id, _ = completed_run(api_settings.database_url)
    response = client.post("/predict", json={"features": [1.0, 2.0]})
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert detail.startswith(f"the local model (run {run_id}) cannot use these features: ")
    assert "3 features" in detail


def test_no_predictor_and_no_local_model_is_503_saying_both(client: TestClient):
    response = client.post("/predict", json={"features": FEATURES})
    assert response.status_code == 503
    assert response.json()["detail"] == (
        "no prediction: the external predictor did not answer (no external predictor "
        "(TASKKIT_PREDICTOR_URL)) and no completed training run has a model"
    )
