"""Fixtures for the batch worker tests: PostgreSQL and a short visibility timeout for this
process and its worker subprocesses, and the side-effect table (this session's Redis keys are
deleted by tests/conftest.py when it ends)."""

from __future__ import annotations

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


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[Any]:
    """Keep each phase's report on the test (``rep_call``), so fixtures can tell a failure."""
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report
