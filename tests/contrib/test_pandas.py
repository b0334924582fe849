"""process_dataframe_in_batches: rows in as dicts, results out indexed like the input."""

from __future__ import annotations

import pandas as pd
import pytest

import taskkit.contrib.pandas
from taskkit.contrib.pandas import RESULT_COLUMN, process_dataframe_in_batches
from taskkit.errors import ConfigurationError


def no_sleep(seconds: float) -> None:
    raise AssertionError(f"slept {seconds} s; these tests use delay=0")


def frame(n: int = 6) -> pd.DataFrame:
    return pd.DataFrame(
        {"value": range(n), "name": [f"item-{i}" for i in range(n)]},
        index=pd.Index([f"row-{i}" for i in range(n)], name="key"),
    )


def validate(row: dict) -> bool:
    if row["value"] == 3:
        raise ValueError(f"value {row['value']} is not allowed")
    return True


def transform_row(row: dict) -> dict:
    """The seed's usage example."""
    row["processed"] = row["value"] * 2
    row["validated"] = validate(row)
    return row


def test_the_seed_usage_doubles_a_column_and_reports_the_failed_row():
    df = frame()
    processed_df, failures = process_dataframe_in_batches(
        df, transform_row, batch_size=2, delay=0, sleep=no_sleep
    )
    assert list(processed_df.columns) == ["value", "name", "processed", "validated"]
    assert processed_df["processed"].tolist() == [0, 2, 4, 8, 10]
    assert processed_df["validated"].all()
    assert [(row, str(error)) for row, error in failures] == [
        ({"value": 3, "name": "item-3"}, "value 3 is not allowed")
    ]
    assert isinstance(failures[0][1], ValueError)


def test_result_keeps_the_original_index_labels_so_it_joins_back():
    df = frame()
    processed_df, failures = process_dataframe_in_batches(df, transform_row, delay=0)
    assert processed_df.index.tolist() == ["row-0", "row-1", "row-2", "row-4", "row-5"]
    assert processed_df.index.name == "key"
    joined = df.join(processed_df[["processed"]])
    assert joined.loc["row-4", "processed"] == 8
    assert pd.isna(joined.loc["row-3", "processed"])  # the failed row
    assert len(failures) == 1


def test_a_non_default_index_with_duplicates_is_kept_label_for_label():
    df = pd.DataFrame({"value": [1, 2, 3, 4]}, index=[10, 10, 7, 7])
    result, failures = process_dataframe_in_batches(
        df, lambda row: {"double": row["value"] * 2}, delay=0
    )
    assert result.index.tolist() == [10, 10, 7, 7]
    assert result["double"].tolist() == [2, 4, 6, 8]
    assert failures == []


def test_failed_rows_come_back_with_their_exceptions_after_the_retries(clock):
    attempts: dict[int, int] = {}

    def flaky(row: dict) -> dict:
        value = row["value"]
        attempts[value] = attempts.get(value, 0) + 1
        if value == 1 and attempts[value] < 3:
            raise ConnectionError("transient")  # recovers on the third attempt
        if value in (2, 5):
            raise ConnectionError(f"down for {value}")
        return {"value": value}

    result, failures = process_dataframe_in_batches(
        frame(), flaky, batch_size=4, max_retries=2, sleep=clock.sleep, clock=clock
    )
    assert result["value"].tolist() == [0, 1, 3, 4]
    assert result.index.tolist() == ["row-0", "row-1", "row-3", "row-4"]
    assert [(row["value"], str(error)) for row, error in failures] == [
        (2, "down for 2"),
        (5, "down for 5"),
    ]
    assert attempts == {0: 1, 1: 3, 2: 3, 3: 1, 4: 1, 5: 3}
    assert clock.sleeps  # waited through the injected sleep


def test_every_attempt_gets_a_fresh_copy_and_failed_rows_are_as_read():
    seen: list[int] = []

    def doubles_in_place_then_fails_once(row: dict) -> dict:
        row["value"] *= 2
        seen.append(row["value"])
        if len(seen) == 1:
            raise ConnectionError("transient")
        return row

    df = pd.DataFrame({"value": [5]})
    result, failures = process_dataframe_in_batches(df, doubles_in_place_then_fails_once, delay=0)
    assert seen == [10, 10]  # the retry did not start from the changed row
    assert result["value"].tolist() == [10]
    assert df["value"].tolist() == [5]  # the input is untouched

    _, failures = process_dataframe_in_batches(
        df, lambda row: row.update(value=0) or 1 / 0, max_retries=0
    )
    assert failures[0][0] == {"value": 5}


