"""``workers.batch.predict_rows``: batch prediction with a trained run's model, on SQLite and
PostgreSQL.

The model is a real one: ``workers.training.train_model`` called in this process (as
``workers.demo`` does) on the shipped dataset. The prediction task is called in this process
too (calling it with rows runs the whole batch: ledger, dead letters, predictions); the last
test sends a DataFrame to a real worker subprocess (``celery -A workers.app``, thread pool), on
the broker the workers app was built with (the embedded SQLite one unless
``TASKKIT_BROKER_URL`` is set) and a queue of its own.
"""

from __future__ import annotations

import contextlib
import threading
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from celery.exceptions import SoftTimeLimitExceeded
from sklearn.linear_model import SGDClassifier
from sqlalchemy import func, select

from taskkit.config import reset_settings
from taskkit.db import safe_bulk_insert
from taskkit.db.models import BatchItem, DeadLetter, ModelRun, Prediction
from taskkit.db.session import session_scope
from taskkit.deadletter import UNSERIALIZABLE, DeadLetterStore, ItemLedger
from taskkit.errors import RunNotFound, RunNotResumable
from taskkit.tasks import load_model, submit_batch
from taskkit.tasks._runs import mark_completed
from tests.tasks.workerproc import WorkerProcess
from workers import batch
from workers.app import app
from workers.batch import (
    PredictionsNotStored,
    dataframe_rows,
    predict_dataframe,
    predict_rows,
)
from workers.training import EXAMPLE_DATASET, TARGET, train_model

FEATURES = [f"f{i}" for i in range(10)]
CONFIG = {"epochs": 3, "seed": 5, "batch_size": 200}
DATA = pd.read_csv(EXAMPLE_DATASET)


