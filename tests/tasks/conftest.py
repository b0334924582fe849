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


@pytest.fixture(scope="session", autouse=True)
def _delete_this_runs_keys() -> Iterator[None]:
    """This run's queue, counters and leases go when the session ends (results expire)."""
    yield
    from tests.tasks import apps

    keys = [
        *apps.counter.scan_iter(f"{apps.PREFIX}*"),
        *apps.counter.scan_iter("taskkit:*:tests.tasks.apps.*"),
    ]
    if keys:
        apps.counter.delete(*keys)
