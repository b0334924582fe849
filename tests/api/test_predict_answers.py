"""``POST /predict``'s local answer is rendered by the endpoint (one number or string at once,
anything else through ``PredictResponse``): whatever the local model predicts, the answer is the
one FastAPI's ``response_model`` gave: JSON lists and objects kept, NaN and infinities as null,
a ``None`` prediction left out, a value that is not JSON a 500 with a request id."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from taskkit.config import Settings
from tests.api.test_predict_local_errors import completed


class Fixed:
    """A model that predicts ``value`` whatever the features."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def predict(self, rows: list[list[float]]) -> list[Any]:
        return [self.value]


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        (3, 3),
        (2.5, 2.5),
        ("churn", "churn"),
        (True, True),
        ([1, 2.5, "a"], [1, 2.5, "a"]),
        ({"label": "churn", "scores": [0.1, 0.9]}, {"label": "churn", "scores": [0.1, 0.9]}),
        (float("nan"), None),
        (float("inf"), None),
        ([1.0, float("-inf")], [1.0, None]),
    ],
)
def test_the_local_answer_is_json_as_the_response_model_writes_it(
    api_settings: Settings, client: TestClient, value: Any, shown: Any
) -> None:
    run_id = completed(api_settings.database_url, Fixed(value))
    answer = client.post("/predict", json={"features": [1.0]})
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "application/json"
    assert answer.json() == {
        "prediction": shown,
        "source": "local_fallback",
        "circuit_status": "none",
        "fallback_reason": "no external predictor (TASKKIT_PREDICTOR_URL)",
        "model": "local_fallback",
        "model_run_id": run_id,
    }


def test_a_none_prediction_is_left_out(api_settings: Settings, client: TestClient) -> None:
    completed(api_settings.database_url, Fixed(None))
    answer = client.post("/predict", json={"features": [1.0]})
    assert answer.status_code == 200, answer.text
    assert "prediction" not in answer.json()


def test_a_prediction_that_is_not_json_is_a_500_with_a_request_id(
    api_settings: Settings, api: Any
) -> None:
    completed(api_settings.database_url, Fixed({1, 2}))
    with TestClient(api, raise_server_exceptions=False) as client:
        answer = client.post("/predict", json={"features": [1.0]})
    assert answer.status_code == 500, answer.text
    assert answer.json()["request_id"] == answer.headers["X-Request-ID"]
