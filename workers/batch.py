"""The example batch prediction job: score DataFrame rows with a trained run's model.

``predict_rows`` is a ``BatchTask`` over rows. Each row is a dict ``{"id": ..., "run_id": ...,
<feature columns>...}``; the task scores it with the final model of the completed ``ModelRun``
``run_id`` (``workers.training`` makes one) and stores a ``Prediction`` (the run, the row's id as
``item_key``, the features, the predicted class, the top class probability as ``confidence``).
A row that cannot be scored (a feature missing, ``None``/NaN, text) is dead-lettered at once
with a ``ValueError`` that names the column, and with the row as its payload; the others are
stored. ``predict_dataframe`` splits a DataFrame into chunks and sends them to the workers.

Example::

    import pandas as pd
    from workers.batch import predict_dataframe

    submission = predict_dataframe(pd.read_csv("rows.csv"), run_id=7, chunk_size=1000)
    print(submission.progress())               # done / dead / claimed, from the item ledger
    summary = submission.get(timeout=600)      # {"total", "successful", "failed", ...}

or from a shell, with a worker running (``make worker``)::

    python -m workers.batch --run-id 7 --csv rows.csv

Decisions:

- The run id travels in every row, not as a task argument: a ``BatchTask`` is always called as
  ``(items, batch_id, keys, offset)``, and a dead-letter replay re-sends the dead *items* alone
  (as a new batch), so anything outside the item would be lost on replay. One task serves every
  run (no task class per run), and a few bytes per row is the whole cost. A batch may even mix
  runs; item keys (the ``id`` column) must be unique within a batch.
- The features are the model's ``feature_names_in_`` when it was fitted on a DataFrame, else
  ``f0 .. f<n-1>``: the columns of the datasets ``workers.training`` trains on (it fits on a
  NumPy array). Other columns (``target``, metadata) are ignored. A feature must be a finite
  int or float; ``bool``, text and numeric strings are refused rather than guessed at.
  ``input_data`` stores the features as the floats the model saw.
- ``dataframe_rows`` turns NaN (pandas' "missing") into ``None``, so a bad row's dead letter
  holds the row as plain JSON and can be replayed; a NaN or infinity put in a row by hand is
  refused the same way, but its letter stores the ``{"__unserializable__": ...}`` stand-in.
- Models are loaded before a chunk's rows run, once per run id, from a per-process cache (the
  4 most recent, keyed by database and run id). A hit is confirmed against the run's stored
  sha256 with one small query per chunk, so a retrained or restored database never serves a
  stale model; a miss calls ``load_model``, which verifies the checksum and HMAC. An unusable
  run (``RunNotFound``, ``RunNotResumable``: not completed, ``CheckpointTampered``) fails the
  whole chunk at once, with no retry, instead of dead-lettering every row with the same error;
  in a worker ``BatchTask`` then dead-letters the chunk's rows with that error, so ``taskkit
  dlq replay --error-type RunNotResumable`` re-sends them once the run has completed.
- Rows are scored one at a time: simple, and one bad row never costs the others. With the
  example ``SGDClassifier`` that is roughly 0.1-0.2 ms a row; scoring a chunk as one matrix
  would be the next step if that ever dominates.
- Predictions are buffered and stored by ``flush_items`` (``safe_bulk_insert``, committed),
  which ``BatchTask`` calls before it marks items done and at the end of a chunk, so an item is
  never done before its prediction is stored. The buffer belongs to one execution of the task,
  held in a ``ContextVar`` (not keyed by ``request.id``, which is None for a direct call), so
  threads, greenlets and nested calls never mix their rows.
- A record refused only because its ``(model_run_id, item_key)`` already exists (a redelivered
  chunk, or the same rows sent again under another batch id) counts as stored: that is checked
  by reading the keys back, not by parsing driver messages. Any other refused record raises
  ``PredictionsNotStored`` (permanent), so none of the unflushed rows is marked done: a flush
  between two ledger writes retries at the next one, the flush at the end of a chunk fails the
  chunk, and in a worker its unfinished rows are dead-lettered with that error. Refused records
  are not dead-lettered from ``flush_items`` itself: the ledger would still mark those items
  done (a flush cannot fail single items), and the counts would lie.
- ``item_max_retries=1``: scoring is deterministic; one retry covers a fluke.
"""

from __future__ import annotations

import argparse
import json
import math
import numbers
import sys
import threading
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
from sqlalchemy import select

from taskkit.config import get_settings
from taskkit.db import safe_bulk_insert
from taskkit.db.models import ModelRun, Prediction
from taskkit.db.session import get_sessionmaker, session_scope
from taskkit.errors import ConfigurationError, PermanentError, RunNotFound, RunNotResumable
from taskkit.tasks import BatchSubmission, BatchTask, load_model, submit_batch
from workers.app import app

