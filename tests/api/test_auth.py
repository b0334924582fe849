"""Every mutating endpoint of the service, enumerated from the app's routes (so endpoints added
later are covered too), refuses a request without the bearer token or with a wrong one: 401 with
a message, and nothing changed (database rows, breakers, the broker's keys)."""

from __future__ import annotations

import re
from typing import Any

import pytest
import redis
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from sqlalchemy import Engine, text

from taskkit.api import create_api
from taskkit.api._auth import require_token
from taskkit.api._breakers import known_breakers, register
from taskkit.config import Settings
from taskkit.db.models import ModelRun
from taskkit.db.session import session_scope
from taskkit.deadletter import DeadLetterStore
from taskkit.recovery import CircuitBreaker
from tests._support.letters import letter_entry
from tests.api.conftest import SCORE, TOKEN
from tests.conftest import TABLES

#: POST endpoints that change nothing a client owns: open to everyone, as in the seed.
OPEN_POSTS = {"/predict"}
MUTATING = {"POST", "PUT", "PATCH", "DELETE"}
WRONG = [
    {},
    {"Authorization": "Bearer"},
    {"Authorization": "Bearer wrong-token"},
    {"Authorization": f"Bearer {TOKEN}x"},
    {"Authorization": f"Basic {TOKEN}"},
    {"Authorization": TOKEN},
    {"X-Token": TOKEN},
]


def api_routes(routes: list[Any], prefix: str = "", deps: tuple[Any, ...] = ()) -> Any:
    """``(path, route, dependencies)`` of every endpoint, through included routers (FastAPI
    keeps those as a route of their own)."""
    for route in routes:
        if isinstance(route, APIRoute):
            own = tuple(d.call for d in route.dependant.dependencies)
            yield prefix + route.path, route, deps + own
        elif hasattr(route, "original_router"):
            context = route.include_context
            inherited = deps + tuple(d.dependency for d in context.dependencies)
            yield from api_routes(route.original_router.routes, prefix + context.prefix, inherited)


def mutating_routes(api: Any) -> list[tuple[str, str]]:
    found = []
    for path, route, _ in api_routes(api.routes):
        if path not in OPEN_POSTS:
            found += [(method, path) for method in sorted(route.methods & MUTATING)]
    return found


def test_the_enumeration_sees_every_mutating_endpoint_of_this_part():
    paths = {path for _, path in mutating_routes(create_api(Settings()))}
    assert paths >= {
        "/breakers/{name:path}/reset",
        "/dead-letters/replay",
        "/dead-letters/{letter_id}/replay",
        "/dead-letters/{letter_id}/discard",
    }


def test_every_mutating_route_depends_on_require_token():
    for path, route, dependencies in api_routes(create_api(Settings()).routes):
        if route.methods & MUTATING and path not in OPEN_POSTS:
            assert require_token in dependencies, path


def snapshot(engine: Engine, redis_client: redis.Redis, prefix: str, api: Any) -> Any:
    with engine.connect() as connection:
        rows = {
            table: [
                tuple(map(str, row)) for row in connection.execute(text(f"SELECT * FROM {table}"))
            ]
            for table in TABLES
        }
    keys = sorted(redis_client.scan_iter(match=f"{prefix}*"))
    breakers = {name: (b.state, b.failure_count) for name, b in known_breakers(api).items()}
    return rows, keys, breakers


def test_mutating_endpoints_without_or_with_a_wrong_token_are_401_and_change_nothing(
    api: Any, client: TestClient, pg_engine: Engine, redis_client: redis.Redis, api_prefix: str
):
    settings = api.state.settings
    with session_scope(settings.database_url) as db:
        run = ModelRun(name="r", model_type="sgd", config={}, status="failed", task_name=SCORE)
        db.add(run)
        db.flush()
        run_id = run.id
    store = DeadLetterStore(settings.database_url, queue="")
    store.record([letter_entry(SCORE)])
    [letter] = store.list()
    breaker = CircuitBreaker(failure_threshold=1, name="guarded")
    register(api, breaker)
    with pytest.raises(ZeroDivisionError):
        breaker.call(lambda: 1 / 0)

    def concrete(path: str) -> str:
        value = (
            "guarded"
            if path.startswith("/breakers/")
            else str(letter.id)
            if path.startswith("/dead-letters/")
            else str(run_id)
        )
        return re.sub(r"\{[^}]+\}", value, path)

    routes = mutating_routes(api)
    before = snapshot(pg_engine, redis_client, api_prefix, api)
    for method, path in routes:
        for headers in WRONG:
            response = client.request(method, concrete(path), json={}, headers=headers)
            assert response.status_code == 401, (method, path, headers, response.text)
            assert response.json()["detail"] == "missing or wrong bearer token"
            assert response.headers["www-authenticate"] == "Bearer"
    assert snapshot(pg_engine, redis_client, api_prefix, api) == before

    # the same requests with the token do get through (so the 401s above were the token's)
    reset = client.post("/breakers/guarded/reset", headers={"Authorization": f"Bearer {TOKEN}"})
    assert reset.status_code == 200


