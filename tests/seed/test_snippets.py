"""The seed's snippets that use only the recovery primitives, run against taskkit.

Each snippet lives unchanged (but for its imports) in ``tests/seed/snippets/``; these tests call
what it defines the way its own usage lines do.
"""

from __future__ import annotations

import http.server
import json
import pickle
import threading
from collections.abc import Iterator
from unittest.mock import Mock, patch

import numpy as np
import pandas as pd
import pytest
import requests
from fastapi import Depends, FastAPI
from fastapi.testclient import TestClient

from taskkit.recovery import (
    CircuitBreaker,
    CircuitState,
    TransactionManager,
    fallback,
    retry,
    timeout,
)

# -- API endpoints ------------------------------------------------------------------------------


def test_basic_api_call_with_retry_and_timeout_in_fastapi():
    from tests.seed.snippets import api_basic

    app = FastAPI()
    app.include_router(api_basic.router)
    client = TestClient(app)
    upstream_ok = Mock(json=lambda: {"rows": [1, 2]}, raise_for_status=lambda: None)
    with patch("requests.get") as get:
        get.side_effect = [requests.ConnectionError("reset"), upstream_ok]
        response = client.get("/external-data")
    assert response.status_code == 200
    assert response.json() == {"rows": [1, 2]}
    assert get.call_count == 2
    with patch("requests.get", side_effect=requests.ConnectionError("down")) as get:
        response = client.get("/external-data")
    assert response.status_code == 503
    assert "External service unavailable" in response.json()["detail"]
    assert get.call_count == 3  # max_attempts=3


def test_fastapi_dependency_injection_sees_the_real_parameters():
    app = FastAPI()

    def get_db() -> Iterator[str]:
        yield "session"

    attempts = []

    @app.get("/models/{model_id}")
    @timeout(seconds=5)
    @retry(max_attempts=3, delay=0.5)
    async def get_model(model_id: int, verbose: bool = False, db: str = Depends(get_db)):
        attempts.append(model_id)
        if len(attempts) < 2:
            raise ConnectionError("transient")
        return {"id": model_id, "verbose": verbose, "db": db}

    client = TestClient(app)
    assert client.get("/models/7?verbose=true").json() == {
        "id": 7,
        "verbose": True,
        "db": "session",
    }
    assert attempts == [7, 7]  # retried once inside the endpoint
    assert client.get("/models/abc").status_code == 422  # FastAPI validated the real int parameter


# -- file operations ----------------------------------------------------------------------------


def test_read_file_with_retry_and_fallback(tmp_path):
    from tests.seed.snippets import file_operations as snippet

    # The snippet's own usage line ran at import: the path does not exist, so it fell back.
    assert snippet.config == snippet.get_default_config()
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"debug": True}))
    assert snippet.load_config(str(path)) == {"debug": True}


def test_save_file_with_retry_writes_atomically(tmp_path):
    from tests.seed.snippets import file_operations as snippet

    target = tmp_path / "out" / "results.json"
    snippet.save_results({"accuracy": 0.91}, str(target))
    assert json.loads(target.read_text()) == {"accuracy": 0.91}
    assert not (tmp_path / "out" / "results.json.tmp").exists()


def test_load_model_with_timeout(tmp_path):
    from tests.seed.snippets import file_operations as snippet

    path = tmp_path / "model.pkl"
    path.write_bytes(pickle.dumps({"weights": [1, 2, 3]}))
    assert snippet.load_model_file(str(path)) == {"weights": [1, 2, 3]}
    with pytest.raises(FileNotFoundError):
        snippet.load_model_file(str(tmp_path / "missing.pkl"))


# -- external services, against a local HTTP server -----------------------------------------------


class _Handler(http.server.BaseHTTPRequestHandler):
    status: dict[str, int] = {}
    hits: list[str] = []

    def do_GET(self) -> None:
        self.hits.append(self.path)
        code = self.status.get(self.path, 200)
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(json.dumps({"path": self.path}).encode())

    do_POST = do_GET

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def http_service() -> Iterator[str]:
    _Handler.status, _Handler.hits = {}, []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_api_client_with_circuit_breaker(http_service):
    from tests.seed.snippets.external_services import ExternalAPIClient

    client = ExternalAPIClient(http_service)
    # the snippet's usage lines, against a reachable server
    data = client.get("/users")
    critical_data = client.get("/critical", use_circuit=False)
    assert data == {"path": "/users"}
    assert critical_data == {"path": "/critical"}
    assert client.post("/items", {"a": 1}) == {"path": "/items"}

    _Handler.status["/flaky"] = 500
    for _ in range(5):  # each call is 3 attempts; 5 failed calls open the circuit
        with pytest.raises(requests.HTTPError):
            client.get("/flaky")
    assert client.circuit.state is CircuitState.OPEN
    hits = len(_Handler.hits)
    with pytest.raises(Exception, match="Circuit breaker is OPEN"):
        client.get("/flaky")
    assert len(_Handler.hits) == hits  # failed fast, no request sent
    with pytest.raises(requests.HTTPError):
        client.get("/flaky", use_circuit=False)  # the bypass still calls out
    assert len(_Handler.hits) == hits + 3


