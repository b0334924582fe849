"""The seed's database snippets, run against taskkit.db on SQLite and on PostgreSQL.

The snippets live unchanged (but for their imports) in ``tests/seed/snippets/``:
``db_operations`` ("Database Operations"), ``db_endpoint`` ("Database Query Endpoint with Error
Recovery"), the database half of ``ml_pipeline`` ("Model Training with Error Handling") and
``complete_app`` ("FastAPI App with Full Error Recovery"). Every check of what was stored reads
it back with a fresh session, so it sees only what was committed.

The complete app's ``POST /train`` runs in ``tests/api/test_seed_app.py``: its training task
(``app.tasks.training_tasks``, mapped to ``tests.api.seedtasks``) needs a worker.
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Iterator
from unittest.mock import Mock, patch

import pytest
import requests
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sklearn.datasets import load_iris
from sklearn.ensemble import RandomForestClassifier
from sqlalchemy import event, func, select
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session

from taskkit.db.models import Dataset, ModelRun, Prediction, TrainingProgress
from taskkit.db.session import create_engine_for, get_sessionmaker
from taskkit.errors import DatabaseUnavailable


def fresh(db_url: str) -> Session:
    """A new session: it sees what was committed, nothing of the test's own session."""
    return get_sessionmaker(db_url)()


def count(db_url: str, model: type) -> int:
    with fresh(db_url) as session:
        return session.scalar(select(func.count()).select_from(model))


def add_run(db: Session, **values: object) -> int:
    run = ModelRun(**{"name": "baseline", "model_type": "random_forest", "config": {}, **values})
    db.add(run)
    db.commit()
    return run.id


@pytest.fixture
def listen() -> Iterator[object]:
    """``listen(target, name, fn)``: a SQLAlchemy event listener, removed after the test."""
    added = []

    def add(target, name, fn):
        event.listen(target, name, fn)
        added.append((target, name, fn))

    yield add
    for target, name, fn in added:
        event.remove(target, name, fn)


# -- Create Record with Transaction -------------------------------------------------------------


def test_create_model_run_commits_the_run_and_its_progress_row(db, db_url):
    from tests.seed.snippets.db_operations import create_model_run

    run = create_model_run(db, "baseline", "random_forest", {"n_estimators": 10})

    assert isinstance(run.id, int)
    assert run.status == "created"
    with fresh(db_url) as session:
        stored = session.get(ModelRun, run.id)
        assert (stored.name, stored.model_type, stored.config) == (
            "baseline",
            "random_forest",
            {"n_estimators": 10},
        )
        assert stored.status == "created"
        progress = session.scalars(select(TrainingProgress)).all()
        assert [(p.model_run_id, p.status, p.progress_percentage) for p in progress] == [
            (run.id, "initialized", 0.0)
        ]


def test_create_model_run_with_a_null_name_commits_nothing(db, db_url):
    from tests.seed.snippets.db_operations import create_model_run

    with pytest.raises(IntegrityError):
        create_model_run(db, None, "random_forest", {})

    assert count(db_url, ModelRun) == 0
    assert count(db_url, TrainingProgress) == 0
    # the session was rolled back and is usable again
    assert create_model_run(db, "second", "random_forest", {}).id is not None


def test_create_model_run_rolls_back_the_flushed_run_when_the_progress_row_fails(
    db, db_url, listen
):
    """The run is flushed (it has an id) before the progress row fails at commit: both go."""
    from tests.seed.snippets.db_operations import create_model_run

    inserts = []

    def break_progress(mapper, connection, target):
        inserts.append(target.model_run_id)
        target.model_run_id = None  # NOT NULL: the database refuses the row at commit

    listen(TrainingProgress, "before_insert", break_progress)
    with pytest.raises(IntegrityError):
        create_model_run(db, "baseline", "random_forest", {})

    assert len(inserts) == 1  # an IntegrityError is not retried
    assert inserts[0] is not None  # the run had been flushed
    assert count(db_url, ModelRun) == 0
    assert count(db_url, TrainingProgress) == 0