__all__ = [
    "LoadedModel",
    "PredictionTask",
    "PredictionsNotStored",
    "dataframe_rows",
    "feature_columns",
    "predict_dataframe",
    "predict_rows",
    "prediction_record",
    "row_features",
    "row_run_id",
]

#: Keys of a row that are not features.
ID, RUN_ID = "id", "run_id"


class PredictionsNotStored(PermanentError):
    """The database refused predictions for a reason other than "already stored"."""

    def __init__(self, failed: list[tuple[dict[str, Any], str]]) -> None:
        listed = "; ".join(f"{record['item_key']}: {error}" for record, error in failed[:3])
        more = f" (and {len(failed) - 3} more)" if len(failed) > 3 else ""
        super().__init__(f"{len(failed)} prediction(s) not stored: {listed}{more}")
        self.failed = failed


class LoadedModel(NamedTuple):
    """A run's verified model, the feature columns it scores, and its stored sha256."""

    run_id: int
    model: Any
    features: list[str]
    sha256: str | None


# -- rows ----------------------------------------------------------------------------------------


def feature_columns(model: Any) -> list[str]:
    """The columns ``model`` scores, in order: ``feature_names_in_`` (fitted on a DataFrame), else
    ``f0 .. f<n-1>`` (the names of ``workers.training``'s datasets)."""
    names = getattr(model, "feature_names_in_", None)
    if names is not None:
        return [str(name) for name in names]
    count = getattr(model, "n_features_in_", None)
    if not isinstance(count, int | np.integer):
        raise ConfigurationError(
            f"cannot tell which columns {type(model).__name__} scores: it has neither "
            "feature_names_in_ nor n_features_in_"
        )
    return [f"f{i}" for i in range(int(count))]


def row_run_id(row: Any) -> int:
    """The ``run_id`` of a row; ``ValueError`` when it has none or it is not an integer."""
    if not isinstance(row, Mapping):
        raise ValueError(f"a row must be a mapping of column to value, not {type(row).__name__}")
    run_id = row.get(RUN_ID)
    if not isinstance(run_id, int | np.integer) or isinstance(run_id, bool):
        raise ValueError(f"row {row.get(ID)!r}: run_id must be an integer, not {run_id!r}")
    return int(run_id)


def row_features(row: Mapping[str, Any], features: Sequence[str]) -> list[float]:
    """The values of ``features`` in ``row`` as floats; ``ValueError`` naming every column that
    is missing, empty, not a number or not finite."""
    values: list[float] = []
    problems: list[str] = []
    for name in features:
        if name not in row:
            problems.append(f"{name} is missing")
            continue
        value = row[name]
        if value is None:
            problems.append(f"{name} has no value")
        elif isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Real):
            problems.append(f"{name} is not a number: {value!r}")
        elif not math.isfinite(value):
            problems.append(f"{name} is not a finite number: {value!r}")
        else:
            values.append(float(value))
    if problems:
        raise ValueError(f"row {row.get(ID)!r} cannot be scored: {'; '.join(problems)}")
    return values


def _plain(value: Any) -> Any:
    """``value`` as plain JSON data (NumPy scalars unwrapped); ``TypeError`` if it is not."""
    if isinstance(value, np.generic):
        value = value.item()
    json.dumps(value, allow_nan=False)
    return value


def prediction_record(loaded: LoadedModel, row: Mapping[str, Any]) -> dict[str, Any]:
    """The ``Prediction`` column values for ``row`` scored by ``loaded``'s model."""
    values = row_features(row, loaded.features)
    model = loaded.model
    if hasattr(model, "feature_names_in_"):
        X: Any = pd.DataFrame([values], columns=loaded.features)
    else:
        X = np.asarray([values], dtype=np.float64)
    confidence = None
    if hasattr(model, "predict_proba"):  # False for models without probabilities (hinge loss)
        confidence = float(np.max(model.predict_proba(X)[0]))
    return {
        "model_run_id": loaded.run_id,
        "item_key": str(row[ID]),
        "input_data": dict(zip(loaded.features, values, strict=True)),
        "prediction": _plain(model.predict(X)[0]),
        "confidence": confidence,
    }


# -- the models of this process ------------------------------------------------------------------

_models: OrderedDict[tuple[str, int], LoadedModel] = OrderedDict()
_models_lock = threading.Lock()


