"""Dead letters for tests: one factory for the store's, the CLI's and the replay tests."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from taskkit.deadletter import DeadLetterEntry


def letter_entry(
    task: str,
    payload: Any = None,
    *,
    batch: str | None = "b1",
    key: str | None = "a",
    error: BaseException | None = None,
    attempts: int = 1,
    at: datetime | None = None,
    task_id: str | None = None,
) -> DeadLetterEntry:
    """A failure of ``task`` on item ``key`` of ``batch`` (a whole task when both are None),
    with a ``KeyError('price')`` unless ``error`` is given; the payload defaults to the item."""
    error = error or KeyError("price")
    return DeadLetterEntry(
        task_name=task,
        payload={"id": key} if payload is None else payload,
        error_type=type(error).__name__,
        error_message=str(error),
        traceback=f"Traceback (most recent call last):\n{type(error).__name__}: {error}\n",
        attempts=attempts,
        batch_id=batch,
        item_key=key,
        task_id=task_id,
        failed_at=at or datetime.now(UTC),
    )
