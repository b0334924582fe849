"""The example batch prediction job: score rows with a completed training run's model.

``predict_rows`` is a ``BatchTask`` over rows ``{"id": ..., "run_id": ..., <features>...}``.
Its ``setup_chunk`` loads each run's model once per chunk and scores the chunk's valid rows as
one matrix (``score_rows``); the item function then buffers each row's ``Prediction`` (or raises
the row's ``ValueError``, naming the bad columns, so the row is dead-lettered at once with
itself as the payload), and ``flush_items`` stores the buffer with ``safe_bulk_insert``.

Example::

    import pandas as pd
    from workers.batch import predict_dataframe

    submission = predict_dataframe(pd.read_csv("rows.csv"), run_id=7, chunk_size=1000)
    print(submission.progress())               # done / dead / claimed, from the item ledger
    summary = submission.get(timeout=600)      # {"total", "successful", "failed", ...}

or, with a worker running (``make worker``): ``python -m workers.batch --run-id 7 --csv rows.csv``.

Decisions:

- The run id travels in every row: a dead-letter replay re-sends the dead rows alone.
- Features are the model's ``feature_names_in_``, else ``f0 .. f<n-1>``; other columns are
  ignored. A feature must be a finite number (``bool`` and text are refused, not guessed at).
- A run without a usable model (``RunNotFound``, ``RunNotResumable``, ``CheckpointTampered``)
  fails ``setup_chunk``, so the whole chunk fails without retry and, in a worker, its rows are
  dead-lettered with that error: ``taskkit dlq replay --error-type RunNotResumable`` once the
  run has completed. ``predict_dataframe`` checks the run before sending anything.
- Rows are checked into the matrix by the types of their values and ``np.isfinite`` over the
  whole matrix; only unusual rows go through ``row_features`` one by one (a chunk scores about
  100x the rows/s of a row at a time: docs/benchmarks.md). Should ``predict`` raise, the matrix
  is scored in halves until the rows the model refuses stand alone: each fails alone with the
  model's error (scored alone once more on its item's second try), the others are stored. A
  time limit striking inside the call fails the chunk; it is never taken for a row's error.
- A prediction refused only because ``(model_run_id, item_key)`` exists (a redelivered chunk)
  counts as stored; any other refusal raises ``PredictionsNotStored`` so no row is marked done
  before its prediction is stored.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import numbers
import operator
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import pandas as pd
from celery.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded
from sqlalchemy import select

from taskkit.db import safe_bulk_insert
from taskkit.db.models import ModelRun, Prediction
from taskkit.db.session import get_sessionmaker, session_scope
from taskkit.errors import ConfigurationError, PermanentError, RunNotFound, RunNotResumable
from taskkit.tasks import BatchSubmission, BatchTask, Option, load_model, submit_batch
from workers.app import app

__all__ = [
    "PredictionTask",
    "PredictionsNotStored",
    "ScoredChunk",
    "dataframe_rows",
    "feature_columns",
    "feature_matrix",
    "predict_dataframe",
    "predict_rows",
    "row_features",
    "score_rows",
]

ID, RUN_ID = "id", "run_id"
#: Raised into a task by its time limits: never taken for a row's error.
_TIME_LIMITS = (SoftTimeLimitExceeded, TimeLimitExceeded)


class PredictionsNotStored(PermanentError):
    """The database refused predictions for a reason other than "already stored"."""

    def __init__(self, failed: list[tuple[dict[str, Any], str]]) -> None:
        listed = "; ".join(f"{record['item_key']}: {error}" for record, error in failed[:3])
        super().__init__(f"{len(failed)} prediction(s) not stored: {listed}")
        self.failed = failed


def row_features(row: Mapping[str, Any], features: Sequence[str]) -> list[float]:
    """``row``'s values of ``features`` as floats; ``ValueError`` naming every bad column."""
    problems = []
    for name in features:
        value = row.get(name)
        if name not in row:
            problems.append(f"{name} is missing")
        elif value is None:
            problems.append(f"{name} has no value")
        elif isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Real):
            problems.append(f"{name} is not a number: {value!r}")
        elif not _finite(value):
            problems.append(f"{name} is not a finite number: {value!r}")
    if problems:
        raise ValueError(f"row {row.get(ID)!r} cannot be scored: {'; '.join(problems)}")
    return [float(row[name]) for name in features]


def _finite(value: numbers.Real) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float (JSON allows one)
        return False