def _model(run_id: int, database_url: str | None, keep: int) -> LoadedModel:
    """Run ``run_id``'s model from this process's cache, confirmed against its stored sha256;
    loaded (and verified) by ``load_model`` on a miss, which raises for an unusable run."""
    with session_scope(database_url) as db:
        row = db.execute(
            select(ModelRun.status, ModelRun.model_state).where(ModelRun.id == run_id)
        ).one_or_none()
    sha256 = None
    if row is not None and row.status == "completed" and row.model_state:
        sha256 = str(row.model_state.get("sha256"))
    key = (database_url or get_settings().database_url, run_id)
    with _models_lock:
        cached = _models.get(key)
        if cached is not None and sha256 is not None and cached.sha256 == sha256:
            _models.move_to_end(key)
            return cached
    model = load_model(run_id, database_url=database_url)
    loaded = LoadedModel(run_id, model, feature_columns(model), sha256)
    with _models_lock:
        _models[key] = loaded
        _models.move_to_end(key)
        while len(_models) > keep:
            _models.popitem(last=False)
    return loaded


# -- the task ------------------------------------------------------------------------------------


@dataclass
class _Execution:
    """One execution of a prediction chunk: its models and its unstored predictions."""

    database_url: str | None
    models: dict[int, LoadedModel]
    buffer: list[dict[str, Any]] = field(default_factory=list)


_execution: ContextVar[_Execution | None] = ContextVar("workers_batch_execution", default=None)


class PredictionTask(BatchTask):
    """A ``BatchTask`` whose item function buffers ``Prediction`` records (``stage``) that
    ``flush_items`` stores in bulk; ``model(run_id)`` is the chunk's verified model."""

    item_key = ID
    item_max_retries = 1
    item_delay = 0.5
    permanent_errors = (RunNotResumable,)
    #: Models kept loaded per process.
    model_cache_size: int = 4
    #: Records per ``safe_bulk_insert`` batch.
    insert_batch_size: int = 500

    def run_batch(
        self,
        items: Sequence[Any],
        batch_id: str | None = None,
        keys: Sequence[Any] | None = None,
        offset: int = 0,
    ) -> dict[str, Any]:
        url = self.app.conf.get("taskkit_database_url")
        run_ids = sorted({r for item in items if (r := _run_id_or_none(item)) is not None})
        models = {run_id: _model(run_id, url, self.model_cache_size) for run_id in run_ids}
        with _executing(_Execution(url, models)):
            return super().run_batch(items, batch_id, keys, offset)

    def validate_item(self, item: Any) -> None:
        """A replayed row must still be a mapping with an ``id`` and an integer ``run_id``
        (its values are checked against the model when it runs)."""
        row_run_id(item)
        if ID not in item:
            raise ValueError(f"a row needs an {ID!r}")

    def model(self, run_id: int) -> LoadedModel:
        """Run ``run_id``'s model, loaded for this chunk."""
        execution = _current()
        loaded = execution.models.get(run_id)
        if loaded is None:  # not one of the chunk's rows (a direct call of the item function)
            loaded = execution.models[run_id] = _model(
                run_id, execution.database_url, self.model_cache_size
            )
        return loaded

    def stage(self, record: dict[str, Any]) -> None:
        """Buffer a ``Prediction`` record for the next ``flush_items``."""
        _current().buffer.append(record)

    def flush_items(self) -> None:
        """Store the buffered predictions; see the module docs for what counts as stored."""
        execution = _execution.get()
        if execution is None or not execution.buffer:
            return  # e.g. BatchTask.record_failure, outside any execution
        records = list(execution.buffer)
        with get_sessionmaker(execution.database_url)() as db:
            _, failed = safe_bulk_insert(
                db, Prediction, records, batch_size=self.insert_batch_size, commit=True
            )
            if failed:
                stored = _stored_keys(db, [record for record, _ in failed])
                failed = [
                    (record, error)
                    for record, error in failed
                    if (record["model_run_id"], record["item_key"]) not in stored
                ]
        # Stored records leave the buffer; refused ones stay for the next flush.
        execution.buffer[: len(records)] = [record for record, _ in failed]
        if failed:
            raise PredictionsNotStored(failed)


def _run_id_or_none(item: Any) -> int | None:
    try:
        return row_run_id(item)
    except ValueError:
        return None  # dead-lettered by the item function


@contextmanager
def _executing(execution: _Execution) -> Iterator[None]:
    token = _execution.set(execution)
    try:
        yield
    finally:
        _execution.reset(token)


def _current() -> _Execution:
    execution = _execution.get()
    if execution is None:
        raise RuntimeError("predict_rows' item function runs inside a batch (call the task)")
    return execution


def _stored_keys(db: Any, records: list[dict[str, Any]]) -> set[tuple[int, str]]:
    """Which ``(model_run_id, item_key)`` of ``records`` already have a prediction."""
    by_run: dict[int, list[str]] = {}
    for record in records:
        by_run.setdefault(record["model_run_id"], []).append(str(record["item_key"]))
    found: set[tuple[int, str]] = set()
    for run_id, keys in by_run.items():
        for start in range(0, len(keys), 500):
            rows = db.execute(
                select(Prediction.item_key).where(
                    Prediction.model_run_id == run_id,
                    Prediction.item_key.in_(keys[start : start + 500]),
                )
            )
            found.update((run_id, key) for (key,) in rows)
    return found


