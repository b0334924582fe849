"""``/dead-letters`` over HTTP: list (the CLI's filters, cursor pages), show, replay one / by
batch or filter into a real Redis broker and worker, discard; and the errors: 404, 409, 422,
503, each with its message and nothing changed."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from celery import Celery
from fastapi.testclient import TestClient

from taskkit.api import create_api
from taskkit.config import Settings
from taskkit.deadletter import DeadLetterStore
from taskkit.tasks import create_app
from tests._support.letters import letter_entry
from tests._support.workers import in_process_worker, wait_for
from tests.api.conftest import AUTH, BROKEN, PING, SCORE, SCORED

NOW = datetime.now(UTC)


@pytest.fixture
def store(api_settings: Settings, api_celery: Celery) -> DeadLetterStore:
    return DeadLetterStore(api_settings.database_url, queue="", app=api_celery)


def record(store: DeadLetterStore, *entries: Any) -> list[int]:
    """Record each entry in turn; their ids in that order."""
    for entry in entries:
        store.record([entry])
    return [letter.id for letter in store.list(status=None, newest_first=True)][::-1]


def snapshot(store: DeadLetterStore) -> list[tuple[Any, ...]]:
    return [(x.id, x.status, x.replays, x.replay_task_id) for x in store.list(status=None)]


def test_list_filters_as_the_cli_and_pages_newest_first(client: TestClient, store):
    ids = record(
        store,
        letter_entry(SCORE, batch="b1", key="a", at=NOW - timedelta(hours=3)),
        letter_entry(SCORE, batch="b1", key="b", error=TimeoutError("slow")),
        letter_entry(SCORE, batch="b2", key="c"),
        letter_entry(PING, {"args": ["h"], "kwargs": {}}, batch=None, key=None, task_id="t1"),
    )

    everything = client.get("/dead-letters").json()
    assert [x["id"] for x in everything["letters"]] == ids[::-1]
    assert everything["next_cursor"] is None
    assert everything["letters"][0]["payload"] is None  # payloads only in the letter's own page

    def listed(**params: Any) -> list[int]:
        response = client.get("/dead-letters", params=params)
        assert response.status_code == 200, response.text
        return [x["id"] for x in response.json()["letters"]]

    assert listed(task=SCORE) == ids[2::-1]
    assert listed(batch="b1") == ids[1::-1]
    assert listed(error_type="TimeoutError") == [ids[1]]
    assert listed(older_than="2h") == [ids[0]]
    assert listed(newer_than="1h") == ids[:0:-1]

    first = client.get("/dead-letters", params={"limit": 3}).json()
    assert [x["id"] for x in first["letters"]] == ids[:0:-1]
    assert first["next_cursor"] == ids[1]
    second = client.get("/dead-letters", params={"limit": 3, "before": first["next_cursor"]})
    assert [x["id"] for x in second.json()["letters"]] == [ids[0]]
    assert second.json()["next_cursor"] is None

    store.discard([ids[3]])
    assert listed() == ids[2::-1]
    assert listed(status="discarded") == [ids[3]]
    assert listed(status="any") == ids[::-1]


def test_bad_filters_are_422_with_a_message(client: TestClient):
    response = client.get("/dead-letters", params={"older_than": "yesterday"})
    assert response.status_code == 422
    assert response.json()["detail"] == (
        "older_than 'yesterday' is not an age: give a number and a unit, s, m, h, d or w "
        "(30s, 15m, 2h, 7d)"
    )
    assert client.get("/dead-letters", params={"status": "lost"}).status_code == 422
    assert client.get("/dead-letters", params={"limit": 0}).status_code == 422
    too_long = client.get("/dead-letters", params={"newer_than": "99999999w"})
    assert too_long.json()["detail"] == "newer_than '99999999w' is too long ago: at most 1000 years"


def test_show_gives_payload_and_traceback_or_404(client: TestClient, store):
    [letter_id] = record(store, letter_entry(SCORE, {"id": "a", "price": None}))

    shown = client.get(f"/dead-letters/{letter_id}").json()
    assert shown["payload"] == {"id": "a", "price": None}
    assert shown["traceback"].endswith("KeyError: 'price'\n")
    assert (shown["task_name"], shown["batch_id"], shown["item_key"]) == (SCORE, "b1", "a")
    assert shown["status"] == "dead"

    missing = client.get(f"/dead-letters/{letter_id + 1000}")
    assert missing.status_code == 404
    assert missing.json() == {"detail": f"no dead letter with id {letter_id + 1000}"}
    assert client.get("/dead-letters/abc").status_code == 422
    assert client.get("/dead-letters/0").status_code == 422


def test_replay_one_letter_is_run_by_a_worker(client: TestClient, store, api_celery: Celery):
    [letter_id] = record(store, letter_entry(SCORE, {"id": "a"}, key="a"))

    with in_process_worker(api_celery):
        response = client.post(f"/dead-letters/{letter_id}/replay", headers=AUTH)
        assert response.status_code == 200, response.text
        wait_for(lambda: SCORED == ["a"], 30, "the worker to score the replayed item")

    body = response.json()
    assert body["letter_ids"] == [letter_id]
    [sent] = body["sent"]
    assert sent["task_name"] == SCORE
    assert sent["batch_id"].startswith("replay-")
    letter = store.get(letter_id)
    assert (letter.status, letter.replays, letter.replay_task_id) == (
        "replayed",
        1,
        sent["task_id"],
    )


def test_replay_by_batch_sends_only_that_batch(client: TestClient, store):
    ids = record(
        store,
        letter_entry(SCORE, batch="b1", key="a"),
        letter_entry(SCORE, batch="b1", key="b"),
        letter_entry(SCORE, batch="b2", key="c"),
    )

    response = client.post("/dead-letters/replay", json={"batch_id": "b1"}, headers=AUTH)

    assert response.status_code == 200, response.text
    assert sorted(response.json()["letter_ids"]) == ids[:2]
    assert [x.status for x in store.list(status=None)] == ["replayed", "replayed", "dead"]


def test_replay_without_a_selection_is_422_and_sends_nothing(client: TestClient, store):
    record(store, letter_entry(SCORE))
    before = snapshot(store)
    for body, message in [
        ({}, "replay what? give ids, task, batch_id, error_type, older_than, or all: true"),
        ({"ids": [1], "task": SCORE}, "give letter ids or filters (or all), not both"),
        ({"all": True, "task": SCORE}, "all replays every dead letter: give all or filters"),
    ]:
        response = client.post("/dead-letters/replay", json=body, headers=AUTH)
        assert response.status_code == 422
        assert response.json()["detail"].startswith(message)
    unknown = client.post("/dead-letters/replay", json={"colour": "red"}, headers=AUTH)
    assert unknown.status_code == 422
    assert snapshot(store) == before


def test_replay_refusals_say_why_and_change_nothing(client: TestClient, store):
    [bad, gone, done] = record(
        store,
        letter_entry(SCORE, {"id": "x", "bad": 1}, key="x"),
        letter_entry("tkapi.gone", key="g"),
        letter_entry(SCORE, key="d"),
    )
    store.discard([done])
    before = snapshot(store)

    invalid = client.post(f"/dead-letters/{bad}/replay", headers=AUTH)
    assert invalid.status_code == 422
    assert invalid.json()["detail"].startswith("replay refused, nothing was sent: ")
    assert "no longer validates" in invalid.json()["detail"]

    unregistered = client.post(f"/dead-letters/{gone}/replay", headers=AUTH)
    assert unregistered.status_code == 422
    assert "'tkapi.gone' is not registered" in unregistered.json()["detail"]

    not_waiting = client.post(f"/dead-letters/{done}/replay", headers=AUTH)
    assert not_waiting.status_code == 409
    assert not_waiting.json()["detail"] == (
        f"replay refused, nothing was sent: only letters with status 'dead' are replayed "
        f"(dead letter {done})"
    )

    unknown = client.post(f"/dead-letters/{done + 1000}/replay", headers=AUTH)
    assert unknown.status_code == 404
    assert unknown.json() == {"detail": f"no dead letter with id {done + 1000}"}

    into = client.post(f"/dead-letters/{bad}/replay", json={"into": PING}, headers=AUTH)
    assert into.status_code == 422
    assert snapshot(store) == before


def test_discard_keeps_the_letter_or_404(client: TestClient, store):
    [letter_id] = record(store, letter_entry(SCORE))

    response = client.post(f"/dead-letters/{letter_id}/discard", headers=AUTH)

    assert response.status_code == 200
    assert response.json()["status"] == "discarded"
    assert store.get(letter_id).status == "discarded"
    missing = client.post(f"/dead-letters/{letter_id + 1000}/discard", headers=AUTH)
    assert missing.status_code == 404
    assert missing.json() == {"detail": f"no dead letter with id {letter_id + 1000}"}


def test_replay_with_the_broker_down_is_503_and_the_letter_waits(
    api_settings: Settings, store: DeadLetterStore
):
    BROKEN.clear()
    [letter_id] = record(store, letter_entry(SCORE))
    down = create_app("tkapi-down", settings=Settings(broker_url="redis://:secret@127.0.0.1:1/0"))
    down.task(name=SCORE, shared=False)(lambda item: None)

    with TestClient(create_api(api_settings, celery_app=down)) as client:
        response = client.post(f"/dead-letters/{letter_id}/replay", headers=AUTH)

    assert response.status_code == 503
    assert response.headers["retry-after"] == "5"
    detail = response.json()["detail"]
    assert "127.0.0.1:1" in detail
    assert "secret" not in detail
    assert store.get(letter_id).status == "dead"