def _run_id(row: Any) -> int:
    if not isinstance(row, Mapping):
        raise ValueError(f"a row must be a mapping of column to value, not {type(row).__name__}")
    run_id = row.get(RUN_ID)
    if not isinstance(run_id, int | np.integer) or isinstance(run_id, bool):
        raise ValueError(f"row {row.get(ID)!r}: run_id must be an integer, not {run_id!r}")
    return int(run_id)


#: The types of feature values the matrix takes as they are (what JSON decodes numbers to);
#: a row with any other value (NumPy scalars, None, text, bool) goes through ``row_features``.
_PLAIN = frozenset({float, int})


def feature_matrix(
    rows: Sequence[Mapping[str, Any]], features: Sequence[str]
) -> tuple[list[Mapping[str, Any]], np.ndarray]:
    """The rows of ``rows`` that can be scored and their ``features`` as one float matrix (row i
    of the matrix is the i-th row returned); rows ``row_features`` refuses are left out.

    The usual row, every feature a plain ``float`` or ``int``, is checked by its types and, for
    the whole matrix at once, by ``np.isfinite``; any other row is checked by ``row_features``.

    Example::

        scorable, X = feature_matrix([{"f0": 1.0}, {"f0": None}], ["f0"])  # 1 row, X 1x1
    """
    if len(features) == 1:
        name = features[0]
        get: Callable[[Mapping[str, Any]], tuple[Any, ...]] = lambda row: (row[name],)  # noqa: E731
    else:
        get = operator.itemgetter(*features)
    plain: list[Mapping[str, Any]] = []
    cells: list[tuple[Any, ...]] = []
    odd: list[Mapping[str, Any]] = []
    for row in rows:
        try:
            cell = get(row)
        except KeyError:
            odd.append(row)
            continue
        if _PLAIN.issuperset(map(type, cell)):
            plain.append(row)
            cells.append(cell)
        else:
            odd.append(row)
    try:
        X = np.array(cells, dtype=np.float64).reshape(len(cells), len(features))
    except OverflowError:  # an int too large for a float: let row_features name it
        X, odd, plain = np.empty((0, len(features))), plain + odd, []
    finite = np.isfinite(X).all(axis=1)
    if not finite.all():
        keep: list[bool] = finite.tolist()
        odd += [row for row, ok in zip(plain, keep, strict=True) if not ok]
        plain, X = [row for row, ok in zip(plain, keep, strict=True) if ok], X[finite]
    extra = []
    for row in odd:
        with contextlib.suppress(ValueError):  # raised again by the row's own item
            extra.append(row_features(row, features))
            plain.append(row)
    if extra:
        X = np.vstack([X, np.array(extra, dtype=np.float64)])
    return plain, X


def _predict(model: Any, X: np.ndarray, features: Sequence[str]) -> list[Any]:
    """``(prediction, confidence)`` of every row of ``X``, from one ``predict`` (and one
    ``predict_proba``) call; when a call raises, the two halves are scored apart, down to the
    single row, whose item is the error (``_TIME_LIMITS`` pass through)."""
    try:
        named = hasattr(model, "feature_names_in_")  # fitted on a DataFrame: give it one
        data = pd.DataFrame(X, columns=list(features)) if named else X
        predicted = np.asarray(model.predict(data)).tolist()  # NumPy scalars as plain JSON
        if hasattr(model, "predict_proba"):
            confidence = np.asarray(model.predict_proba(data)).max(axis=1).tolist()
        else:
            confidence = [None] * len(X)
        if not len(predicted) == len(confidence) == len(X):
            raise ValueError(f"the model returned {len(predicted)} predictions for {len(X)} rows")
    except _TIME_LIMITS:
        raise
    except Exception as error:
        if len(X) == 1:
            return [error]
        middle = len(X) // 2
        return _predict(model, X[:middle], features) + _predict(model, X[middle:], features)
    return list(zip(predicted, confidence, strict=True))


def score_rows(
    run_id: int,
    model: Any,
    rows: Sequence[Mapping[str, Any]],
    *,
    refused: dict[str, Exception] | None = None,
) -> dict[str, Any]:
    """The ``Prediction`` records of the rows ``model`` can score, by row id: the rows are
    checked into one matrix (``feature_matrix``) and scored with one ``predict`` (and
    ``predict_proba``) call. Rows that cannot be scored are left out. Should a call raise, the
    matrix is split in halves until the rows the model refuses stand alone: each such row is
    left out too, its error put in ``refused`` by row id, and the others are scored.

    Example::

        records = score_rows(7, model, rows)  # {"row-1": {"model_run_id": 7, ...}, ...}
    """
    features = feature_columns(model)
    scorable, X = feature_matrix(rows, features)
    if not scorable:
        return {}
    records = {}
    for row, x, scored in zip(scorable, X.tolist(), _predict(model, X, features), strict=True):
        key = str(row[ID])
        if isinstance(scored, Exception):
            if refused is not None:
                refused[key] = scored
            continue
        records[key] = {
            "model_run_id": run_id,
            "item_key": key,
            "input_data": dict(zip(features, x, strict=True)),
            "prediction": scored[0],
            "confidence": None if scored[1] is None else float(scored[1]),
        }
    return records