@app.task(base=PredictionTask, bind=True, shared=False, name="workers.batch.predict_rows")
def predict_rows(self: PredictionTask, row: dict[str, Any]) -> None:
    """Score one row with its run's model and buffer the ``Prediction`` (a bad row raises
    ``ValueError``: dead-lettered at once). Call the task with a list of rows."""
    self.stage(prediction_record(self.model(row_run_id(row)), row))


# -- sending a DataFrame -------------------------------------------------------------------------


def _cell(value: Any) -> Any:
    """A DataFrame cell as plain JSON data: NumPy scalars unwrapped, NaN/NA/NaT as None."""
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or value is pd.NA or value is pd.NaT:
        return None
    if isinstance(value, float) and math.isnan(value):
        return None
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return value


def dataframe_rows(
    df: pd.DataFrame, run_id: int, *, id_column: str | None = ID
) -> list[dict[str, Any]]:
    """The rows of ``df`` as ``predict_rows`` items: ``{"id": ..., "run_id": run_id, <columns>}``.

    ``id_column`` names the column of unique row ids (``None``: the DataFrame's index). Missing
    values (NaN) become ``None``, which the task refuses with a clear error.
    """
    if RUN_ID in df.columns:
        raise ConfigurationError(f"the DataFrame has a {RUN_ID!r} column; that key is reserved")
    if id_column is None:
        ids = [_cell(value) for value in df.index]
    elif id_column in df.columns:
        ids = [_cell(value) for value in df[id_column]]
    else:
        raise ConfigurationError(f"the DataFrame has no {id_column!r} column (id_column)")
    columns = [str(name) for name in df.columns if name != id_column]
    return [
        {
            ID: key,
            RUN_ID: int(run_id),
            **{c: _cell(v) for c, v in zip(columns, values, strict=True)},
        }
        for key, values in zip(
            ids,
            df.drop(columns=[id_column] if id_column else []).itertuples(index=False),
            strict=True,
        )
    ]


def _require_model(run_id: int, database_url: str | None) -> None:
    """``RunNotFound`` / ``RunNotResumable`` now, as ``load_model`` would raise in the workers,
    before any chunk is sent (without loading the model here)."""
    with session_scope(database_url) as db:
        row = db.execute(
            select(ModelRun.status, ModelRun.model_object.is_not(None)).where(ModelRun.id == run_id)
        ).one_or_none()
    if row is None:
        raise RunNotFound(run_id)
    status, has_model = row
    if status != "completed" or not has_model:
        raise RunNotResumable(run_id, f"has no final model (status {status})", "no_model")


def predict_dataframe(
    df: pd.DataFrame,
    run_id: int,
    *,
    chunk_size: int = 1000,
    id_column: str | None = ID,
    batch_id: str | None = None,
    **options: Any,
) -> BatchSubmission:
    """Send ``df``'s rows to ``predict_rows`` in chunks of ``chunk_size`` (``submit_batch``);
    scored with run ``run_id``'s model. ``options`` go to ``apply_async`` (``queue``...).

    ``RunNotFound`` / ``RunNotResumable`` before anything is sent when the run has no final
    model; ``ConfigurationError`` for a missing or repeated id.

    Example::

        summary = predict_dataframe(df, run_id=7).get(timeout=600)
    """
    _require_model(run_id, predict_rows.app.conf.get("taskkit_database_url"))
    rows = dataframe_rows(df, run_id, id_column=id_column)
    return submit_batch(predict_rows, rows, chunk_size, batch_id=batch_id, **options)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Score a CSV's rows with a run's model.")
    parser.add_argument("--run-id", type=int, required=True, help="a completed ModelRun")
    parser.add_argument("--csv", required=True, help="rows to score (the model's features)")
    parser.add_argument("--id-column", default=None, help="column of row ids (default: row no.)")
    parser.add_argument("--chunk-size", type=int, default=1000)
    parser.add_argument("--timeout", type=float, default=3600, help="seconds to wait")
    args = parser.parse_args(argv)
    submission = predict_dataframe(
        pd.read_csv(args.csv), args.run_id, chunk_size=args.chunk_size, id_column=args.id_column
    )
    print(
        f"batch {submission.batch_id}: {submission.total} rows in {len(submission.result)} chunks"
    )
    summary = submission.get(timeout=args.timeout)
    print(json.dumps({k: v for k, v in summary.items() if k != "failed_ids"}))
    return 0 if summary["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
