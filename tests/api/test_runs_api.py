"""GET /runs (filters, cursor paging), GET /runs/{id} (progress, stale, checkpoints, error),
GET /models/{id} (the seed's), GET /runs/{id}/events (Server-Sent Events until the run ends), on
the embedded SQLite database and on PostgreSQL. Runs are written directly; a thread plays the
trainer where a test needs one (tests/api/test_train_api.py has the real worker)."""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine

from taskkit.api import create_api
from taskkit.api._runs import decode_cursor, encode_cursor
from taskkit.checkpoint import CheckpointStore
from taskkit.config import Settings
from taskkit.db.models import TrainingEpoch
from taskkit.db.session import get_engine, session_scope
from tests.api import trainapp
from tests.api.runhelpers import TOKEN, add_run, serving, set_progress, sse_events
from tests.conftest import empty_tables


@pytest.fixture
def settings(db_url: str, engine: Engine, tmp_path: Path) -> Settings:
    return Settings(
        database_url=db_url,
        api_token=TOKEN,
        checkpoint_dir=tmp_path / "checkpoints",
        secret_key="runs-api-tests-signing-key",
        lease_ttl=15.0,
    )


@pytest.fixture
def api(settings: Settings) -> Any:
    api = create_api(settings, celery_app=trainapp.app)
    api.state.events_interval = 0.02
    return api


@pytest.fixture
def client(api: Any) -> Iterator[TestClient]:
    with TestClient(api) as client:
        yield client


# -- GET /runs ---------------------------------------------------------------------------------


def test_runs_are_listed_newest_first_a_page_at_a_time(client: TestClient, db_url: str) -> None:
    ids = [add_run(db_url, name=f"r{i}")[0] for i in range(7)]

    seen, cursor, pages = [], None, 0
    while True:
        params: dict[str, Any] = {"limit": 3, **({"cursor": cursor} if cursor else {})}
        answer = client.get("/runs", params=params)
        assert answer.status_code == 200, answer.text
        body = answer.json()
        seen += [run["id"] for run in body["runs"]]
        pages += 1
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert seen == sorted(ids, reverse=True)
    assert pages == 3

    # A run that arrives between two pages is neither skipped on the next page nor repeated.
    first = client.get("/runs", params={"limit": 3}).json()
    add_run(db_url, name="late")
    second = client.get("/runs", params={"limit": 3, "cursor": first["next_cursor"]}).json()
    assert [r["id"] for r in second["runs"]] == sorted(ids, reverse=True)[3:6]


def test_runs_filter_by_status_and_name(client: TestClient, db_url: str) -> None:
    failed_a = add_run(db_url, name="a", status="failed", error_message="boom")[0]
    add_run(db_url, name="a", status="completed")
    failed_b = add_run(db_url, name="b", status="failed")[0]

    by_status = client.get("/runs", params={"status": "failed"}).json()["runs"]
    by_both = client.get("/runs", params={"status": "failed", "name": "a"}).json()["runs"]
    by_name = client.get("/runs", params={"name": "nobody"}).json()

    assert [r["id"] for r in by_status] == [failed_b, failed_a]
    assert [(r["id"], r["error"]) for r in by_both] == [(failed_a, "boom")]
    assert by_name == {"runs": [], "next_cursor": None}


@pytest.mark.parametrize(
    ("params", "code", "says"),
    [
        ({"cursor": "not-a-cursor"}, 400, "is not one this service gave"),
        ({"cursor": encode_cursor(5)[:-2] + "!!"}, 400, "is not one this service gave"),
        ({"limit": 0}, 422, "limit"),
        ({"limit": 501}, 422, "limit"),
        ({"status": "x" * 33}, 422, "status"),
        ({"status": "a\x00"}, 422, "status"),
        ({"name": "\x00"}, 422, "name"),
    ],
)
def test_bad_paging_is_a_clear_4xx(
    client: TestClient, params: dict[str, Any], code: int, says: str
) -> None:
    answer = client.get("/runs", params=params)
    assert answer.status_code == code
    assert says in json.dumps(answer.json()["detail"])


