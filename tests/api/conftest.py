"""Fixtures for the HTTP service's tests: ``create_api()`` on this run's PostgreSQL schema and a
Celery app on the real Redis broker, under a key prefix of the test's own.

``api`` is the service (token ``TOKEN``, send it with ``AUTH``), ``client`` a ``TestClient`` on
it, ``api_celery`` its Celery app: ``SCORE`` is a ``BatchTask`` whose items fail while their id
is in ``BROKEN``, ``PING`` a ``ResilientTask``; nothing consumes their queue unless a test starts
a worker (``tests._support.workers.in_process_worker(api_celery)``).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery import Celery
from fastapi.testclient import TestClient
from sqlalchemy import Engine

from taskkit.api import create_api
from taskkit.config import Settings
from taskkit.tasks import BatchTask, ResilientTask, create_app

TOKEN = "api-core-token-7d41c2e9"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SECRET_KEY = "api-core-tests-signing-key"
SCORE = "tkapi.score_items"
PING = "tkapi.ping"

#: Item ids whose scoring fails (a test "fixes the bug" by clearing it).
BROKEN: set[str] = set()
#: Item ids scored, in this process (an in-process worker appends).
SCORED: list[str] = []


class ScoreTask(BatchTask):
    """An item is ``{"id": ...}``; one with a ``"bad"`` key no longer validates."""

    def validate_item(self, item: Any) -> None:
        if not isinstance(item, dict) or "bad" in item:
            raise ValueError("has a 'bad' field")


def _score(self: ScoreTask, item: dict[str, Any]) -> None:
    if item["id"] in BROKEN:
        raise RuntimeError(f"cannot score {item['id']}")
    SCORED.append(item["id"])


def _ping(self: ResilientTask, host: str) -> str:
    return host


@pytest.fixture
def api_prefix(redis_client: redis.Redis) -> Iterator[str]:
    """A Redis key prefix of this test (queues, results); its keys go afterwards."""
    prefix = f"tkapi-{uuid.uuid4().hex[:12]}:"
    yield prefix
    keys = list(redis_client.scan_iter(match=f"{prefix}*"))
    if keys:
        redis_client.delete(*keys)


@pytest.fixture
def api_settings(pg_schema_url: str, pg_engine: Engine, redis_url: str) -> Settings:
    """The service's settings: this run's PostgreSQL schema (emptied after the test), the Redis
    broker, a token and a signing key."""
    return Settings(
        database_url=pg_schema_url,
        broker_url=redis_url,
        api_token=TOKEN,  # type: ignore[arg-type]
        secret_key=SECRET_KEY,  # type: ignore[arg-type]
    )


@pytest.fixture
def api_celery(api_settings: Settings, api_prefix: str) -> Iterator[Celery]:
    BROKEN.clear()
    SCORED.clear()
    app = create_app(
        "tkapi",
        settings=api_settings,
        task_default_queue=f"{api_prefix}q",
        broker_transport_options={"global_keyprefix": api_prefix},
        result_backend_transport_options={"global_keyprefix": api_prefix},
        result_expires=600,
    )
    options = {"item_max_attempts": 1, "item_delay": 0.0}
    app.task(base=ScoreTask, bind=True, shared=False, name=SCORE, **options)(_score)
    app.task(base=ResilientTask, bind=True, shared=False, name=PING)(_ping)
    yield app
    BROKEN.clear()
    SCORED.clear()


@pytest.fixture
def api(api_settings: Settings, api_celery: Celery) -> Any:
    return create_api(api_settings, celery_app=api_celery)


@pytest.fixture
def client(api: Any) -> Iterator[TestClient]:
    with TestClient(api) as test_client:
        yield test_client


@pytest.fixture(autouse=True)
def no_http_breakers(monkeypatch: pytest.MonkeyPatch) -> None:
    """``/health``, ``/breakers`` and the breakers page list this process's per-host HTTP
    breakers too: each API test starts with none, whatever tests ran before in this process
    (tests/http makes many, some left open)."""
    monkeypatch.setattr("taskkit.http._core._registry", {})