def test_without_a_configured_token_every_change_is_refused(api_settings: Settings):
    settings = api_settings.model_copy(update={"api_token": None})
    with TestClient(create_api(settings)) as client:
        response = client.post(
            "/dead-letters/replay", json={"all": True}, headers={"Authorization": "Bearer "}
        )
    assert response.status_code == 401
    assert response.json()["detail"] == (
        "this service has no TASKKIT_API_TOKEN: set one to allow changes"
    )


# -- the other guards: body size, CORS, internal errors -------------------------------------------


def test_a_body_over_the_limit_is_413_declared_or_chunked(api_settings: Settings):
    settings = api_settings.model_copy(update={"api_max_body_bytes": 2048})
    auth = {"Authorization": f"Bearer {TOKEN}"}
    big = b'{"ids": [' + b"1," * 2000 + b"1]}"
    message = "request body too large: at most 2048 bytes (TASKKIT_API_MAX_BODY_BYTES)"
    with TestClient(create_api(settings)) as client:
        declared = client.post(
            "/dead-letters/replay",
            content=big,
            headers={**auth, "Content-Type": "application/json"},
        )
        assert (declared.status_code, declared.json()) == (413, {"detail": message})

        def chunks() -> Any:
            for start in range(0, len(big), 500):
                yield big[start : start + 500]

        chunked = client.post(
            "/dead-letters/replay",
            content=chunks(),
            headers={**auth, "Content-Type": "application/json"},
        )
        assert (chunked.status_code, chunked.json()) == (413, {"detail": message})

        small = client.post("/dead-letters/replay", json={}, headers=auth)
        assert small.status_code == 422  # read, and refused for what it says


def test_cors_is_off_unless_origins_are_set(api_settings: Settings):
    preflight = {
        "Origin": "https://ops.example.com",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "Authorization",
    }
    with TestClient(create_api(api_settings)) as client:
        off = client.get("/health/live", headers={"Origin": "https://ops.example.com"})
        assert "access-control-allow-origin" not in off.headers
        assert (
            "access-control-allow-origin"
            not in client.options("/breakers", headers=preflight).headers
        )

    settings = api_settings.model_copy(update={"api_cors_origins": "https://ops.example.com"})
    with TestClient(create_api(settings)) as client:
        allowed = client.options("/dead-letters/replay", headers=preflight)
        assert allowed.status_code == 200
        assert allowed.headers["access-control-allow-origin"] == "https://ops.example.com"
        assert "Authorization" in allowed.headers["access-control-allow-headers"]
        other = client.get("/health/live", headers={"Origin": "https://evil.example.com"})
        assert "access-control-allow-origin" not in other.headers


def test_an_unexpected_error_is_a_500_that_leaks_nothing_and_is_logged(
    api_settings: Settings, caplog: pytest.LogCaptureFixture
):
    api = create_api(api_settings)

    @api.get("/boom")
    def boom() -> None:
        raise RuntimeError("password=hunter2 in /srv/secret/path")

    with TestClient(api, raise_server_exceptions=False) as client:
        response = client.get("/boom")

    assert response.status_code == 500
    body = response.json()
    assert body["detail"] == "internal error, see the service log"
    assert response.headers["x-request-id"] == body["request_id"]
    assert "hunter2" not in response.text
    [record] = [r for r in caplog.records if r.name == "taskkit.api"]
    assert body["request_id"] in record.getMessage()
    assert "GET /boom" in record.getMessage()
