"""A NUL character in text bound for PostgreSQL (which stores none) is a 422 naming the
field, never a 500: query filters of the API and the dashboard, and JSON bodies."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.api.conftest import AUTH
from tests.api.runhelpers import add_run

GETS = [
    "/dead-letters?task=%00",
    "/dead-letters?batch=a%00",
    "/dead-letters?error_type=%00b",
    "/dead-letters?older_than=1d%00",
    "/?name=%00",
    "/?status=a%00",
    "/ui/dead-letters?task=%00",
    "/ui/dead-letters?batch=%00",
    "/ui/dead-letters?error_type=%00",
]


@pytest.mark.parametrize("url", GETS)
def test_a_nul_in_a_filter_is_a_422(client: TestClient, url: str) -> None:
    answer = client.get(url, headers=AUTH)
    assert answer.status_code == 422, answer.text
    assert "NUL character" in answer.text


@pytest.mark.parametrize(
    "body",
    [
        {"task": "a\x00"},
        {"batch_id": "\x00"},
        {"error_type": "\x00"},
        {"older_than": "1d\x00"},
        {"all": True, "into": "t\x00"},
    ],
)
def test_a_nul_in_a_replay_filter_is_a_422(client: TestClient, body: dict[str, Any]) -> None:
    answer = client.post("/dead-letters/replay", headers=AUTH, json=body)
    assert answer.status_code == 422, answer.text
    assert "NUL character" in answer.text


@pytest.mark.parametrize(
    "body",
    [{"name": "fork\x00"}, {"config": {"lr\x00": 1}}, {"config": {"data": ["ok", "b\x00"]}}],
)
def test_a_nul_in_a_fork_is_a_422(
    client: TestClient, pg_schema_url: str, body: dict[str, Any]
) -> None:
    run_id, _ = add_run(pg_schema_url, status="completed")
    answer = client.post(f"/runs/{run_id}/fork", headers=AUTH, json=body)
    assert answer.status_code == 422, answer.text
    assert "NUL character" in answer.text


def test_the_schema_tells_clients_the_rule(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    task = next(
        p for p in schema["paths"]["/dead-letters"]["get"]["parameters"] if p["name"] == "task"
    )
    assert task["schema"]["anyOf"][0]["pattern"] == "^[^\\x00]*$"
