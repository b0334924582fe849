"""``/health`` (the seed's answer), ``/health/live``, ``/health/ready`` (database at head, broker,
lease store: 200 or 503 naming what failed), ``/breakers`` and their reset, on real PostgreSQL
and Redis."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery import Celery
from fastapi.testclient import TestClient

from taskkit.api import create_api
from taskkit.api._breakers import register
from taskkit.config import Settings
from taskkit.recovery import CircuitBreaker, CircuitState, RedisCircuitStorage
from taskkit.tasks import create_app
from tests.api.conftest import AUTH
from tests.conftest import pg_schema

DEAD = "redis://:hunter2@127.0.0.1:1/0"


def test_live_answers_while_the_process_is_up(client: TestClient):
    response = client.get("/health/live")
    assert (response.status_code, response.json()) == (200, {"status": "alive"})


def test_ready_when_database_broker_and_lease_store_answer(client: TestClient):
    response = client.get("/health/ready")

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "ready"
    assert {name: check["ok"] for name, check in body["checks"].items()} == {
        "database": True,
        "broker": True,
        "lease_store": True,
    }
    assert "(head)" in body["checks"]["database"]["detail"]


def test_not_ready_when_the_broker_and_lease_store_are_down(api_settings: Settings):
    settings = api_settings.model_copy(update={"lease_url": DEAD})
    down = create_app("tkapi-down", settings=Settings(broker_url=DEAD))
    with TestClient(create_api(settings, celery_app=down)) as client:
        response = client.get("/health/ready")

    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "not ready"
    checks = body["checks"]
    assert checks["database"]["ok"] is True
    assert checks["broker"]["ok"] is False
    assert "127.0.0.1:1" in checks["broker"]["detail"]
    assert checks["lease_store"]["ok"] is False
    assert "hunter2" not in response.text


def test_not_ready_when_the_database_is_not_migrated(
    postgres_url: str, api_settings: Settings, api_celery: Celery
):
    with pg_schema(postgres_url, "taskkit_unmigrated") as url:
        settings = api_settings.model_copy(update={"database_url": url})
        with TestClient(create_api(settings, celery_app=api_celery)) as client:
            response = client.get("/health/ready")

    assert response.status_code == 503
    database = response.json()["checks"]["database"]
    assert database["ok"] is False
    assert database["detail"].endswith("run `taskkit db upgrade`")
    assert response.json()["checks"]["broker"]["ok"] is True


def test_health_has_the_seed_shape_and_every_breaker(api: Any, client: TestClient):
    breaker = CircuitBreaker(failure_threshold=1, recovery_timeout=60, name="model_service")
    register(api, breaker)
    register(api, CircuitBreaker(name="data_service"))

    healthy = client.get("/health").json()
    assert healthy["status"] == "healthy"
    assert (healthy["circuits"]["model_service"], healthy["circuits"]["data_service"]) == (
        "CLOSED",
        "CLOSED",
    )

    with pytest.raises(ZeroDivisionError):
        breaker.call(lambda: 1 / 0)
    degraded = client.get("/health").json()
    assert degraded["status"] == "degraded"
    assert degraded["circuits"]["model_service"] == "OPEN"


@pytest.fixture
def shared(redis_client: redis.Redis, unique: str) -> Iterator[CircuitBreaker]:
    """A breaker another process shares in the service's Redis (the default key prefix)."""
    storage = RedisCircuitStorage(redis_client)
    breaker = CircuitBreaker(failure_threshold=2, recovery_timeout=60, name=unique, storage=storage)
    yield breaker
    redis_client.delete(*storage.keys(unique))


def test_breakers_lists_registered_and_shared_ones_and_resets_them(
    api: Any, client: TestClient, shared: CircuitBreaker
):
    local = CircuitBreaker(failure_threshold=3, recovery_timeout=30, name="local-one")
    register(api, local)
    for _ in range(2):
        with pytest.raises(ZeroDivisionError):
            shared.call(lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        local.call(lambda: 1 / 0)

    listed = {b["name"]: b for b in client.get("/breakers").json()["breakers"]}
    assert listed["local-one"] == {
        "name": "local-one",
        "state": "closed",
        "failure_count": 1,
        "failure_threshold": 3,
        "recovery_timeout": 30.0,
        "retry_after": 0.0,
        "shared": False,
    }
    theirs = listed[shared.name]
    assert (theirs["state"], theirs["shared"], theirs["failure_threshold"]) == ("open", True, None)
    assert 0 < theirs["retry_after"] <= 60
    assert client.get("/health").json()["circuits"][shared.name] == "OPEN"

    reset = client.post(f"/breakers/{shared.name}/reset", headers=AUTH)

    assert reset.status_code == 200, reset.text
    assert reset.json()["state"] == "closed"
    assert shared.state is CircuitState.CLOSED  # the other process sees it closed
    missing = client.post("/breakers/nope/reset", headers=AUTH)
    assert missing.status_code == 404
    assert missing.json()["detail"].startswith("no circuit breaker named 'nope' (known: ")