def test_the_cursor_is_opaque_but_checked() -> None:
    assert decode_cursor(encode_cursor(41)) == 41
    for text in ("", "YWJj", "%%%", "QmVmb3JlOi0x", encode_cursor(1)[:-1] + "\u00e9"):
        with pytest.raises(ValueError, match="."):
            decode_cursor(text)


# -- GET /runs/{id} ----------------------------------------------------------------------------


def test_a_run_shows_progress_heartbeat_staleness_checkpoints_and_error(
    client: TestClient, db_url: str, settings: Settings
) -> None:
    long_ago = datetime.now(UTC) - timedelta(hours=1)
    run_id, uid = add_run(
        db_url,
        name="shown",
        status="running",
        epoch=2,
        total=4,
        metrics={"loss": 0.5, "score": 0.8},
        heartbeat_at=long_ago,
        started_at=long_ago,
        error_message="worker lost once",
    )
    with CheckpointStore(run_id, run_uid=uid, settings=settings) as store:
        store.save({"w": 1}, step=0, metrics={"loss": 0.9})
        store.save({"w": 2}, step=1, metrics={"loss": 0.5}, is_best=True)
    fresh_id, _ = add_run(db_url, status="running", heartbeat_at=datetime.now(UTC))

    answer = client.get(f"/runs/{run_id}")
    fresh = client.get(f"/runs/{fresh_id}").json()

    assert answer.status_code == 200, answer.text
    run = answer.json()
    assert (run["id"], run["name"], run["status"], run["stale"]) == (
        run_id,
        "shown",
        "running",
        True,
    )
    assert run["progress"] == {
        "epoch": 2,
        "total_epochs": 4,
        "percent": 50.0,
        "metrics": {"loss": 0.5, "score": 0.8},
        "message": None,
    }
    assert run["heartbeat_age"] > 3000
    assert run["lease_ttl"] == 15.0
    assert run["error"] == "worker lost once"
    assert [(c["step"], c["is_best"], c["metrics"]) for c in run["checkpoints"]] == [
        (0, False, {"loss": 0.9}),
        (1, True, {"loss": 0.5}),
    ]
    assert run["checkpoints_error"] is None
    assert fresh["stale"] is False
    assert fresh["checkpoints"] == []


def test_a_metric_that_is_not_a_number_is_null_not_a_500(sqlite_url: str, tmp_path: Path) -> None:
    """SQLite stores a NaN loss (PostgreSQL's JSON refuses it, so the trainer's write fails)."""
    run_id, _ = add_run(
        sqlite_url, status="running", epoch=1, total=2, metrics={"loss": math.nan, "score": 0.5}
    )
    api = create_api(Settings(database_url=sqlite_url), celery_app=trainapp.app)
    try:
        with TestClient(api) as client:
            one = client.get(f"/runs/{run_id}")
            listed = client.get("/runs")
    finally:
        empty_tables(get_engine(sqlite_url))

    assert one.status_code == 200, one.text
    assert one.json()["progress"]["metrics"] == {"loss": None, "score": 0.5}
    assert listed.status_code == 200, listed.text
    assert listed.json()["runs"][0]["progress"]["metrics"]["loss"] is None


@pytest.mark.parametrize("path", ["/runs/{}", "/runs/{}/events", "/models/{}"])
@pytest.mark.parametrize("run_id", [999, 2**70, -1])
def test_an_unknown_run_is_404_with_a_message(client: TestClient, path: str, run_id: int) -> None:
    answer = client.get(path.format(run_id))
    assert answer.status_code == 404
    what = "model run" if path.startswith("/models") else "run"
    assert answer.json() == {"detail": f"{what} {run_id} not found"}


def test_models_answers_as_the_seed(client: TestClient, db_url: str) -> None:
    run_id, _ = add_run(db_url, name="seeded", status="completed", accuracy=0.91, final_score=0.9)

    answer = client.get(f"/models/{run_id}")

    assert answer.status_code == 200
    body = answer.json()
    assert {k: body[k] for k in ("id", "name", "status", "accuracy")} == {
        "id": run_id,
        "name": "seeded",
        "status": "completed",
        "accuracy": 0.91,
    }
    assert body["final_score"] == 0.9


# -- GET /runs/{id}/events ---------------------------------------------------------------------