def test_scalar_results_become_one_result_column():
    df = frame(4)
    result, failures = process_dataframe_in_batches(df, lambda row: row["value"] * 1.5, delay=0)
    assert list(result.columns) == [RESULT_COLUMN] == ["result"]
    assert result[RESULT_COLUMN].tolist() == [0.0, 1.5, 3.0, 4.5]
    assert result[RESULT_COLUMN].dtype == "float64"
    assert result.index.tolist() == df.index.tolist()
    assert failures == []


def test_list_results_and_mixed_results_stay_whole_in_the_result_column():
    df = frame(3)
    result, _ = process_dataframe_in_batches(df, lambda row: [row["value"]] * 2)
    assert result[RESULT_COLUMN].tolist() == [[0, 0], [1, 1], [2, 2]]
    mixed, _ = process_dataframe_in_batches(
        df, lambda row: {"v": row["value"]} if row["value"] else None
    )
    assert list(mixed.columns) == [RESULT_COLUMN]
    assert mixed[RESULT_COLUMN].tolist() == [None, {"v": 1}, {"v": 2}]


def test_series_results_become_rows():
    df = frame(3)
    result, _ = process_dataframe_in_batches(
        df, lambda row: pd.Series({"value": row["value"], "squared": row["value"] ** 2})
    )
    assert list(result.columns) == ["value", "squared"]
    assert result["squared"].tolist() == [0, 1, 4]
    assert result.index.tolist() == df.index.tolist()


def test_when_every_row_fails_the_result_is_empty_with_the_input_columns():
    df = frame(3)
    result, failures = process_dataframe_in_batches(df, lambda row: 1 / 0, delay=0)
    assert result.empty
    assert list(result.columns) == ["value", "name"]
    assert result.dtypes.to_dict() == df.dtypes.to_dict()
    assert result.index.name == "key"
    assert [type(error) for _, error in failures] == [ZeroDivisionError] * 3


def test_an_empty_frame_gives_an_empty_result_without_calling_the_function():
    def never(row: dict) -> None:
        raise AssertionError("called for a frame without rows")

    result, failures = process_dataframe_in_batches(frame(0), never)
    assert result.empty
    assert list(result.columns) == ["value", "name"]
    assert failures == []


def test_options_are_passed_through_to_batch_with_retry():
    attempts: list[int] = []
    progress: list[tuple[int, int]] = []

    def bad_input(row: dict) -> int:
        attempts.append(row["value"])
        raise ValueError("bad input")

    _, failures = process_dataframe_in_batches(
        frame(2),
        bad_input,
        batch_size=1,
        delay=0,
        give_up_on=ValueError,
        on_progress=lambda done, total: progress.append((done, total)),
    )
    assert attempts == [0, 1]  # given up on at once, no retries
    assert len(failures) == 2
    assert progress[-1] == (2, 2)


@pytest.mark.parametrize(
    "not_a_frame",
    [[{"value": 1}], {"value": [1, 2]}, pd.Series([1, 2]), None],
    ids=["list of dicts", "dict", "Series", "None"],
)
def test_anything_but_a_dataframe_is_a_configuration_error(not_a_frame):
    with pytest.raises(ConfigurationError, match=r"df must be a pandas DataFrame, got \w+"):
        process_dataframe_in_batches(not_a_frame, transform_row)


def test_duplicate_column_names_are_a_configuration_error():
    df = pd.DataFrame([[1, 2, 3]], columns=["a", "b", "a"])
    with pytest.raises(ConfigurationError, match=r"duplicate column names \['a'\]"):
        process_dataframe_in_batches(df, transform_row)


def test_bad_options_are_configuration_errors():
    with pytest.raises(ConfigurationError, match="batch_size must be an integer >= 1"):
        process_dataframe_in_batches(frame(), transform_row, batch_size=0)
    with pytest.raises(ConfigurationError, match="unknown option 'retries'"):
        process_dataframe_in_batches(frame(), transform_row, retries=3)


def test_the_module_exports_the_helper_with_an_example():
    assert "process_dataframe_in_batches" in taskkit.contrib.pandas.__all__
    assert "Example::" in (process_dataframe_in_batches.__doc__ or "")
    assert "Example::" in (taskkit.contrib.pandas.__doc__ or "")
