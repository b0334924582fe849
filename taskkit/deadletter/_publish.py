"""Publishing new dead letters to a broker queue (``TASKKIT_DEAD_LETTER_QUEUE``), with kombu.

The database row is the record; the queue is a feed for consumers (alerting, a dashboard), so a
publish failure is logged and never raised.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from kombu import Queue

__all__ = ["publish_letters"]

logger = logging.getLogger("taskkit.deadletter")


def publish_letters(app: Any, queue: str, rows: Sequence[dict[str, Any]]) -> None:
    """Publish letters (``DeadLetterEntry.row()`` dicts, with their ``id``) as JSON to ``queue``
    through the Celery ``app``'s broker connection pool."""
    if app is None:
        logger.warning("taskkit: dead-letter queue %r set but no Celery app to publish", queue)
        return
    try:
        declare = [Queue(queue, durable=True)]
        with app.producer_or_acquire() as producer:
            for row in rows:
                producer.publish(
                    _message(row),
                    exchange="",
                    routing_key=queue,
                    declare=declare,
                    serializer="json",
                    retry=True,
                    retry_policy={"max_retries": 3},
                )
    except Exception:
        logger.warning(
            "taskkit: could not publish %d dead letter(s) to queue %r; they are stored",
            len(rows),
            queue,
            exc_info=True,
        )


def _message(row: dict[str, Any]) -> dict[str, Any]:
    return {
        key: (value.isoformat() if isinstance(value, datetime) else value)
        for key, value in row.items()
    }