def test_create_model_run_retries_a_transient_error_without_duplicating(db, db_url, listen):
    from tests.seed.snippets.db_operations import create_model_run

    attempts = []

    def locked_once(mapper, connection, target):
        attempts.append(target.name)
        if len(attempts) == 1:
            raise OperationalError("INSERT INTO model_runs", {}, Exception("database is locked"))

    listen(ModelRun, "before_insert", locked_once)
    run = create_model_run(db, "baseline", "random_forest", {})

    assert attempts == ["baseline", "baseline"]
    with fresh(db_url) as session:
        assert session.scalars(select(ModelRun.id)).all() == [run.id]
        assert session.scalars(select(TrainingProgress.model_run_id)).all() == [run.id]


def test_create_model_run_against_an_unreachable_database_raises_database_unavailable():
    from tests.seed.snippets.db_operations import create_model_run

    engine = create_engine_for("postgresql+psycopg://postgres@127.0.0.1:1/nowhere")
    try:
        with Session(engine) as session:
            with pytest.raises(DatabaseUnavailable, match=r"127\.0\.0\.1:1/nowhere") as caught:
                create_model_run(session, "baseline", "random_forest", {})
            assert caught.value.attempts == 3
            assert isinstance(caught.value, ConnectionError)
            assert not session.new  # the body never ran
    finally:
        engine.dispose()


# -- Update with Optimistic Locking -------------------------------------------------------------


def test_increment_model_usage_adds_one_per_call_and_bumps_the_version(db, db_url):
    from tests.seed.snippets.db_operations import increment_model_usage

    run_id = add_run(db)
    other_id = add_run(db, name="other")

    assert [increment_model_usage(db, run_id) for _ in range(3)] == [True, True, True]

    with fresh(db_url) as session:
        run, other = session.get(ModelRun, run_id), session.get(ModelRun, other_id)
        assert (run.usage_count, run.version) == (3, 4)
        assert (other.usage_count, other.version) == (0, 1)
    # the caller's session sees the new value too (its copy was expired)
    assert db.get(ModelRun, run_id).usage_count == 3


def test_increment_model_usage_of_a_missing_run_returns_false(db, db_url):
    from tests.seed.snippets.db_operations import increment_model_usage

    run_id = add_run(db)

    assert increment_model_usage(db, run_id + 1000) is False
    with fresh(db_url) as session:
        assert session.get(ModelRun, run_id).usage_count == 0


# -- Bulk Insert with Error Handling ------------------------------------------------------------


def test_save_predictions_batch_stores_the_good_rows_and_reports_each_bad_one(db, db_url, caplog):
    from tests.seed.snippets.db_operations import save_predictions_batch

    run_id = add_run(db)
    good = [
        {"model_run_id": run_id, "input_data": {"x": i}, "prediction": i % 2, "confidence": 0.5}
        for i in range(150)  # two batches of the snippet's 100
    ]
    good.append({"model_run_id": run_id, "input_data": {"x": 150}, "prediction": 1})
    bad = [
        {"model_run_id": run_id, "input_data": {"x": "null prediction"}, "prediction": None},
        {"model_run_id": run_id, "input_data": None, "prediction": 1},
        {"model_run_id": run_id + 1000, "input_data": {"x": "no such run"}, "prediction": 1},
    ]
    predictions = good[:40] + bad[:1] + good[40:120] + bad[1:] + good[120:]

    with caplog.at_level(logging.ERROR, logger="tests.seed.snippets.db_operations"):
        saved, failed = save_predictions_batch(db, predictions)

    assert saved == len(good) == 151
    assert [record["input_data"] for record, _ in failed] == [b["input_data"] for b in bad]
    assert all(isinstance(error, str) and error for _, error in failed)
    assert "null" in failed[0][1].lower()
    assert "null" in failed[1][1].lower()
    assert "foreign key" in failed[2][1].lower()
    assert "Failed to insert 3 predictions" in caplog.text
    with fresh(db_url) as session:
        rows = session.scalars(select(Prediction).order_by(Prediction.id)).all()
        assert [row.input_data for row in rows] == [g["input_data"] for g in good]
        assert {row.model_run_id for row in rows} == {run_id}
        assert rows[0].confidence == 0.5
        assert rows[-1].confidence == 0.0  # the snippet's default for a missing confidence