class Trainer:
    """A thread that writes what a trainer writes, epoch by epoch, then completes. It writes
    an epoch only once the test's stream has delivered the one before (``delivered``), so the
    stream sees every epoch however loaded the machine is. With ``last_after_completed`` the
    status is written before the last epoch's progress, as a real trainer's queued progress
    writes can land."""

    def __init__(self, db_url: str, run_id: int, epochs: int, *, late: bool = False) -> None:
        self.db_url, self.run_id, self.epochs, self.late = db_url, run_id, epochs, late
        self.delivered = {epoch: threading.Event() for epoch in range(epochs + 1)}
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def saw(self, event: dict[str, Any]) -> None:
        if event.get("event") == "progress":
            for epoch in range((event["data"]["epoch"] or 0) + 1):
                self.delivered[epoch].set()

    def _after(self, epoch: int) -> None:
        assert self.delivered[epoch].wait(10), f"the stream did not deliver epoch {epoch}"

    def _run(self) -> None:
        url, run_id, last = self.db_url, self.run_id, self.epochs
        for epoch in range(1, last):
            self._after(epoch - 1)
            set_progress(url, run_id, epoch, status="running")
        self._after(last - 1)
        if self.late:
            set_progress(url, run_id, last - 1, status="completed")
            time.sleep(0.3)  # the stream reads "completed" with the last epoch missing
            set_progress(url, run_id, last, progress_status="completed")
        else:
            set_progress(url, run_id, last, status="completed", progress_status="completed")

    def join(self) -> None:
        self.thread.join(10)


def read_stream(
    base: str, run_id: int, trainer: Trainer | None = None, **headers: str
) -> list[dict[str, Any]]:
    events = []
    with httpx.stream("GET", f"{base}/runs/{run_id}/events", headers=headers, timeout=30) as s:
        assert s.status_code == 200
        assert s.headers["content-type"].startswith("text/event-stream")
        for event in sse_events(s.iter_lines()):
            events.append(event)
            if trainer is not None:
                trainer.saw(event)
    return events


def progress_epochs(events: list[dict[str, Any]]) -> list[int]:
    return [e["data"]["epoch"] for e in events if e.get("event") == "progress"]


def test_the_event_stream_follows_a_run_epoch_by_epoch_and_closes_when_it_ends(
    api: Any, db_url: str
) -> None:
    run_id, _ = add_run(db_url, status="queued", total=4)
    trainer = Trainer(db_url, run_id, 4)

    with serving(api) as base:
        events = read_stream(base, run_id, trainer)
    trainer.join()

    assert progress_epochs(events) == [None, 1, 2, 3, 4]
    progress = [e for e in events if e.get("event") == "progress"]
    assert [e["data"]["status"] for e in progress] == ["queued", *["running"] * 3, "completed"]
    assert progress[2]["data"]["metrics"] == {"loss": 0.5}
    assert events[-1] == {"event": "end", "data": {"run_id": run_id, "status": "completed"}}
    assert len({e["id"] for e in progress}) == len(progress)


def test_a_completed_run_whose_last_progress_lands_late_still_streams_its_last_epoch(
    api: Any, db_url: str
) -> None:
    run_id, _ = add_run(db_url, status="queued", total=3)
    trainer = Trainer(db_url, run_id, 3, late=True)

    with serving(api) as base:
        events = read_stream(base, run_id, trainer)
    trainer.join()

    assert progress_epochs(events)[-1] == 3
    assert events[-1]["event"] == "end"


def test_a_client_that_reconnects_with_the_last_event_id_gets_only_what_is_new(
    api: Any, db_url: str
) -> None:
    run_id, _ = add_run(db_url, status="completed", epoch=3, total=3, progress_status="completed")

    with serving(api) as base:
        first = read_stream(base, run_id)
        last_id = [e for e in first if e.get("event") == "progress"][-1]["id"]
        again = read_stream(base, run_id, **{"Last-Event-ID": last_id})

    assert progress_epochs(first) == [3]
    assert [e["event"] for e in again if "event" in e] == ["end"]


def add_epochs(url: str, run_id: int, epochs: range) -> None:
    """History rows, as a trainer writes them with its progress."""
    with session_scope(url) as db:
        db.add_all(
            TrainingEpoch(model_run_id=run_id, epoch=n, metrics={"loss": 1.0 / n}) for n in epochs
        )


