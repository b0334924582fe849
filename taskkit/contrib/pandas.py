"""Process a pandas DataFrame row by row with ``batch_with_retry``.

A thin layer over ``taskkit.recovery.batch_with_retry``: the rows go in as dicts, the results
come back as a DataFrame indexed like the input, and the rows that ran out of retries come
back with their exceptions.

Example::

    import pandas as pd
    from taskkit.contrib.pandas import process_dataframe_in_batches

    def transform_row(row: dict) -> dict:
        row["processed"] = row["value"] * 2
        return row

    df = pd.read_csv("large_dataset.csv")
    processed_df, failures = process_dataframe_in_batches(df, transform_row, batch_size=500)
    print(f"Processed {len(processed_df)} rows successfully")
    for row, error in failures:
        print(f"row {row} failed: {error}")
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import pandas as pd  # type: ignore[import-untyped, unused-ignore]  # no pandas-stubs installed

from taskkit._utils import check_batch_options
from taskkit.errors import ConfigurationError
from taskkit.recovery import batch_with_retry

__all__ = ["RESULT_COLUMN", "process_dataframe_in_batches"]

#: The column that holds results that are not dicts or Series.
RESULT_COLUMN = "result"

Row = dict[Any, Any]


def process_dataframe_in_batches(
    df: pd.DataFrame,
    process_func: Callable[[Row], object],
    batch_size: int = 1000,
    max_retries: int = 2,
    **options: Any,
) -> tuple[pd.DataFrame, list[tuple[Row, BaseException]]]:
    """Call ``process_func(row)`` for every row of ``df`` with ``batch_with_retry``.

    Returns ``(result_df, failed)``: the results of the rows that succeeded as a DataFrame,
    and ``(row, exception)`` for each row that ran out of retries, in input order. Each row is
    a dict of column name to value (``df.to_dict("records")``). ``batch_size``,
    ``max_retries`` and every option of ``batch_with_retry`` (``delay``, ``backoff``,
    ``exceptions``, ``give_up_on``, ``circuit``, ``budget``, ``on_progress``, ``sleep``, ...)
    mean what they mean there; ``max_retries=2`` is at most 3 attempts per row.

    Decisions:

    - ``result_df`` keeps the original index labels of the rows that succeeded, so it can be
      joined back to ``df`` (``df.join(result_df, rsuffix="_new")``) and the failed rows are
      the labels missing from it.
    - If every result is a dict (any mapping) or a pandas Series, each becomes a row and its
      keys the columns (in the order first seen). Otherwise every result goes, as it is, into
      one column named ``"result"`` (``RESULT_COLUMN``).
    - No row succeeded (or ``df`` has no rows): an empty DataFrame with ``df``'s columns and
      dtypes.
    - Every attempt gets a fresh shallow copy of the row, so a function that changes its row
      and then fails does not leave the change for the next attempt, and ``failed`` holds the
      rows as they were read from ``df``.
    - ``df`` must be a DataFrame with unique column names (a dict cannot hold two columns of
      the same name): anything else is a ``ConfigurationError``.

    Example::

        def score(row: dict) -> float:
            return model_api.predict(row["features"])

        scores, failed = process_dataframe_in_batches(df, score, batch_size=200, delay=0.5)
        df = df.join(scores)  # a "result" column, NaN for the rows that failed
    """
    if not isinstance(df, pd.DataFrame):
        raise ConfigurationError(
            f"process_dataframe_in_batches: df must be a pandas DataFrame, got {type(df).__name__}"
        )
    if not df.columns.is_unique:
        duplicated = sorted({str(c) for c in df.columns[df.columns.duplicated()]})
        raise ConfigurationError(
            f"process_dataframe_in_batches: df has duplicate column names {duplicated}; "
            f"rows are given to process_func as dicts, which cannot hold them"
        )
    check_batch_options("process_dataframe_in_batches", options, batch_with_retry)
    rows: list[Row] = df.to_dict("records")

    # The items are row positions, so the positions of the rows that succeeded are known.
    @functools.wraps(process_func)
    def process_row(position: int) -> object:
        return process_func(dict(rows[position]))

    successful, failed = batch_with_retry(
        range(len(rows)), process_row, batch_size, max_retries, **options
    )
    failed_positions = {position for position, _ in failed}
    kept = [position for position in range(len(rows)) if position not in failed_positions]
    return _to_frame(df, successful, df.index.take(kept)), [
        (rows[position], error) for position, error in failed
    ]


def _to_frame(df: pd.DataFrame, results: list[object], index: pd.Index) -> pd.DataFrame:
    if not results:
        return df.iloc[:0].copy()
    records: list[Row] = []
    for result in results:
        if isinstance(result, pd.Series):
            records.append(result.to_dict())
        elif isinstance(result, Mapping):
            records.append(dict(result))
        else:
            break  # not all rows: one column of results
    else:
        # Not DataFrame.from_records: it reads index labels that are column names as fields.
        return pd.DataFrame(records, index=index)
    column = pd.Series(results, index=index, dtype=object).infer_objects()
    return column.to_frame(RESULT_COLUMN)
