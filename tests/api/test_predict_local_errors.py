"""``POST /predict``'s local model: its predict runs in the thread pool (not on the event loop),
and whatever it raises is a 422 (these features do not fit it) or a 503 (no usable model) with a
one-line detail, never a 500."""

from __future__ import annotations

import builtins
from typing import Any

import pytest
from fastapi.testclient import TestClient

from taskkit.config import Settings
from taskkit.db.models import ModelRun
from taskkit.db.session import session_scope
from taskkit.tasks._runs import mark_completed


class Raising:
    """A model whose predict raises ``error`` (a class name of builtins) when it is set."""

    def __init__(self, error: str | None) -> None:
        self.error = error

    def predict(self, rows: list[list[float]]) -> list[int]:
        if self.error is not None:
            raise getattr(builtins, self.error)("bad\ninput")
        return [len(rows[0])]


def completed(database_url: str, model: Any) -> int:
    with session_scope(database_url) as db:
        run = ModelRun(name="local", model_type="custom", config={}, status="running")
        db.add(run)
        db.flush()
        run_id = run.id
    mark_completed(run_id, model, 0.9, database_url=database_url)
    return run_id


@pytest.mark.parametrize("error", ["TypeError", "IndexError", "KeyError", "ValueError"])
def test_a_model_refusing_the_features_is_a_422(
    api_settings: Settings, client: TestClient, error: str
) -> None:
    run_id = completed(api_settings.database_url, Raising(error))
    answer = client.post("/predict", json={"features": [1.0]})
    assert answer.status_code == 422, answer.text
    detail = answer.json()["detail"]
    assert detail.startswith(f"the local model (run {run_id}) cannot use these features: ")
    assert "\n" not in detail


@pytest.mark.parametrize("error", ["RuntimeError", "AttributeError", "ZeroDivisionError"])
def test_a_model_that_fails_otherwise_is_a_503(
    api_settings: Settings, client: TestClient, error: str
) -> None:
    run_id = completed(api_settings.database_url, Raising(error))
    answer = client.post("/predict", json={"features": [1.0]})
    assert answer.status_code == 503, answer.text
    detail = answer.json()["detail"]
    assert detail.startswith(f"no prediction: the local model (run {run_id}) failed: {error}")
    assert "\n" not in detail
