"""Durable per-item state: the dead-letter store and the batch item ledger. No Celery import.

``DeadLetterStore`` keeps items and tasks that exhausted their retries in the database (record,
list, count per task, discard, purge); ``DeadLetterEntry`` is one failure to record;
``ItemLedger`` knows which items of a batch are claimed, done or dead, and ``batch_progress``
counts them. Sending letters again is ``taskkit.tasks.replay_dead_letters`` (it drives Celery
tasks); ``docs/batch.md`` gives the decisions.

Example::

    from taskkit.deadletter import DeadLetterStore

    store = DeadLetterStore()
    for letter in store.list(task="jobs.score_items", error_type="KeyError"):
        print(letter.id, letter.item_key, letter.error_message)
    print(store.depth())                              # {"jobs.score_items": 12}
    store.purge()                                     # older than the retention setting
"""

from taskkit.deadletter._json import UNSERIALIZABLE
from taskkit.deadletter._ledger import BatchProgress, ItemLedger, batch_progress
from taskkit.deadletter._query import BatchReport, LetterQuery, batch_report
from taskkit.deadletter._store import (
    DeadLetterEntry,
    DeadLetterStore,
    ReplayResult,
    SentReplay,
)

__all__ = [
    "UNSERIALIZABLE",
    "BatchProgress",
    "BatchReport",
    "DeadLetterEntry",
    "DeadLetterStore",
    "ItemLedger",
    "LetterQuery",
    "ReplayResult",
    "SentReplay",
    "batch_progress",
    "batch_report",
]
