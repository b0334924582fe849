"""The user's own helpers that the seed's Celery snippets call but do not define.

They run inside an in-process worker thread, so the test reads what they recorded directly.
"""

from __future__ import annotations

from collections import Counter

#: data_id -> how many times loading it failed before it worked
LOAD_FAILURES: dict[int, int] = {}
loads: Counter[int] = Counter()
saved: dict[int, object] = {}
processed_items: Counter[int] = Counter()


def load_data(data_id: int) -> int:
    loads[data_id] += 1
    if loads[data_id] <= LOAD_FAILURES.get(data_id, 0):
        raise ConnectionError(f"feature store reset the connection while loading {data_id}")
    return data_id


def process(data: int) -> int:
    return data * 2


def save_result(item_id: int, result: object) -> None:
    saved[item_id] = result


def load_item(item_id: int) -> int:
    return item_id


def complex_processing(item: int) -> int:
    """Items ending in 3 always fail; items ending in 5 fail on their first attempt."""
    processed_items[item] += 1
    if item % 10 == 3:
        raise ValueError(f"item {item} cannot be processed")
    if item % 10 == 5 and processed_items[item] == 1:
        raise TimeoutError(f"item {item} timed out")
    return item + 1000