def epoch_events(events: list[dict[str, Any]]) -> list[int]:
    return [e["data"]["epoch"] for e in events if e.get("event") == "epoch"]


def test_a_run_lists_its_epochs_the_latest_ones_of_a_long_run(
    client: TestClient, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_id, _ = add_run(db_url, status="completed", epoch=5, total=5, progress_status="completed")
    add_epochs(db_url, run_id, range(1, 6))
    bare, _ = add_run(db_url, status="queued")

    shown = client.get(f"/runs/{run_id}").json()
    monkeypatch.setattr("taskkit.api._runs.RUN_EPOCHS", 2)
    bounded = client.get(f"/runs/{run_id}").json()

    assert shown["epochs"] == [{"epoch": n, "metrics": {"loss": 1.0 / n}} for n in range(1, 6)]
    assert [e["epoch"] for e in bounded["epochs"]] == [4, 5]
    assert client.get(f"/runs/{bare}").json()["epochs"] == []


def test_every_epoch_of_the_history_is_streamed_in_order_before_the_state(
    api: Any, db_url: str
) -> None:
    # 30 epochs that all ended between two reads: the progress row holds only the last.
    run_id, _ = add_run(db_url, status="completed", epoch=30, total=30, progress_status="completed")
    add_epochs(db_url, run_id, range(1, 31))

    with serving(api) as base:
        events = read_stream(base, run_id)

    kinds = [e["event"] for e in events if "event" in e]
    assert kinds == ["epoch"] * 30 + ["progress", "end"]
    assert epoch_events(events) == list(range(1, 31))
    assert [e["id"] for e in events if e.get("event") == "epoch"] == [str(n) for n in range(1, 31)]
    assert events[1]["data"] == {"run_id": run_id, "epoch": 1, "metrics": {"loss": 1.0}}


def test_epochs_written_while_the_stream_is_open_are_each_sent_once(api: Any, db_url: str) -> None:
    run_id, _ = add_run(db_url, status="running", epoch=0, total=9)
    done = threading.Event()

    def trainer() -> None:  # three epochs at a time, then the run ends
        for first in (1, 4, 7):
            add_epochs(db_url, run_id, range(first, first + 3))
            set_progress(db_url, run_id, first + 2)
            time.sleep(0.05)
        set_progress(db_url, run_id, 9, status="completed", progress_status="completed")
        done.set()

    thread = threading.Thread(target=trainer, daemon=True)
    with serving(api) as base:
        thread.start()
        events = read_stream(base, run_id)
    thread.join(10)

    assert done.is_set()
    assert epoch_events(events) == list(range(1, 10))
    assert events[-1]["event"] == "end"


def test_a_client_that_reconnects_after_an_epoch_gets_the_epochs_after_it(
    api: Any, db_url: str
) -> None:
    run_id, _ = add_run(db_url, status="completed", epoch=6, total=6, progress_status="completed")
    add_epochs(db_url, run_id, range(1, 7))

    with serving(api) as base:
        after_four = read_stream(base, run_id, **{"Last-Event-ID": "4"})
        first = read_stream(base, run_id)
        last_id = [e for e in first if e.get("event") == "progress"][-1]["id"]
        again = read_stream(base, run_id, **{"Last-Event-ID": last_id})
        junk = read_stream(base, run_id, **{"Last-Event-ID": "not-an-id"})

    assert epoch_events(after_four) == [5, 6]
    assert [e["event"] for e in after_four if "event" in e] == ["epoch", "epoch", "progress", "end"]
    assert last_id.startswith("6-")
    assert [e["event"] for e in again if "event" in e] == ["end"]
    assert epoch_events(junk) == list(range(1, 7))


def test_a_quiet_stream_sends_keepalive_comments(api: Any, db_url: str) -> None:
    api.state.events_keepalive = 0.0
    run_id, _ = add_run(db_url, status="running", epoch=1, total=2)
    trainer = Trainer(db_url, run_id, 2)

    with serving(api) as base:
        events = read_stream(base, run_id, trainer)
    trainer.join()

    assert {"comment": "keep-alive"} in events
    assert events[-1]["event"] == "end"