def feature_columns(model: Any) -> list[str]:
    """The columns ``model`` scores: ``feature_names_in_``, else ``f0 .. f<n-1>`` (the names
    of ``workers.training``'s datasets, fitted as a NumPy array)."""
    names = getattr(model, "feature_names_in_", None)
    if names is not None:
        return [str(name) for name in names]
    count = getattr(model, "n_features_in_", None)
    if count is None:
        raise ConfigurationError(f"cannot tell which columns {type(model).__name__} scores")
    return [f"f{i}" for i in range(int(count))]


@dataclass
class ScoredChunk:
    """What ``setup_chunk`` yields: the chunk's records by row id, the features and model of
    each run (to explain or score again a row that was not scored), the errors of the rows the
    model refused, and the records waiting for ``flush_items``."""

    database_url: str | None
    records: dict[str, Any] = field(default_factory=dict)
    features: dict[int, list[str]] = field(default_factory=dict)
    buffer: list[dict[str, Any]] = field(default_factory=list)
    models: dict[int, Any] = field(default_factory=dict)
    refused: dict[str, Exception] = field(default_factory=dict)

    def stage(self, row: Mapping[str, Any]) -> None:
        """Buffer ``row``'s prediction. ``ValueError`` for a row that could not be scored; for a
        row the model refused, the model's error, and on the item's next try the row is scored
        again alone."""
        run_id = _run_id(row)
        key = str(row.get(ID))
        record = self.records.get(key)
        if record is None or record["model_run_id"] != run_id:
            error = self.refused.pop(key, None)
            if error is not None:
                raise error  # what the model raised on this row alone
            row_features(row, self.features[run_id])  # raises, naming the bad columns
            model = self.models.get(run_id)
            if model is not None:  # a retry of a refused row, or an id another run scored
                self.records.update(score_rows(run_id, model, [row], refused=self.refused))
                record = self.records.get(key)
            if record is None or record["model_run_id"] != run_id:
                error = self.refused.pop(key, None)
                if error is not None:
                    raise error
                raise ValueError(f"row {row.get(ID)!r} was not scored with its chunk")
        self.buffer.append(record)


class PredictionTask(BatchTask):
    """Scores a chunk in ``setup_chunk``; its item function stages each row's record."""

    taskkit_options: ClassVar[tuple[Option, ...]] = (
        Option("insert_batch_size", 500, lambda v: isinstance(v, int) and v >= 1,
               "an integer >= 1", "Records per safe_bulk_insert batch."),
    )  # fmt: skip
    insert_batch_size: int
    item_key = ID
    item_max_attempts = 2  # scoring is deterministic: one more try covers a fluke
    item_delay = 0.5
    permanent_errors = (RunNotResumable,)

    @contextlib.contextmanager
    def setup_chunk(self, items: Sequence[Any]) -> Iterator[ScoredChunk]:
        chunk = ScoredChunk(self.app.conf.get("taskkit_database_url"))
        by_run: dict[int, list[Any]] = {}
        for row in items:
            with contextlib.suppress(ValueError):  # a row without a run id fails on its own
                by_run.setdefault(_run_id(row), []).append(row)
        for run_id, rows in by_run.items():
            model = load_model(run_id, database_url=chunk.database_url)  # once per chunk
            chunk.models[run_id] = model
            chunk.records.update(score_rows(run_id, model, rows, refused=chunk.refused))
            chunk.features[run_id] = feature_columns(model)
        yield chunk

    def validate_item(self, item: Any) -> None:
        """A replayed row must still be a mapping with an ``id`` and an integer ``run_id``."""
        _run_id(item)
        if ID not in item:
            raise ValueError(f"a row needs an {ID!r}")

    def flush_items(self) -> None:
        """Store the staged records; see the module docs for what counts as stored."""
        chunk: ScoredChunk = self.chunk_context
        records = list(chunk.buffer)
        if not records:
            return
        with get_sessionmaker(chunk.database_url)() as db:
            _, failed = safe_bulk_insert(
                db, Prediction, records, batch_size=self.insert_batch_size, commit=True
            )
            stored = _stored(db, [record for record, _ in failed])
        failed = [(r, e) for r, e in failed if (r["model_run_id"], r["item_key"]) not in stored]
        chunk.buffer[: len(records)] = [record for record, _ in failed]  # kept for the next try
        if failed:
            raise PredictionsNotStored(failed)


