"""Fixtures for the batch worker tests: PostgreSQL and a short visibility timeout for this
process and its worker subprocesses, the side-effect table, and this run's Redis keys deleted
when the session ends."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Engine

from taskkit.config import reset_settings

#: Seconds before Redis hands a dead worker's unacknowledged chunk to another worker.
VISIBILITY = 5


@pytest.fixture
def env(
    redis_url: str,
    pg_schema_url: str,
    pg_engine: Engine,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[dict[str, str]]:
    """PostgreSQL (this run's schema, with ``batch_effects``; taskkit's tables are emptied
    after the test) and a 5 s visibility timeout, for this process and its workers."""
    from tests.batch import apps

    values = {
        "TASKKIT_DATABASE_URL": pg_schema_url,
        "TASKKIT_TEST_VISIBILITY": str(VISIBILITY),
        "TASKKIT_TEST_LEASE_TTL": "3",
        "TASKKIT_SECRET_KEY": "batch-worker-tests",
    }
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    reset_settings()
    apps.app.conf.taskkit_database_url = pg_schema_url
    with pg_engine.begin() as connection:
        connection.exec_driver_sql(apps.EFFECTS_DDL)
    yield values
    with pg_engine.begin() as connection:
        connection.exec_driver_sql("TRUNCATE batch_effects")
    reset_settings()


@pytest.fixture(scope="session", autouse=True)
def _delete_this_runs_keys() -> Iterator[None]:
    """Queue, counters, leases and redelivery counts of this test run, and the results of its
    tasks (the rest would only expire). Only this run's: another session running these tests
    at the same time keeps its leases (``taskkit:lease:<task>:<batch>:<offset>``)."""
    yield
    apps = sys.modules.get("tests.batch.apps")
    if apps is None:
        return
    client = apps.counter
    task_ids = [raw.decode() for raw in client.smembers(apps.key("task_ids"))]
    batches = {raw.decode() for raw in client.smembers(apps.key("batches"))}
    leases = [  # taskkit:lease:<task>:<batch>:<offset>, and the same with fence
        name
        for name in client.scan_iter(f"taskkit:*:{apps.APP_NAME}.*")
        if (name.decode().split(":") + [""] * 4)[3] in batches
    ]
    keys = [
        *client.scan_iter(f"{apps.PREFIX}*"),
        *leases,
        *(f"taskkit:redeliveries:{task_id}" for task_id in task_ids),
        *(f"celery-task-meta-{task_id}" for task_id in task_ids),
    ]
    for start in range(0, len(keys), 1000):
        client.delete(*keys[start : start + 1000])


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[Any]:
    """Keep each phase's report on the test (``rep_call``), so fixtures can tell a failure."""
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report
