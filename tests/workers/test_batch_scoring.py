"""``workers.batch``'s scoring as pure logic: ``feature_matrix`` checks rows as
``row_features`` does, and ``score_rows`` bisects a matrix the model raises on. Fake models
only (the end-to-end behaviour, with a real model, ledger and database, is in
tests/batch/test_predictions.py)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from workers.batch import feature_matrix, row_features, score_rows

FEATURES = ["a", "b", "c"]

#: Values a row's feature can hold: plain numbers (the fast path) and everything else.
VALUES = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-(10**400), max_value=10**400),
    st.sampled_from([None, True, False, "1.5", "x", np.float64(2.5), np.int64(3), np.nan]),
    st.sampled_from([np.float32(np.inf), np.bool_(True), [1.0], {"a": 1}]),
)
ROW = st.dictionaries(st.sampled_from([*FEATURES, "other"]), VALUES, max_size=4)


def expected(rows: list[dict[str, Any]], features: list[str]) -> dict[str, list[float]]:
    """What ``row_features`` accepts, one row at a time, by row id."""
    accepted = {}
    for row in rows:
        try:
            accepted[row["id"]] = row_features(row, features)
        except ValueError:
            pass
    return accepted


@settings(max_examples=300, deadline=None)
@given(st.lists(ROW, max_size=12), st.sampled_from([FEATURES, ["b"]]))
def test_the_matrix_holds_exactly_the_rows_row_features_accepts(
    drawn: list[dict[str, Any]], features: list[str]
) -> None:
    rows = [{**row, "id": i} for i, row in enumerate(drawn)]

    scorable, X = feature_matrix(rows, features)

    want = expected(rows, features)
    assert sorted(row["id"] for row in scorable) == sorted(want)
    assert X.shape == (len(scorable), len(features))
    assert X.dtype == np.float64
    for row, x in zip(scorable, X.tolist(), strict=True):
        assert x == want[row["id"]]
        assert all(math.isfinite(value) for value in x)


def test_plain_rows_keep_their_order_and_the_others_follow() -> None:
    rows = [
        {"id": 0, "a": 1, "b": 2.5, "c": -3},
        {"id": 1, "a": np.float64(4.0), "b": 5, "c": 6},  # checked by row_features
        {"id": 2, "a": 7.0, "b": 8.0, "c": 9.0},
        {"id": 3, "a": 1.0, "b": None, "c": 1.0},  # refused
        {"id": 4, "a": 1.0, "b": math.inf, "c": 1.0},  # refused by np.isfinite
    ]

    scorable, X = feature_matrix(rows, FEATURES)

    assert [row["id"] for row in scorable] == [0, 2, 1]
    assert X.tolist() == [[1.0, 2.5, -3.0], [7.0, 8.0, 9.0], [4.0, 5.0, 6.0]]


class FakeModel:
    """Predicts ``a * 10``; ``predict`` raises ``error`` on any matrix holding a row whose
    ``a`` is in ``refuse``."""

    n_features_in_ = 3

    def __init__(self, refuse: set[float], error: type[Exception] = ArithmeticError) -> None:
        self.refuse, self.error, self.calls = refuse, error, []  # type: ignore[var-annotated]

    def predict(self, X: np.ndarray) -> np.ndarray:
        self.calls.append(len(X))
        bad = sorted(set(X[:, 0].tolist()) & self.refuse)
        if bad:
            raise self.error(f"refused a={bad[0]}")
        return X[:, 0] * 10


def rows_of(count: int) -> list[dict[str, Any]]:
    return [{"id": f"r{i}", "f0": float(i), "f1": 0.0, "f2": 0.0} for i in range(count)]


def test_one_call_for_the_whole_matrix_when_the_model_accepts_it() -> None:
    model = FakeModel(set())

    records = score_rows(3, model, rows_of(100))

    assert model.calls == [100]
    assert records["r7"] == {
        "model_run_id": 3,
        "item_key": "r7",
        "input_data": {"f0": 7.0, "f1": 0.0, "f2": 0.0},
        "prediction": 70.0,
        "confidence": None,
    }
    assert type(records["r7"]["prediction"]) is float  # plain JSON, not a NumPy scalar


@pytest.mark.parametrize("refuse", [{0.0}, {99.0}, {13.0, 14.0}, {5.0, 50.0, 77.0}])
def test_rows_the_model_raises_on_are_refused_alone_with_its_error(refuse: set[float]) -> None:
    model = FakeModel(refuse)
    refused: dict[str, Exception] = {}

    records = score_rows(3, model, rows_of(100), refused=refused)

    assert sorted(refused) == sorted(f"r{int(a)}" for a in refuse)
    for key, error in refused.items():
        assert isinstance(error, ArithmeticError)
        assert str(error) == f"refused a={float(key[1:])}"
    assert sorted(records) == sorted(f"r{i}" for i in range(100) if float(i) not in refuse)
    assert all(
        record["prediction"] == record["input_data"]["f0"] * 10 for record in records.values()
    )
    # Each refused row costs at most 2 calls per halving (log2(100) < 7), plus the first.
    assert len(model.calls) <= 1 + 2 * 7 * len(refuse)


def test_a_model_that_refuses_everything_refuses_every_row_alone() -> None:
    model = FakeModel({float(i) for i in range(10)}, error=RuntimeError)
    refused: dict[str, Exception] = {}

    assert score_rows(3, model, rows_of(10), refused=refused) == {}

    assert sorted(refused) == sorted(f"r{i}" for i in range(10))
    assert model.calls.count(1) == 10
    assert len(model.calls) == 2 * 10 - 1


def test_a_model_returning_too_few_predictions_is_an_error_of_its_rows() -> None:
    class Short(FakeModel):
        def predict(self, X: np.ndarray) -> np.ndarray:
            return super().predict(X)[:1]

    refused: dict[str, Exception] = {}

    records = score_rows(3, Short(set()), rows_of(4), refused=refused)

    assert sorted(records) == ["r0", "r1", "r2", "r3"]  # alone, each row gets its one answer
    assert refused == {}