# -- Complex Transaction with Savepoints --------------------------------------------------------


def test_create_model_with_dataset_commits_both(db, db_url):
    from tests.seed.snippets.db_operations import create_model_with_dataset

    model, dataset = create_model_with_dataset(
        db,
        {"name": "baseline", "model_type": "random_forest", "config": {"depth": 3}},
        {"name": "iris", "source": "/data/iris.csv", "num_rows": 150},
    )

    assert model.id is not None
    assert dataset is not None
    with fresh(db_url) as session:
        assert session.get(ModelRun, model.id).config == {"depth": 3}
        stored = session.get(Dataset, dataset.id)
        assert (stored.name, stored.source, stored.num_rows) == ("iris", "/data/iris.csv", 150)


def test_create_model_with_dataset_keeps_the_model_when_the_dataset_fails(db, db_url, caplog):
    from tests.seed.snippets.db_operations import create_model_with_dataset

    db.add(Dataset(name="iris", source="/data/original.csv"))
    db.commit()

    with caplog.at_level(logging.WARNING, logger="tests.seed.snippets.db_operations"):
        model, dataset = create_model_with_dataset(
            db,
            {"name": "baseline", "model_type": "random_forest", "config": {}},
            {"name": "iris", "source": "/data/duplicate.csv"},  # the name is unique
        )

    assert dataset is None
    assert "Dataset creation failed" in caplog.text
    with fresh(db_url) as session:
        assert session.scalars(select(ModelRun.id)).all() == [model.id]
        datasets = session.scalars(select(Dataset)).all()
        assert [(d.name, d.source) for d in datasets] == [("iris", "/data/original.csv")]


def test_create_model_with_dataset_commits_nothing_when_the_model_fails(db, db_url):
    from tests.seed.snippets.db_operations import create_model_with_dataset

    with pytest.raises(IntegrityError):
        create_model_with_dataset(
            db,
            {"name": None, "model_type": "random_forest", "config": {}},
            {"name": "iris"},
        )

    assert count(db_url, ModelRun) == 0
    assert count(db_url, Dataset) == 0


# -- Database Query Endpoint with Error Recovery ------------------------------------------------


def test_db_endpoint_returns_the_model_run_or_404(db, default_database):
    from tests.seed.snippets import db_endpoint

    run_id = add_run(db, config={"depth": 3}, accuracy=0.9)
    db.query(ModelRun).filter_by(id=run_id).update({"model_object": b"\x80binary"})
    db.commit()
    app = FastAPI()
    app.include_router(db_endpoint.router)
    client = TestClient(app)

    response = client.get(f"/models/{run_id}")
    assert response.status_code == 200
    body = response.json()
    assert {k: body[k] for k in ("id", "name", "model_type", "config", "status", "accuracy")} == {
        "id": run_id,
        "name": "baseline",
        "model_type": "random_forest",
        "config": {"depth": 3},
        "status": "created",
        "accuracy": 0.9,
    }
    assert "model_object" not in body  # deferred: the blob is not loaded nor encoded

    missing = client.get(f"/models/{run_id + 1000}")
    assert missing.status_code == 404
    assert missing.json() == {"detail": "Model not found"}
    assert client.get("/models/abc").status_code == 422


# -- Model Training with Error Handling ---------------------------------------------------------


def test_train_and_save_model_stores_the_fitted_model(db, db_url):
    from tests.seed.snippets import ml_pipeline

    X, y = load_iris(return_X_y=True)
    run_id = add_run(db)

    model, accuracy = ml_pipeline.train_and_save_model(
        db, run_id, X, y, {"n_estimators": 10, "random_state": 0}
    )

    assert accuracy == model.score(X, y)
    with fresh(db_url) as session:
        run = session.get(ModelRun, run_id)
        assert run.status == "completed"
        assert run.accuracy == accuracy
        assert run.error_message is None
        stored = pickle.loads(run.model_object)
    assert isinstance(stored, RandomForestClassifier)
    assert stored.n_estimators == 10
    assert (stored.predict(X) == model.predict(X)).all()