@pytest.fixture(autouse=True)
def prediction_env(
    default_database: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[str]:
    """The test's database as the default and as the workers app's; checkpoints and models
    signed with a key of the tests."""
    monkeypatch.setenv("TASKKIT_CHECKPOINT_DIR", str(tmp_path / "checkpoints"))
    monkeypatch.setenv("TASKKIT_SECRET_KEY", "batch-prediction-tests")
    reset_settings()
    monkeypatch.setitem(app.conf, "taskkit_database_url", default_database)
    yield default_database
    reset_settings()


def new_run(config: dict[str, Any], status: str = "created") -> int:
    with session_scope() as db:
        run = ModelRun(
            name="batch-test",
            model_type="sgd",
            config=config,
            status=status,
            task_name=train_model.name,
        )
        db.add(run)
        db.flush()
        return run.id


def trained_run(config: dict[str, Any] = CONFIG) -> int:
    """A completed run with a real model: the example training task, called in process."""
    run_id = new_run(config)
    assert train_model(run_id, config)["status"] == "success"
    return run_id


@pytest.fixture
def run_id() -> int:
    return trained_run()


def rows_frame(count: int, start: int = 2400, prefix: str = "row") -> pd.DataFrame:
    """``count`` rows of the shipped dataset's validation part, with an ``id`` column (the
    ``target`` column stays: the task ignores columns that are not features)."""
    frame = DATA.iloc[start : start + count].reset_index(drop=True)
    frame.insert(0, "id", [f"{prefix}-{i}" for i in range(len(frame))])
    return frame


def stored(run_id: int) -> dict[str, tuple[Any, float | None, dict[str, float]]]:
    with session_scope() as db:
        rows = db.execute(
            select(
                Prediction.item_key,
                Prediction.prediction,
                Prediction.confidence,
                Prediction.input_data,
            ).where(Prediction.model_run_id == run_id)
        ).all()
    return {key: (prediction, confidence, data) for key, prediction, confidence, data in rows}


def prediction_count() -> int:
    with session_scope() as db:
        return int(db.scalar(select(func.count()).select_from(Prediction)) or 0)


def letters(batch_id: str) -> dict[str, DeadLetter]:
    return {
        str(letter.item_key): letter
        for letter in DeadLetterStore(app.conf.taskkit_database_url).list(batch_id=batch_id)
    }


def assert_scored_like_the_model(
    run_id: int, frame: pd.DataFrame, *, model: Any = None, only: bool = True
) -> None:
    """Every row of ``frame`` is stored once for ``run_id``, with ``predict``/``predict_proba``
    of ``model`` (default: the run's) on the same rows; ``only``: and no other row is."""
    model = model if model is not None else load_model(run_id)
    X = frame[FEATURES].to_numpy(dtype=np.float64)
    expected, confidence = model.predict(X), model.predict_proba(X).max(axis=1)
    got = stored(run_id)
    if only:
        assert sorted(got) == sorted(frame["id"])
    for i, key in enumerate(frame["id"]):
        prediction, stored_confidence, data = got[key]
        assert prediction == expected[i].item()
        assert type(prediction) is int
        assert stored_confidence == pytest.approx(confidence[i], rel=1e-12)
        assert data == dict(zip(FEATURES, X[i].tolist(), strict=True))


def test_every_good_row_is_stored_with_the_models_prediction(run_id: int) -> None:
    frame = rows_frame(40)

    summary = predict_rows(dataframe_rows(frame, run_id), batch_id="good")

    assert summary == {
        "total": 40,
        "successful": 40,
        "failed": 0,
        "failed_ids": [],
        "batch_id": "good",
        "skipped": 0,
    }
    assert_scored_like_the_model(run_id, frame)
    assert len({prediction for prediction, _, _ in stored(run_id).values()}) == 2  # both classes
    assert letters("good") == {}
    statuses = ItemLedger("good").statuses(list(frame["id"]))
    assert set(statuses.values()) == {"done"}


def test_rows_that_cannot_be_scored_are_dead_lettered_with_the_row_and_not_stored(
    run_id: int,
) -> None:
    frame = rows_frame(30)
    frame.loc[5, "f4"] = np.nan  # missing in the DataFrame: None in the row
    rows = dataframe_rows(frame, run_id)
    del rows[3]["f2"]
    rows[7]["f0"] = "abc"
    rows[9]["f1"] = True
    rows[11]["f3"] = float("inf")  # put there by hand: not JSON, stored as a stand-in
    bad = {"row-3": "f2 is missing", "row-5": "f4 has no value", "row-7": "f0 is not a number"}
    bad |= {"row-9": "f1 is not a number: True", "row-11": "f3 is not a finite number: inf"}

    summary = predict_rows(rows, batch_id="bad")

    assert summary["failed_ids"] == ["row-3", "row-5", "row-7", "row-9", "row-11"]
    assert (summary["successful"], summary["failed"]) == (25, 5)
    dead = letters("bad")
    assert sorted(dead) == sorted(bad)
    for key, message in bad.items():
        letter = dead[key]
        assert letter.task_name == "workers.batch.predict_rows"
        assert letter.error_type == "ValueError"
        assert message in letter.error_message
        assert letter.error_message.startswith(f"row {key!r} cannot be scored")
        assert letter.attempts == 1  # a ValueError is not retried
        if key == "row-11":
            assert UNSERIALIZABLE in letter.payload
        else:
            assert letter.payload == rows[int(key.split("-")[1])]
    assert dead["row-5"].payload["f4"] is None
    good = frame.drop(index=[3, 5, 7, 9, 11])
    assert_scored_like_the_model(run_id, good)


def test_the_same_batch_again_skips_its_finished_rows_and_stores_nothing_twice(
    run_id: int,
) -> None:
    rows = dataframe_rows(rows_frame(30), run_id)
    rows[4]["f0"] = "text"
    first = predict_rows(rows, batch_id="again")
    before = stored(run_id)

    second = predict_rows(rows, batch_id="again")

    assert first["skipped"] == 0
    assert second == {**first, "skipped": 30}
    assert second["failed_ids"] == ["row-4"]
    assert stored(run_id) == before
    assert prediction_count() == 29
    assert len(letters("again")) == 1
    assert letters("again")["row-4"].attempts == 1  # not run again either


def test_rows_already_stored_under_another_batch_count_as_stored(run_id: int) -> None:
    """What a chunk redelivered after its predictions were stored, but before its ledger
    write, meets: every insert is a duplicate; nothing fails, nothing is stored twice."""
    frame = rows_frame(30)
    predict_rows(dataframe_rows(frame, run_id), batch_id="once")
    before = stored(run_id)

    summary = predict_rows(dataframe_rows(frame, run_id), batch_id="twice")

    assert (summary["successful"], summary["failed"], summary["skipped"]) == (30, 0, 0)
    assert stored(run_id) == before
    assert prediction_count() == 30


def test_a_run_without_a_final_model_fails_the_chunk_clearly_before_any_row(
    run_id: int,
) -> None:
    frame = rows_frame(10)
    running = new_run(CONFIG, status="running")

    with pytest.raises(RunNotResumable, match=rf"training run {running} has no final model"):
        predict_rows(dataframe_rows(frame, running), batch_id="running")
    with pytest.raises(RunNotFound, match="training run 424242 does not exist"):
        predict_rows(dataframe_rows(frame, 424242), batch_id="missing")
    # predict_dataframe checks before it sends anything (no broker is needed to get here).
    with pytest.raises(RunNotResumable, match="status running"):
        predict_dataframe(frame, running)
    with pytest.raises(RunNotFound):
        predict_dataframe(frame, 424242)

    assert predict_rows.is_permanent(RunNotResumable(running, "x"))  # no re-queue in a worker
    assert prediction_count() == 0
    with session_scope() as db:
        assert db.scalar(select(func.count()).select_from(BatchItem)) == 0  # nothing claimed


def test_a_prediction_the_database_refuses_keeps_the_rows_unfinished_until_stored(
    run_id: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    frame = rows_frame(20)
    rows = dataframe_rows(frame, run_id)
    real = batch.score_rows

    def refused_for_row_4(run: int, model: Any, chunk_rows: Any, **options: Any) -> dict[str, Any]:
        records = real(run, model, chunk_rows, **options)
        records["row-4"]["input_data"] = {"not json": {1, 2}}
        return records

    with monkeypatch.context() as patch:
        patch.setattr(batch, "score_rows", refused_for_row_4)
        with pytest.raises(PredictionsNotStored, match=r"1 prediction\(s\) not stored: row-4"):
            predict_rows(rows, batch_id="refused")

    assert sorted(stored(run_id)) == sorted(set(frame["id"]) - {"row-4"})
    statuses = ItemLedger("refused").statuses(list(frame["id"]))
    assert set(statuses.values()) == {"claimed"}  # none marked done before it was stored

    summary = predict_rows(rows, batch_id="refused")  # the same chunk, delivered again

    assert (summary["successful"], summary["failed"], summary["skipped"]) == (20, 0, 0)
    assert_scored_like_the_model(run_id, frame)


def test_predictions_are_stored_before_each_ledger_write_of_a_long_chunk(
    run_id: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(predict_rows, "batch_size", 10)
    monkeypatch.setattr(predict_rows, "ledger_flush_every", 10)
    inserted: list[int] = []
    real = safe_bulk_insert

    def counting(db: Any, model: Any, records: Any, **options: Any) -> Any:
        done = ItemLedger("long").statuses([r["item_key"] for r in records])
        assert "done" not in done.values()  # stored first, marked done afterwards
        inserted.append(len(records))
        return real(db, model, records, **options)

    monkeypatch.setattr(batch, "safe_bulk_insert", counting)
    frame = rows_frame(35)

    summary = predict_rows(dataframe_rows(frame, run_id), batch_id="long")

    assert summary["successful"] == 35
    assert inserted == [10, 10, 10, 5]
    assert_scored_like_the_model(run_id, frame)


class CountingModel:
    """A run's model that records the rows of each ``predict``/``predict_proba`` call."""

    def __init__(self, model: Any, calls: list[tuple[str, int]]) -> None:
        self.model, self.calls = model, calls

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)

    def predict(self, X: Any) -> Any:
        self.calls.append(("predict", len(X)))
        return self.model.predict(X)

    def predict_proba(self, X: Any) -> Any:
        self.calls.append(("predict_proba", len(X)))
        return self.model.predict_proba(X)


def test_each_chunk_loads_its_model_once_and_scores_its_rows_as_one_matrix(
    run_id: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(predict_rows, "batch_size", 10)  # four retry rounds in a chunk of 35
    loads: list[int] = []
    calls: list[tuple[str, int]] = []
    real = batch.load_model

    def counting_load(run: int, **options: Any) -> Any:
        loads.append(run)
        return CountingModel(real(run, **options), calls)

    monkeypatch.setattr(batch, "load_model", counting_load)
    frame = rows_frame(55)
    rows = dataframe_rows(frame, run_id)
    rows[3]["f1"] = "x"  # dead-lettered on its own, not scored

    first = predict_rows(rows[:35], batch_id="matrix")
    second = predict_rows(rows[35:], batch_id="matrix")

    assert loads == [run_id, run_id]  # one load per chunk
    assert calls == [("predict", 34), ("predict_proba", 34), ("predict", 20), ("predict_proba", 20)]
    assert (first["successful"], first["failed_ids"], second["successful"]) == (34, ["row-3"], 20)
    assert_scored_like_the_model(run_id, frame.drop(index=[3]))


def test_the_item_function_needs_its_chunk() -> None:
    with pytest.raises(RuntimeError, match="chunk_context is only set while a chunk runs"):
        predict_rows.run({"id": "a", "run_id": 1})


def test_concurrent_batches_in_threads_keep_their_own_predictions(
    run_id: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(predict_rows, "batch_size", 5)
    monkeypatch.setattr(predict_rows, "ledger_flush_every", 5)
    frames = [rows_frame(25, start=2400 + 25 * i, prefix=f"t{i}") for i in range(3)]
    start = threading.Barrier(len(frames))
    summaries: dict[int, dict[str, Any]] = {}

    def run(i: int) -> None:
        start.wait()
        summaries[i] = predict_rows(dataframe_rows(frames[i], run_id), batch_id=f"thread-{i}")

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(frames))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)

    assert [summaries[i]["successful"] for i in range(len(frames))] == [25, 25, 25]
    assert_scored_like_the_model(run_id, pd.concat(frames, ignore_index=True))


def test_a_cached_model_is_not_used_once_the_runs_stored_model_changed(run_id: int) -> None:
    old = load_model(run_id)
    predict_rows(dataframe_rows(rows_frame(10), run_id), batch_id="before")  # cached now
    new = load_model(trained_run({**CONFIG, "seed": 11, "alpha": 0.05}))
    mark_completed(run_id, new, 0.5)  # the run holds another model now (a restored database)
    later = rows_frame(30, start=2430, prefix="later")

    predict_rows(dataframe_rows(later, run_id), batch_id="after")

    assert_scored_like_the_model(run_id, later, model=new, only=False)
    X = later[FEATURES].to_numpy(dtype=np.float64)
    assert not np.allclose(old.predict_proba(X), new.predict_proba(X))  # they do differ


@contextlib.contextmanager
def _no_feature_name_warnings() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*feature names")
        yield


def test_a_model_fitted_on_a_dataframe_scores_its_named_columns_without_confidence() -> None:
    train = DATA.iloc[:2000].rename(columns={f"f{i}": f"x{i}" for i in range(10)})
    columns = ["x3", "x1", "x7"]
    model = SGDClassifier(loss="hinge", random_state=0).fit(train[columns], train[TARGET])
    run_id = new_run({})
    mark_completed(run_id, model, None)
    frame = DATA.iloc[2400:2420].rename(columns={f"f{i}": f"x{i}" for i in range(10)})
    frame = frame.reset_index(drop=True)

    with _no_feature_name_warnings():
        summary = predict_rows(dataframe_rows(frame, run_id, id_column=None), batch_id="named")

    assert summary["successful"] == 20
    got = stored(run_id)
    expected = model.predict(frame[columns])
    assert sorted(got, key=int) == [str(i) for i in range(20)]
    for i in range(20):
        prediction, confidence, data = got[str(i)]
        assert (prediction, confidence) == (expected[i].item(), None)
        assert data == {c: float(frame.loc[i, c]) for c in columns}  # (JSONB reorders keys)


def test_a_real_worker_scores_a_dataframe_and_dead_letters_what_it_cannot_score(
    run_id: int, db_url: str, tmp_path: Path
) -> None:
    queue = f"predict-{uuid.uuid4().hex[:8]}"
    frame = rows_frame(50)
    frame.loc[[6, 31], "f5"] = np.nan
    worker = WorkerProcess(
        "predict",
        tmp_path,
        app="workers.app",
        queue=queue,
        pool="threads",
        concurrency=2,
        env={
            "TASKKIT_HOME": str(tmp_path / "home"),
            "TASKKIT_BROKER_URL": app.conf.broker_url,
            "TASKKIT_RESULT_BACKEND": app.conf.result_backend,
            "TASKKIT_DATABASE_URL": db_url,
            "TASKKIT_RESUME_ORPHANED_RUNS": "false",
        },
    )
    unfinished = new_run(CONFIG, status="failed")
    early = rows_frame(12, start=2450, prefix="early")
    try:
        worker.wait_ready()
        submission = predict_dataframe(frame, run_id, chunk_size=20, queue=queue)
        summary = submission.get(timeout=90)
        # Sent without predict_dataframe's check: the chunks fail as a whole, in the worker.
        too_early = submit_batch(
            predict_rows, dataframe_rows(early, unfinished), chunk_size=5, queue=queue
        )
        early_summary = too_early.get(timeout=90)
    finally:
        worker.stop()

    assert (summary["total"], summary["successful"], summary["failed"]) == (50, 48, 2)
    assert sorted(summary["failed_ids"]) == ["row-31", "row-6"]
    assert_scored_like_the_model(run_id, frame.drop(index=[6, 31]))
    dead = letters(submission.batch_id)
    assert {key: letter.error_type for key, letter in dead.items()} == {
        "row-6": "ValueError",
        "row-31": "ValueError",
    }
    assert dead["row-6"].payload["f5"] is None
    progress = submission.progress()
    assert (progress.done, progress.dead) == (48, 2)

    # A run without a model: every row dead-lettered with that error, none scored; the
    # letters hold the run id, so once the run has a model their payloads are enough.
    assert (early_summary["successful"], early_summary["failed"]) == (0, 12)
    dead = letters(too_early.batch_id)
    assert sorted(dead) == sorted(early["id"])
    assert {letter.error_type for letter in dead.values()} == {"RunNotResumable"}
    assert stored(unfinished) == {}
    mark_completed(unfinished, load_model(run_id), None)
    payloads = [dead[key].payload for key in early["id"]]
    for payload in payloads:
        predict_rows.validate_item(payload)  # what a replay checks first
    replayed = predict_rows(payloads, batch_id="replay-early")  # what a replay runs
    assert replayed["successful"] == 12
    assert_scored_like_the_model(unfinished, early, model=load_model(run_id))


class RefusingModel(CountingModel):
    """A run's model whose ``predict`` raises on a matrix holding a row whose ``f0`` is one of
    ``poison`` (each poison value refuses ``times`` calls, then scores)."""

    def __init__(self, model: Any, calls: list[tuple[str, int]], poison: dict[float, int]) -> None:
        super().__init__(model, calls)
        self.poison = poison

    def predict(self, X: Any) -> Any:
        self.calls.append(("predict", len(X)))
        for value in sorted(set(np.asarray(X)[:, 0].tolist()) & set(self.poison)):
            if self.poison[value]:
                self.poison[value] -= 1
                raise RuntimeError(f"the model cannot score f0={value}")
        return self.model.predict(X)


def refusing_model(
    monkeypatch: pytest.MonkeyPatch, poison: dict[float, int]
) -> list[tuple[str, int]]:
    calls: list[tuple[str, int]] = []
    real = batch.load_model
    monkeypatch.setattr(
        batch, "load_model", lambda run, **o: RefusingModel(real(run, **o), calls, poison)
    )
    monkeypatch.setattr(predict_rows, "item_delay", 0.0)
    return calls


def test_rows_the_model_refuses_fail_alone_with_its_error_and_the_others_are_scored(
    run_id: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    frame = rows_frame(40)
    frame.loc[[7, 29], "f0"] = [1234.5, 6789.5]
    calls = refusing_model(monkeypatch, {1234.5: 99, 6789.5: 99})
    rows = dataframe_rows(frame, run_id)
    rows[12]["f3"] = None  # refused by the checks: never reaches the model

    summary = predict_rows(rows, batch_id="refusing")

    assert summary["failed_ids"] == ["row-7", "row-12", "row-29"]
    assert (summary["successful"], summary["failed"]) == (37, 3)
    dead = letters("refusing")
    for key, value in (("row-7", 1234.5), ("row-29", 6789.5)):
        assert (dead[key].error_type, dead[key].attempts) == ("RuntimeError", 2)
        assert dead[key].error_message == f"the model cannot score f0={value}"
        assert dead[key].payload == rows[int(key.split("-")[1])]
    assert dead["row-12"].error_type == "ValueError"
    assert_scored_like_the_model(run_id, frame.drop(index=[7, 12, 29]))
    predicts = [size for name, size in calls if name == "predict"]
    assert predicts[0] == 39  # the chunk's matrix first
    # Halves down to each refused row (2 log2(39) calls at most), then each refused row
    # alone once more on its item's second try; predict_proba only where predict succeeded.
    assert len(predicts) <= 2 * 2 * 6 + 2
    assert predicts[-2:] == [1, 1]
    assert sum(size for name, size in calls if name == "predict_proba") == 37


def test_a_row_the_model_refused_once_is_scored_alone_on_its_items_next_try(
    run_id: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    frame = rows_frame(16)
    frame.loc[5, "f0"] = 1234.5
    # Refused by the 5 calls of the halves holding row 5 (16, 8, 4, 2, 1 rows), not after.
    calls = refusing_model(monkeypatch, {1234.5: 5})

    summary = predict_rows(dataframe_rows(frame, run_id), batch_id="fluke")

    assert (summary["successful"], summary["failed"]) == (16, 0)
    assert letters("fluke") == {}
    assert_scored_like_the_model(run_id, frame)
    # Halves, depth first: 0-16 and 0-8 refused, 0-4 scored, 4-8 and 4-6 refused, 4 scored,
    # 5 refused alone, 6-8 and 8-16 scored; then row 5 alone again, on its item's second try.
    assert [size for name, size in calls if name == "predict"] == [16, 8, 4, 4, 2, 1, 1, 2, 8, 1]
    assert calls[-2:] == [("predict", 1), ("predict_proba", 1)]


def test_a_time_limit_inside_the_models_call_fails_the_chunk_and_is_not_bisected(
    run_id: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[str, int]] = []
    real = batch.load_model

    class Slow(CountingModel):
        def predict(self, X: Any) -> Any:
            calls.append(("predict", len(X)))
            raise SoftTimeLimitExceeded()

    monkeypatch.setattr(batch, "load_model", lambda run, **o: Slow(real(run, **o), calls))

    with pytest.raises(SoftTimeLimitExceeded):
        predict_rows(dataframe_rows(rows_frame(20), run_id), batch_id="limit")

    assert calls == [("predict", 20)]
    assert prediction_count() == 0


def test_a_number_too_large_for_a_float_fails_its_row_alone(run_id: int) -> None:
    frame = rows_frame(10)
    rows = dataframe_rows(frame, run_id)
    rows[2]["f6"] = 10**400  # what JSON decodes a 401-digit number to

    summary = predict_rows(rows, batch_id="huge")

    assert (summary["successful"], summary["failed_ids"]) == (9, ["row-2"])
    message = letters("huge")["row-2"].error_message
    assert message.startswith("row 'row-2' cannot be scored: f6 is not a finite number: 1000")
    assert_scored_like_the_model(run_id, frame.drop(index=[2]))