def test_service_with_health_check(http_service):
    from tests.seed.snippets.external_services import ExternalMLService

    service = ExternalMLService(http_service)
    assert service.predict([1.0, 2.0]) == {"path": "/predict"}
    _Handler.status["/predict"] = 503
    for _ in range(3):
        with pytest.raises(requests.HTTPError):
            service.predict([1.0])
    assert service.circuit.state is CircuitState.OPEN
    _Handler.status["/health"] = 500
    with pytest.raises(Exception, match="Service unavailable \\(circuit open\\)"):
        service.predict([1.0])
    # the service recovers; the health check closes the circuit by hand
    _Handler.status = {}
    assert service.predict([1.0]) == {"path": "/predict"}
    assert service.circuit.state is CircuitState.CLOSED


# -- ML pipeline ----------------------------------------------------------------------------------


def test_data_loading_with_retry_and_fallback(tmp_path):
    from tests.seed.snippets import ml_pipeline as snippet

    backup = tmp_path / "backup.csv"
    pd.DataFrame({"age": [30, 40], "amount": [1.0, 2.0]}).to_csv(backup, index=False)
    df = snippet.load_dataset_with_fallback(str(tmp_path / "missing.csv"), str(backup))
    assert list(df["age"]) == [30, 40]
    with pytest.raises(FileNotFoundError, match="Could not load dataset"):
        snippet.load_dataset_with_fallback(str(tmp_path / "a.csv"), str(tmp_path / "b.csv"))


def test_feature_engineering_with_optional_steps():
    from tests.seed.snippets import ml_pipeline as snippet

    df = pd.DataFrame({"age": [2, 3], "amount": [0.0, np.e - 1]})
    out = snippet.engineer_features(df)  # feature1/feature2 are missing: that step falls back
    assert list(out["age_squared"]) == [4, 9]
    assert list(out["interaction"]) == [0, 0]
    assert out["log_amount"].round(6).tolist() == [0.0, 1.0]


def test_train_model_with_retry():
    from tests.seed.snippets import ml_pipeline as snippet

    X = np.random.default_rng(0).normal(size=(60, 3))
    y = (X[:, 0] > 0).astype(int)
    model = snippet.train_model_with_retry(X, y, {"n_estimators": 5, "random_state": 0})
    assert model.score(X, y) > 0.9


# -- batch processing -----------------------------------------------------------------------------


def test_process_dataframe_in_batches(tmp_path, monkeypatch):
    from tests.seed.snippets import batch_processing as snippet

    monkeypatch.chdir(tmp_path)
    pd.DataFrame({"value": range(1200)}).to_csv("large_dataset.csv", index=False)

    def validate(row: dict) -> bool:  # the snippet calls it but does not define it
        if row["value"] % 100 == 7:
            raise ValueError(f"row {row['value']} is invalid")
        return True

    # the snippet's usage example, with its validate() supplied
    def transform_row(row: dict) -> dict:
        row["processed"] = row["value"] * 2
        row["validated"] = validate(row)
        return row

    df = pd.read_csv("large_dataset.csv")
    processed_df, failures = snippet.process_dataframe_in_batches(df, transform_row, batch_size=500)
    assert len(processed_df) == 1188
    assert len(failures) == 12
    assert list(processed_df["processed"][:3]) == [0, 2, 4]


def test_parallel_batch_process_keeps_every_item():
    from tests.seed.snippets import batch_processing as snippet

    # the snippet's own usage ran at import, over 10,000 items
    assert sorted(snippet.successful) == [i**2 for i in range(10_000)]
    assert snippet.failed == []


# -- configuration templates and quick reference --------------------------------------------------


def test_configuration_templates_feed_the_primitives_as_they_are():
    from tests.seed.snippets import config_templates as config

    calls = []

    @retry(**config.EXTERNAL_API_RETRY_CONFIG)
    def external():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError
        return "ok"

    assert external() == "ok"
    breaker = CircuitBreaker(**config.EXTERNAL_API_CIRCUIT)
    assert breaker.failure_threshold == 5
    assert retry(**config.DATABASE_RETRY_CONFIG).delays() == [0.5, 1.0]
    assert retry(**config.FILE_RETRY_CONFIG).exceptions == (IOError, OSError)


def test_quick_reference_patterns(tmp_path):
    circuit_breaker = CircuitBreaker(failure_threshold=5, recovery_timeout=60)

    @timeout(seconds=30)
    @retry(max_attempts=3, delay=1.0, backoff=2.0)
    @circuit_breaker
    def api_call():
        return "called"

    def use_default():
        return "default"

    @fallback(use_default)
    @retry(max_attempts=2)
    def load_file(path):
        with open(path) as f:
            return f.read()

    class Session:
        def __init__(self):
            self.committed = False

        def commit(self):
            self.committed = True

        def rollback(self):
            pass

    def db_operation(db):
        with TransactionManager(db):
            return "done"

    db = Session()
    assert api_call() == "called"
    assert load_file(str(tmp_path / "missing")) == "default"
    assert db_operation(db) == "done"
    assert db.committed