def test_train_and_save_model_with_bad_params_marks_the_run_failed(db, db_url):
    from tests.seed.snippets import ml_pipeline

    X, y = load_iris(return_X_y=True)
    run_id = add_run(db)

    with pytest.raises(ValueError, match="n_estimators") as caught:
        ml_pipeline.train_and_save_model(db, run_id, X, y, {"n_estimators": -1})

    with fresh(db_url) as session:
        run = session.get(ModelRun, run_id)
        assert run.status == "failed"
        assert run.error_message == str(caught.value)
        assert run.accuracy is None
        assert run.model_object is None


# -- FastAPI App with Full Error Recovery -------------------------------------------------------


@pytest.fixture
def complete_app() -> Iterator[object]:
    from tests.seed.snippets import complete_app

    complete_app.model_service_circuit.reset()
    complete_app.data_service_circuit.reset()
    yield complete_app
    complete_app.model_service_circuit.reset()
    complete_app.data_service_circuit.reset()


def test_complete_app_get_model_returns_its_fields_or_404(db, default_database, complete_app):
    run_id = add_run(db, name="churn", status="completed", accuracy=0.87)
    client = TestClient(complete_app.app)

    response = client.get(f"/models/{run_id}")
    assert response.status_code == 200
    assert response.json() == {
        "id": run_id,
        "name": "churn",
        "status": "completed",
        "accuracy": 0.87,
    }
    missing = client.get(f"/models/{run_id + 1000}")
    assert missing.status_code == 404
    assert missing.json() == {"detail": "Model not found"}


def test_complete_app_health_reports_both_circuits_closed(complete_app):
    response = TestClient(complete_app.app).get("/health")
    assert response.status_code == 200
    assert response.json() == {
        "status": "healthy",
        "circuits": {"model_service": "CLOSED", "data_service": "CLOSED"},
    }


def test_complete_app_predict_uses_the_external_service(complete_app):
    client = TestClient(complete_app.app)
    upstream = Mock(json=lambda: {"prediction": 1, "confidence": 0.99})
    with patch("requests.post", return_value=upstream) as post:
        response = client.post("/predict", json={"features": [1.0, 2.0, 3.0]})

    assert response.status_code == 200
    assert response.json() == {"prediction": 1, "confidence": 0.99, "source": "external"}
    post.assert_called_once_with(
        "https://ml-service.example.com/predict", json={"features": [1.0, 2.0, 3.0]}, timeout=5
    )
    upstream.raise_for_status.assert_called_once_with()


def test_complete_app_predict_falls_back_then_opens_the_circuit(complete_app):
    client = TestClient(complete_app.app)
    with patch("requests.post", side_effect=requests.ConnectionError("refused")) as post:
        first = client.post("/predict", json={"features": [1.0, 2.0, 3.0]})
        assert first.status_code == 200
        assert first.json() == {
            "prediction": 2.0,
            "source": "local_fallback",
            "confidence": 0.75,
            "fallback_reason": "refused",
        }
        assert post.call_count == 2  # retry(max_attempts=2) inside the circuit
        for _ in range(4):  # failure_threshold=5: one failure per request
            assert client.post("/predict", json={"features": [4.0]}).json()["source"] == (
                "local_fallback"
            )
        assert post.call_count == 10

        opened = client.post("/predict", json={"features": [4.0, 6.0]})
        assert opened.json() == {"prediction": 5.0, "source": "local_fallback", "confidence": 0.75}
        assert post.call_count == 10  # the open circuit is not called at all

    assert client.get("/health").json()["circuits"] == {
        "model_service": "OPEN",
        "data_service": "CLOSED",
    }