def _stored(db: Any, records: list[dict[str, Any]]) -> set[tuple[int, str]]:
    """Which ``(model_run_id, item_key)`` of ``records`` already have a prediction: one query
    per run and 500 keys, on the ``(model_run_id, item_key)`` unique index."""
    keys_by_run: dict[int, list[str]] = {}
    for record in records:
        keys_by_run.setdefault(record["model_run_id"], []).append(record["item_key"])
    found: set[tuple[int, str]] = set()
    for run_id, keys in keys_by_run.items():
        for start in range(0, len(keys), 500):
            query = select(Prediction.item_key).where(
                Prediction.model_run_id == run_id,
                Prediction.item_key.in_(keys[start : start + 500]),
            )
            found.update((run_id, key) for key in db.scalars(query))
    return found


@app.task(base=PredictionTask, bind=True, shared=False, name="workers.batch.predict_rows")
def predict_rows(self: PredictionTask, row: dict[str, Any]) -> None:
    """Stage one row's prediction (a row that cannot be scored raises ``ValueError``: it is
    dead-lettered at once). Call the task with a list of rows."""
    self.chunk_context.stage(row)


# -- sending a DataFrame -------------------------------------------------------------------------


def _cell(value: Any) -> Any:
    """A DataFrame cell as plain JSON: NumPy scalars unwrapped, NaN/NA/NaT as None."""
    value = value.item() if isinstance(value, np.generic) else value
    if value is None or value is pd.NA or value is pd.NaT:
        return None
    if isinstance(value, float) and math.isnan(value):
        return None
    return value.isoformat() if hasattr(value, "isoformat") else value


def dataframe_rows(
    df: pd.DataFrame, run_id: int, *, id_column: str | None = ID
) -> list[dict[str, Any]]:
    """``df``'s rows as ``predict_rows`` items, ids from ``id_column`` (None: the index);
    missing values (NaN) become None, which the task refuses with a clear error."""
    if RUN_ID in df.columns:
        raise ConfigurationError(f"the DataFrame has a {RUN_ID!r} column; that key is reserved")
    if id_column is not None and id_column not in df.columns:
        raise ConfigurationError(f"the DataFrame has no {id_column!r} column (id_column)")
    ids = df.index if id_column is None else df[id_column]
    data = df if id_column is None else df.drop(columns=[id_column])
    columns = [str(name) for name in data.columns]
    return [
        {ID: _cell(key), RUN_ID: int(run_id), **dict(zip(columns, map(_cell, values), strict=True))}
        for key, values in zip(ids, data.itertuples(index=False), strict=True)
    ]


def predict_dataframe(
    df: pd.DataFrame,
    run_id: int,
    *,
    chunk_size: int = 1000,
    id_column: str | None = ID,
    batch_id: str | None = None,
    **options: Any,
) -> BatchSubmission:
    """Send ``df``'s rows to ``predict_rows`` in chunks (``submit_batch``; ``options`` go to
    ``apply_async``). ``RunNotFound`` / ``RunNotResumable`` before anything is sent when run
    ``run_id`` has no final model.

    Example::

        summary = predict_dataframe(df, run_id=7).get(timeout=600)
    """
    with session_scope(predict_rows.app.conf.get("taskkit_database_url")) as db:
        run = db.execute(
            select(ModelRun.status, ModelRun.model_object.is_not(None)).where(ModelRun.id == run_id)
        ).one_or_none()
    if run is None:
        raise RunNotFound(run_id)
    if run[0] != "completed" or not run[1]:
        raise RunNotResumable(run_id, f"has no final model (status {run[0]})", "no_model")
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
    frame = pd.read_csv(args.csv)
    submission = predict_dataframe(
        frame, args.run_id, chunk_size=args.chunk_size, id_column=args.id_column
    )
    print(
        f"batch {submission.batch_id}: {submission.total} rows in {len(submission.result)} chunks"
    )
    summary = submission.get(timeout=args.timeout)
    print(json.dumps({k: v for k, v in summary.items() if k != "failed_ids"}))
    return 0 if summary["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
