"""The dashboard's pages as the service renders them, from a real database (SQLite and
PostgreSQL): runs with status words, stale markers and live rows; a run with its curve,
checkpoints, error and the buttons its status allows; dead letters with filters and
tracebacks; breakers; escaping; and the token never in a page. The browser drives them in
tests/browser."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine

from taskkit.api import create_api
from taskkit.api._breakers import register
from taskkit.api._dashboard import CurvePoint, curve_points, status_label
from taskkit.checkpoint import CheckpointStore
from taskkit.config import get_settings, reset_settings
from taskkit.db.models import ModelRun, TrainingEpoch, TrainingProgress
from taskkit.db.session import session_scope
from taskkit.deadletter import DeadLetterStore
from taskkit.recovery import CircuitBreaker
from tests._support.letters import letter_entry

TOKEN = "dashboard-test-token-0c1d2e"
TTL = 5


@pytest.fixture
def url(
    db_url: str, engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[str]:
    """The test database (SQLite, then PostgreSQL; emptied after) as the service's,
    checkpoints under ``tmp_path``."""
    database = db_url
    values = {
        "TASKKIT_HOME": str(tmp_path / "home"),
        "TASKKIT_DATABASE_URL": database,
        "TASKKIT_CHECKPOINT_DIR": str(tmp_path / "checkpoints"),
        "TASKKIT_SECRET_KEY": "dashboard-test-key-16b",
        "TASKKIT_LEASE_TTL": str(TTL),
        "TASKKIT_API_TOKEN": TOKEN,
    }
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    reset_settings()
    yield database
    reset_settings()


@pytest.fixture
def client(url: str) -> Iterator[TestClient]:
    with TestClient(create_api(get_settings())) as client:
        yield client


@pytest.fixture
def make_run(url: str) -> Callable[..., int]:
    def make(
        name: str,
        status: str,
        *,
        epoch: int | None = None,
        total: int = 10,
        metrics: dict[str, Any] | None = None,
        heartbeat_age: float | None = None,
        error: str | None = None,
    ) -> int:
        now = datetime.now(UTC)
        with session_scope(url) as session:
            run = ModelRun(
                name=name,
                model_type="sgd",
                config={"epochs": total},
                status=status,
                task_name="workers.training.train_model",
                error_message=error,
                started_at=None if status == "queued" else now,
                heartbeat_at=None
                if heartbeat_age is None
                else now - timedelta(seconds=heartbeat_age),
            )
            session.add(run)
            session.flush()
            if epoch is not None:
                session.add(
                    TrainingProgress(
                        model_run_id=run.id,
                        current_epoch=epoch,
                        total_epochs=total,
                        progress_percentage=100.0 * epoch / total,
                        metrics=metrics or {},
                    )
                )
            return run.id

    return make


class _Rows(HTMLParser):
    """The attributes of every element carrying ``attribute`` (a small reader of the page)."""

    def __init__(self, attribute: str) -> None:
        super().__init__()
        self.attribute = attribute
        self.found: list[dict[str, str | None]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if self.attribute in values:
            self.found.append({"tag": tag, **values})


def elements(html: str, attribute: str) -> list[dict[str, str | None]]:
    parser = _Rows(attribute)
    parser.feed(html)
    return parser.found


def test_runs_page_lists_runs_with_status_words_stale_marker_and_live_rows(
    client: TestClient, make_run: Callable[..., int]
) -> None:
    done = make_run("done", "completed", epoch=10, metrics={"score": 0.9})
    dead = make_run("dead", "running", epoch=3, heartbeat_age=TTL + 60)
    alive = make_run("alive", "running", epoch=4, heartbeat_age=0)
    failed = make_run("broken", "failed", error="ValueError: bad")

    page = client.get("/")

    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    rows = {int(str(row["data-run"])): row for row in elements(page.text, "data-run")}
    assert list(rows) == [failed, alive, dead, done]  # newest first
    assert "data-stream" in rows[alive]  # a live run gets its event stream
    assert "data-stream" not in rows[dead]
    assert rows[dead].get("data-stale") == "1"
    assert "data-stream" not in rows[done]
    assert "data-stream" not in rows[failed]
    # Readable without colour: a symbol and a word for each status.
    assert "⚠ running (stale)" in page.text
    assert "▶ running" in page.text
    assert "✓ completed" in page.text
    assert "✗ failed" in page.text
    bars = {
        str(bar["aria-label"]): bar["aria-valuenow"] for bar in elements(page.text, "aria-valuenow")
    }
    assert bars[f"run {alive} progress"] == "40.0"
    assert bars[f"run {done} progress"] == "100.0"
    body = elements(page.text, "data-root")[0]
    assert "data-live" in body  # the page refreshes itself while a run can change
    assert elements(page.text, "data-post")[0]["data-post"] == "/train"  # the New run form


def test_runs_page_filters_and_pages(client: TestClient, make_run: Callable[..., int]) -> None:
    for i in range(55):
        make_run(f"run-{i}", "completed" if i % 2 else "failed")

    first = client.get("/")
    failed = client.get("/", params={"status": "failed"})
    named = client.get("/", params={"name": "run-3"})

    first_ids = [int(str(r["data-run"])) for r in elements(first.text, "data-run")]
    assert len(first_ids) == 50
    older = re.search(r'href="/\?before=(\d+)"', first.text)
    assert older, "a link to the older runs"
    second = client.get("/", params={"before": older.group(1)})
    second_ids = [int(str(r["data-run"])) for r in elements(second.text, "data-run")]
    assert sorted(first_ids + second_ids, reverse=True) == first_ids + second_ids
    assert len(set(first_ids + second_ids)) == 55
    assert {r["data-status"] for r in elements(failed.text, "data-run")} == {"failed"}
    assert len(elements(named.text, "data-run")) == 1
    assert "No runs match these filters." in client.get("/", params={"name": "nobody"}).text


def test_run_page_shows_curve_checkpoints_error_and_the_buttons_its_status_allows(
    client: TestClient, make_run: Callable[..., int], url: str
) -> None:
    run_id = make_run("curve", "running", epoch=4, metrics={"loss": 0.4, "score": 0.8})
    with session_scope(url) as session:
        uid = session.get(ModelRun, run_id).uid  # type: ignore[union-attr]
    with CheckpointStore(run_id, run_uid=uid) as store:
        for step, loss in enumerate((0.9, 0.7, 0.5)):
            store.save({"w": step}, step=step, metrics={"loss": loss, "score": 0.5 + step / 10})
    stale = make_run("stale", "running", epoch=2, heartbeat_age=TTL + 60)
    failed = make_run("failed", "failed", error="Traceback...\nValueError: <b>bad</b>")

    page = client.get(f"/ui/runs/{run_id}")

    assert page.status_code == 200
    data = re.search(r'<script type="application/json" id="curve-data">(.*?)</script>', page.text)
    assert data
    points = json.loads(data.group(1))
    # No history (a run trained before training_epochs): the three kept checkpoints (steps 0-2
    # are epochs 1-3: default retention keeps the last 3) and the latest progress, epoch 4.
    assert [p["epoch"] for p in points] == [1, 2, 3, 4]
    assert [p["loss"] for p in points] == [0.9, 0.7, 0.5, 0.4]
    assert page.text.count('data-label="Step"') == 3
    posts = [str(e["data-post"]) for e in elements(page.text, "data-post")]
    assert posts == [f"/runs/{run_id}/stop"]  # alive: Stop, no Resume

    stale_page = client.get(f"/ui/runs/{stale}")
    assert [str(e["data-post"]) for e in elements(stale_page.text, "data-post")] == [
        f"/runs/{stale}/resume"
    ]
    assert "⚠ running (stale)" in stale_page.text
    assert "No heartbeat for longer than the lease ttl (5 s)" in stale_page.text

    failed_page = client.get(f"/ui/runs/{failed}")
    assert [str(e["data-post"]) for e in elements(failed_page.text, "data-post")] == [
        f"/runs/{failed}/resume"
    ]
    assert "ValueError: &lt;b&gt;bad&lt;/b&gt;" in failed_page.text  # escaped, not markup
    assert "<b>bad</b>" not in failed_page.text

    missing = client.get("/ui/runs/999999")
    assert missing.status_code == 404
    assert "run 999999 not found" in missing.text


def test_pages_escape_what_they_show_and_never_hold_the_token(
    client: TestClient, make_run: Callable[..., int], url: str
) -> None:
    evil = '<script>alert("x")</script>'
    run_id = make_run(evil, "failed", error=evil)
    DeadLetterStore(url, queue="").record(
        [letter_entry(evil, batch=evil, key=evil, error=ValueError(evil))]
    )

    pages = [client.get(path) for path in ("/", f"/ui/runs/{run_id}", "/ui/dead-letters")]

    for page in pages:
        assert page.status_code == 200, page.text
        assert evil not in page.text
        assert "&lt;script&gt;alert(" in page.text
        assert TOKEN not in page.text
        assert page.headers["cache-control"] == "no-store"
    script = client.get("/ui/static/dashboard.js").text
    assert TOKEN not in script
    assert "sessionStorage" in script  # where the operator's token is kept, in the tab


def test_dead_letters_page_filters_and_offers_replay_and_discard(
    client: TestClient, url: str
) -> None:
    store = DeadLetterStore(url, queue="")
    store.record(
        [
            letter_entry("jobs.score", batch="b1", key="a"),
            letter_entry("jobs.score", batch="b2", key="b", error=ValueError("bad row")),
            letter_entry(
                "jobs.other", batch=None, key=None, at=datetime.now(UTC) - timedelta(days=3)
            ),
        ]
    )
    ids = [letter.id for letter in store.list()]
    store.discard([ids[0]])  # the oldest (jobs.other) is no longer waiting

    waiting = client.get("/ui/dead-letters")
    by_batch = client.get("/ui/dead-letters", params={"batch": "b2"})
    recent = client.get("/ui/dead-letters", params={"status": "any", "since": "day"})
    everything = client.get("/ui/dead-letters", params={"status": "any"})

    assert [int(str(r["data-letter"])) for r in elements(waiting.text, "data-letter")] == ids[1:]
    assert "KeyError: &#39;price&#39;" in waiting.text
    assert "Traceback (most recent call last):" in waiting.text
    posts = [str(e["data-post"]) for e in elements(by_batch.text, "data-post")]
    assert posts == [
        "/dead-letters/replay",
        f"/dead-letters/{ids[2]}/replay",
        f"/dead-letters/{ids[2]}/discard",
    ]
    batch_button = elements(by_batch.text, "data-body")[0]
    assert json.loads(str(batch_button["data-body"])) == {"batch_id": "b2"}
    assert len(elements(recent.text, "data-letter")) == 2  # the 3-day-old one is left out
    assert "⊘ discarded" in everything.text
    assert client.get("/ui/dead-letters", params={"status": "bogus"}).status_code == 422
    # "failed in the last day" has no replay filter: the batch button names the letters shown.
    recent_dead = client.get("/ui/dead-letters", params={"since": "day"})
    button = elements(recent_dead.text, "data-body")[0]
    assert json.loads(str(button["data-body"])) == {"ids": ids[1:]}


def test_breakers_page_shows_state_failures_and_a_reset_button(client: TestClient) -> None:
    flaky = CircuitBreaker(name="predictor", failure_threshold=2, recovery_timeout=30)
    calm = CircuitBreaker(name="http:db.internal", failure_threshold=5, recovery_timeout=10)
    register(client.app, flaky)
    register(client.app, calm)
    for _ in range(2):
        with pytest.raises(ZeroDivisionError):
            flaky.call(lambda: 1 / 0)
    with pytest.raises(ValueError):
        calm.call(lambda: int("x"))

    page = client.get("/ui/breakers")

    rows = [str(r["data-breaker"]) for r in elements(page.text, "data-breaker")]
    assert rows == ["http:db.internal", "predictor"]
    assert "✗ open" in page.text
    assert "✓ closed" in page.text
    posts = [str(e["data-post"]) for e in elements(page.text, "data-post")]
    assert posts == ["/breakers/http%3Adb.internal/reset", "/breakers/predictor/reset"]


def test_a_finished_runs_curve_has_one_point_per_epoch_not_per_kept_checkpoint(
    client: TestClient, make_run: Callable[..., int], url: str
) -> None:
    epochs = 12
    run_id = make_run("whole", "completed", epoch=epochs, total=epochs, metrics={"loss": 0.01})
    with session_scope(url) as session:
        uid = session.get(ModelRun, run_id).uid  # type: ignore[union-attr]
        session.add_all(
            TrainingEpoch(model_run_id=run_id, epoch=e, metrics={"loss": 1 / e, "score": e / 20})
            for e in range(1, epochs + 1)
        )
    with CheckpointStore(run_id, run_uid=uid) as store:  # the default retention's last 3
        for step in (9, 10, 11):
            store.save({"w": step}, step=step, metrics={"loss": 99.0})

    page = client.get(f"/ui/runs/{run_id}")

    assert page.status_code == 200
    data = re.search(r'<script type="application/json" id="curve-data">(.*?)</script>', page.text)
    assert data
    points = json.loads(data.group(1))
    assert [p["epoch"] for p in points] == list(range(1, epochs + 1))
    assert [p["loss"] for p in points] == [1 / e for e in range(1, epochs + 1)]
    assert page.text.count('data-label="Step"') == 3  # the checkpoints are still listed


def test_status_label_is_a_symbol_and_a_word() -> None:
    assert status_label("completed") == "✓ completed"
    assert status_label("running", stale=True) == "⚠ running (stale)"
    assert status_label("something-new") == "• something-new"


def test_curve_points_merge_the_history_and_latest_progress_by_epoch() -> None:
    points = curve_points(
        [(2, {"loss": 0.7}), (1, {"loss": 0.9, "note": "text", "best_score": 0.1})],
        latest=(3, {"loss": 0.6, "score": float("nan"), "flag": True}),
    )
    assert points == [
        CurvePoint(1, {"loss": 0.9}),
        CurvePoint(2, {"loss": 0.7}),
        CurvePoint(3, {"loss": 0.6}),
    ]
    # The history row of an epoch wins over the progress row of the same epoch.
    assert curve_points([(3, {"loss": 0.5})], latest=(3, {"loss": 0.6})) == [
        CurvePoint(3, {"loss": 0.5})
    ]
    assert curve_points([], latest=(0, {"loss": 1.0})) == []


def test_static_files_are_served_and_nothing_else(client: TestClient) -> None:
    assert client.get("/ui/static/dashboard.css").headers["content-type"].startswith("text/css")
    assert client.get("/ui/static/dashboard.js").status_code == 200
    assert client.get("/ui/static/..%2f_dashboard.py").status_code == 404
    assert client.get("/ui/static/missing.js").status_code == 404


def test_pages_are_not_in_the_openapi_schema(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert not [path for path in paths if path == "/" or path.startswith("/ui")]


def test_a_metric_named_epoch_does_not_move_its_point() -> None:
    points = curve_points(
        [(1, {"loss": 0.9, "epoch": 7}), (2, {"epoch": 8})], latest=(3, {"epoch": 0})
    )
    assert points == [CurvePoint(1, {"loss": 0.9})]


def test_a_breaker_name_with_a_slash_is_one_path_segment_of_its_reset_url(
    client: TestClient,
) -> None:
    register(client.app, CircuitBreaker(name="http:api.example/v2 x", failure_threshold=2))

    page = client.get("/ui/breakers")

    posts = [str(e["data-post"]) for e in elements(page.text, "data-post")]
    assert posts == ["/breakers/http%3Aapi.example%2Fv2%20x/reset"]
