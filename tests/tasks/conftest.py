"""Fixtures for the task tests: an in-process worker on the real Redis broker."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from celery.contrib.testing.worker import start_worker


@pytest.fixture(scope="module")
def worker(redis_url: str) -> Iterator[object]:
    """Celery's in-process test worker (solo pool) consuming this run's queue."""
    from tests.tasks import apps

    with start_worker(
        apps.app,
        pool="solo",
        concurrency=1,
        perform_ping_check=False,
        loglevel="WARNING",
        shutdown_timeout=30,
    ) as running:
        yield running
    apps.counter.delete(apps.QUEUE)
