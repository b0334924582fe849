"""The seed's Celery snippets that use only the recovery primitives, on a real worker.

The worker is Celery's in-process test worker (``celery.contrib.testing.worker.start_worker``)
consuming from the real Redis broker; the tasks are the seed's, unchanged but for imports.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import redis
from celery.contrib.testing.worker import start_worker
from celery.signals import before_task_publish

from tests.seed import doubles


@pytest.fixture(scope="module")
def worker(redis_url: str) -> Iterator[object]:
    from tests.seed.celery_app import QUEUE, celery_app
    from tests.seed.snippets import celery_tasks  # noqa: F401 - registers the tasks

    with start_worker(
        celery_app, pool="solo", concurrency=1, perform_ping_check=False, loglevel="WARNING"
    ) as running:
        yield running
    client = redis.Redis.from_url(redis_url)
    client.delete(QUEUE)
    client.close()


def test_basic_task_with_retry_succeeds(worker):
    from tests.seed.snippets.celery_tasks import process_data_task

    result = process_data_task.delay(12)
    assert result.get(timeout=30) == {"status": "success", "data_id": 12}
    assert doubles.saved[12] == 24


def test_basic_task_with_retry_queues_exactly_one_celery_retry(worker):
    """The seed's body catches every exception itself, so its inner ``@retry`` never sees the
    load failure: the task goes straight to ``raise self.retry(exc=exc, countdown=60)``.
    ``self.retry`` queues the retry and then raises ``celery.exceptions.Retry`` through the
    inner ``@retry``. Were that retried in process, the body would run again and queue a second
    copy of the task; taskkit passes it through, so exactly one retry is queued."""
    from tests.seed.snippets.celery_tasks import process_data_task

    published: list[dict] = []

    def record(sender=None, headers=None, **kwargs):
        published.append(headers)

    before_task_publish.connect(record)
    try:
        doubles.LOAD_FAILURES[11] = 1
        result = process_data_task.delay(11)
        deadline = time.monotonic() + 30
        while result.state != "RETRY":
            assert time.monotonic() < deadline, f"task state stayed {result.state}"
            time.sleep(0.05)
        time.sleep(0.5)  # room for a second, wrong, retry to be published
    finally:
        before_task_publish.disconnect(record)
    ours = [h for h in published if h["id"] == result.id]
    assert [h["retries"] for h in ours] == [0, 1]
    assert doubles.loads[11] == 1  # the body ran once; the retry waits for its 60 s countdown
    result.revoke()


def test_celery_still_checks_the_real_arguments_of_a_decorated_task():
    from tests.seed.snippets.celery_tasks import process_data_task

    with pytest.raises(TypeError, match="data_id"):
        process_data_task.delay()  # the bound task takes data_id; Celery saw through the wrapper
    assert process_data_task.__wrapped__.__name__ == "process_data_task"


def test_batch_processing_task_returns_the_seed_summary(worker):
    from tests.seed.snippets.celery_tasks import process_batch_task

    item_ids = list(range(100))
    summary = process_batch_task.delay(item_ids).get(timeout=30)
    assert summary == {
        "total": 100,
        "successful": 90,
        "failed": 10,
        "failed_ids": [i for i in item_ids if i % 10 == 3],
    }
    assert all(doubles.processed_items[i] == 2 for i in item_ids if i % 10 == 5)  # retried once
    assert all(doubles.processed_items[i] == 3 for i in item_ids if i % 10 == 3)  # 1 + 2 retries
