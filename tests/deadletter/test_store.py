"""``taskkit.deadletter``: the dead-letter store on SQLite and PostgreSQL, replays into a real
Celery app (Redis broker), and the optional broker queue of new letters."""

from __future__ import annotations

import base64
import json
import math
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pytest
import redis
from celery import Celery
from sqlalchemy import Engine, select, update

from taskkit.config import Settings, reset_settings
from taskkit.db.models import BatchItem, DeadLetter
from taskkit.deadletter import (
    UNSERIALIZABLE,
    DeadLetterEntry,
    DeadLetterStore,
    batch_progress,
)
from taskkit.deadletter._json import jsonable
from taskkit.errors import ConfigurationError, DeadLetterNotFound, ReplayRejected
from taskkit.tasks import BatchTask, ResilientTask, create_app, replay_dead_letters
from tests._support.letters import letter_entry

T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
SCORE = "tkdl.score_items"
SCORE_V2 = "tkdl.score_items_v2"
PING = "tkdl.ping"
QUEUE = "tkdl-q"


def replay(store: DeadLetterStore, ids: Any = None, **options: Any) -> Any:
    """``replay_dead_letters`` into the store's own app unless ``app=`` is given."""
    options.setdefault("app", store.app)
    return replay_dead_letters(ids, store=store, **options)


class Clock:
    """'Now' for the store's ages; tests move it."""

    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def at_t0() -> Clock:
    return Clock()


@pytest.fixture
def store(db_url: str, engine: Engine, at_t0: Clock) -> DeadLetterStore:
    return DeadLetterStore(db_url, clock=at_t0, queue="")


def entry(task: str = SCORE, payload: Any = None, **fields: Any) -> DeadLetterEntry:
    fields.setdefault("at", T0)
    return letter_entry(task, payload, **fields)


def ids_of(letters: list[DeadLetter]) -> list[int]:
    return [letter.id for letter in letters]


def snapshot(store: DeadLetterStore, ids: list[int] | None = None) -> list[tuple[Any, ...]]:
    """The letters' replay columns: a refused replay leaves them all as they were."""
    return [
        (x.id, x.status, x.replays, x.replayed_into, x.replay_task_id, x.replayed_at)
        for x in store.list(status=None, ids=ids)
    ]


# -- recording ------------------------------------------------------------------------------------


def test_record_stores_a_letter_with_its_error_and_payload(store: DeadLetterStore):
    try:
        {"x": 1}["price"]
    except KeyError as exc:
        error = exc
    count = store.record(
        [
            DeadLetterEntry.from_exception(
                SCORE,
                {"id": 7, "price": None},
                error,
                attempts=3,
                batch_id="b1",
                item_key="7",
                task_id="task-1",
            )
        ]
    )

    [letter] = store.list()
    assert count == 1
    assert store.get(letter.id).id == letter.id
    assert (letter.task_name, letter.batch_id, letter.item_key, letter.task_id) == (
        SCORE,
        "b1",
        "7",
        "task-1",
    )
    assert letter.payload == {"id": 7, "price": None}
    assert (letter.error_type, letter.error_message, letter.attempts) == ("KeyError", "'price'", 3)
    assert letter.traceback is not None
    assert "KeyError: 'price'" in letter.traceback
    assert (letter.status, letter.replays, letter.replayed_at) == ("dead", 0, None)
    assert letter.first_failed_at == letter.last_failed_at
    assert letter.last_failed_at.tzinfo is not None


def test_record_of_nothing_writes_nothing(store: DeadLetterStore):
    assert store.record([]) == 0
    assert store.list(status=None) == []


def test_recording_the_same_item_again_updates_its_letter(store: DeadLetterStore):
    later = T0 + timedelta(minutes=5)
    store.record([entry(attempts=3, at=T0, error=KeyError("price"))])
    [first] = store.list()
    store.discard([first.id])

    store.record([entry(attempts=2, at=later, error=TimeoutError("slow"))])

    [letter] = store.list(status=None)
    assert letter.id == first.id
    assert letter.attempts == 5
    assert (letter.first_failed_at, letter.last_failed_at) == (T0, later)
    assert (letter.error_type, letter.error_message) == ("TimeoutError", "slow")
    assert letter.status == "dead"  # it failed again: waiting again


def test_the_same_key_in_another_batch_or_task_is_another_letter(store: DeadLetterStore):
    store.record([entry(batch="b1"), entry(batch="b2"), entry(task=SCORE_V2, batch="b1")])

    assert len(store.list()) == 3


def test_failures_of_a_whole_task_merge_into_one_letter_per_task_id(
    store: DeadLetterStore, at_t0: Clock
):
    """Issue 14 item 9: NULL batch/item made every redelivered failure a new letter."""
    payload = {"args": ["h1"], "kwargs": {}}
    later = T0 + timedelta(minutes=5)
    store.record([entry(PING, payload, batch=None, key=None, task_id="t-1", attempts=4)])
    [first] = store.list()
    store.discard([first.id])
    store.record([entry(PING, payload, batch=None, key=None, task_id="t-1", at=later, attempts=1)])
    store.record([entry(PING, payload, batch=None, key=None, task_id="t-2")])

    letters = store.list(status=None)
    assert [(x.task_id, x.attempts, x.status) for x in letters] == [
        ("t-2", 1, "dead"),
        ("t-1", 5, "dead"),  # failed again: waiting again, its last failure moved
    ]
    assert letters[1].id == first.id
    assert (letters[1].first_failed_at, letters[1].last_failed_at) == (T0, later)
    assert (letters[1].batch_id, letters[1].item_key) == (None, None)


def test_whole_task_failures_recorded_at_once_for_one_task_id_are_one_letter(
    store: DeadLetterStore,
):
    """Concurrent redeliveries of one task id failing at the same moment (threads, each its own
    transaction) still make one letter."""
    payload = {"args": ["h1"], "kwargs": {}}

    def fail() -> None:
        store.record([entry(PING, payload, batch=None, key=None, task_id="t-race")])

    threads = [threading.Thread(target=fail) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert [(x.task_id, x.attempts) for x in store.list()] == [("t-race", 6)]


def test_whole_task_failures_without_a_task_id_stay_apart(store: DeadLetterStore):
    payload = {"args": ["h1"], "kwargs": {}}
    store.record([entry(PING, payload, batch=None, key=None)])
    store.record([entry(PING, payload, batch=None, key=None)])

    assert [letter.attempts for letter in store.list()] == [1, 1]


# -- reading --------------------------------------------------------------------------------------


def test_list_filters_by_task_batch_error_type_age_and_status(store: DeadLetterStore, at_t0: Clock):
    hour = timedelta(hours=1)
    store.record(
        [
            entry(SCORE, batch="b1", key="a", at=T0 - 48 * hour, error=KeyError("x")),
            entry(SCORE, batch="b1", key="b", at=T0 - 2 * hour, error=ValueError("y")),
            entry(SCORE, batch="b2", key="c", at=T0 - 30 * timedelta(minutes=1)),
            entry(SCORE_V2, batch="b3", key="d", at=T0 - 10 * timedelta(seconds=1)),
        ]
    )
    by_key = {letter.item_key: letter.id for letter in store.list()}
    store.discard([by_key["c"]])

    def keys(**filters: Any) -> list[str | None]:
        return [letter.item_key for letter in store.list(**filters)]

    assert keys() == ["a", "b", "d"]  # oldest failure first; discarded left out
    assert keys(status=None) == ["a", "b", "c", "d"]
    assert keys(status="discarded") == ["c"]
    assert keys(task=SCORE) == ["a", "b"]
    assert keys(batch_id="b1") == ["a", "b"]
    assert keys(error_type="ValueError") == ["b"]
    assert keys(older_than=hour) == ["a", "b"]
    assert keys(newer_than=hour, status=None) == ["c", "d"]
    assert keys(older_than=hour, newer_than=24 * hour) == ["b"]
    assert keys(task=SCORE, error_type="KeyError", batch_id="b1") == ["a"]
    assert keys(ids=[by_key["d"], by_key["a"]]) == ["a", "d"]
    assert keys(limit=2) == ["a", "b"]
    at_t0.now = T0 + 47 * hour  # an hour later than that, everything is older than an hour
    assert keys(older_than=hour) == ["a", "b", "d"]


def test_list_with_an_unknown_status_is_a_configuration_error(store: DeadLetterStore):
    with pytest.raises(ConfigurationError, match="unknown dead-letter status 'gone'"):
        store.list(status="gone")


def test_depth_counts_the_waiting_letters_per_task(store: DeadLetterStore):
    store.record([entry(SCORE, key="a"), entry(SCORE, key="b"), entry(SCORE, key="c")])
    store.record([entry(SCORE_V2, key="a")])
    store.discard([store.list(task=SCORE)[0].id])

    assert store.depth() == {SCORE: 2, SCORE_V2: 1}
    assert store.depth("discarded") == {SCORE: 1}
    assert store.depth("replayed") == {}


def test_get_of_an_unknown_id_raises_dead_letter_not_found(store: DeadLetterStore):
    with pytest.raises(DeadLetterNotFound, match="no dead letter with id 404") as raised:
        store.get(404)

    assert raised.value.letter_ids == [404]
    assert isinstance(raised.value, LookupError)


# -- discarding and purging -----------------------------------------------------------------------


def test_discard_marks_letters_discarded_and_keeps_them(store: DeadLetterStore):
    store.record([entry(key="a"), entry(key="b")])
    a, b = ids_of(store.list())

    assert store.discard([a]) == 1

    assert [(x.id, x.status) for x in store.list(status=None)] == [(a, "discarded"), (b, "dead")]


def test_discard_with_an_unknown_id_changes_nothing(store: DeadLetterStore):
    store.record([entry(key="a")])
    [a] = ids_of(store.list())

    with pytest.raises(DeadLetterNotFound, match="no dead letter with id 999") as raised:
        store.discard([a, 999])

    assert raised.value.letter_ids == [999]
    assert [x.status for x in store.list(status=None)] == ["dead"]


def test_purge_by_ids_deletes_them(store: DeadLetterStore):
    store.record([entry(key="a"), entry(key="b"), entry(key="c")])
    a, b, c = ids_of(store.list())

    assert store.purge(ids=[a, c]) == 2

    assert ids_of(store.list(status=None)) == [b]


def test_purge_with_an_unknown_id_deletes_nothing(store: DeadLetterStore):
    store.record([entry(key="a"), entry(key="b")])
    a, b = ids_of(store.list())

    with pytest.raises(DeadLetterNotFound, match="no dead letters with ids 998, 999"):
        store.purge(ids=[a, 999, 998])

    assert ids_of(store.list(status=None)) == [a, b]


def test_purge_by_age_task_and_status(store: DeadLetterStore):
    day = timedelta(days=1)
    store.record(
        [
            entry(SCORE, key="old", at=T0 - 10 * day),
            entry(SCORE, key="old-discarded", at=T0 - 10 * day),
            entry(SCORE_V2, key="old-other", at=T0 - 10 * day),
            entry(SCORE, key="new", at=T0 - day / 2),
        ]
    )
    store.discard([x.id for x in store.list() if x.item_key == "old-discarded"])

    assert store.purge(older_than=7 * day, task=SCORE, status="discarded") == 1
    assert [x.item_key for x in store.list(status=None)] == ["old", "old-other", "new"]
    assert store.purge(older_than=7 * day, task=SCORE) == 1
    assert store.purge(older_than=7 * day) == 1
    assert [x.item_key for x in store.list(status=None)] == ["new"]


def test_purge_without_an_age_uses_the_retention_setting(
    store: DeadLetterStore, monkeypatch: pytest.MonkeyPatch
):
    day = timedelta(days=1)
    store.record(
        [
            entry(key="40d", at=T0 - 40 * day),
            entry(key="8d", at=T0 - 8 * day),
            entry(key="6d", at=T0 - 6 * day),
        ]
    )

    assert store.purge() == 1  # the default retention: 30 days
    monkeypatch.setenv("TASKKIT_DEAD_LETTER_RETENTION_DAYS", "7")
    reset_settings()
    try:
        assert store.purge() == 1
    finally:
        monkeypatch.delenv("TASKKIT_DEAD_LETTER_RETENTION_DAYS")
        reset_settings()

    assert [x.item_key for x in store.list(status=None)] == ["6d"]


# -- payloads as JSON -----------------------------------------------------------------------------


def test_jsonable_converts_numpy_datetimes_tuples_and_sets():
    moment = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)

    assert jsonable(
        {
            "n": np.int64(3),
            "x": np.float32(1.5),
            "flag": np.bool_(True),
            "vector": np.array([1, 2, 3]),
            "grid": np.arange(4).reshape(2, 2),
            "at": moment,
            "pair": (1, "a"),
            "tags": {"b", "a"},
        }
    ) == {
        "n": 3,
        "x": 1.5,
        "flag": True,
        "vector": [1, 2, 3],
        "grid": [[0, 1], [2, 3]],
        "at": "2030-01-02T03:04:05+00:00",
        "pair": [1, "a"],
        "tags": ["a", "b"],
    }


@pytest.mark.parametrize(
    "value",
    [
        float("nan"),
        {"score": math.inf},
        {"score": np.float64("nan")},
        {"scores": np.array([1.0, np.nan])},
        {"obj": object()},
        {1j: "complex key"},
    ],
    ids=["nan", "inf", "numpy-nan", "array-with-nan", "object", "bad-key"],
)
def test_jsonable_stands_in_for_what_json_cannot_hold(value: Any):
    converted = jsonable(value)

    assert set(converted) == {UNSERIALIZABLE}
    assert converted[UNSERIALIZABLE] == repr(value)


def test_a_payload_that_is_not_json_is_stored_as_its_stand_in(store: DeadLetterStore):
    store.record([entry(payload={"score": float("nan"), "id": np.int64(4)})])

    [letter] = store.list()
    assert letter.payload == {UNSERIALIZABLE: "{'score': nan, 'id': np.int64(4)}"}


# -- replay into a real Celery app ----------------------------------------------------------------

#: Item ids whose processing fails in the test app (a test "fixes the bug" by clearing it).
BROKEN: set[str] = set()


class ScoreTask(BatchTask):
    """An item is ``{"id": ...}``; one with a ``"bad"`` key no longer validates."""

    def validate_item(self, item: Any) -> None:
        if not isinstance(item, dict) or "bad" in item:
            raise ValueError("has a 'bad' field")


def _score(self: ScoreTask, item: dict[str, Any]) -> None:
    if item["id"] in BROKEN:
        raise RuntimeError(f"cannot score {item['id']}")


#: Hosts ``PING`` was called with, in this process.
PINGED: list[str] = []


def _ping(self: ResilientTask, host: str, timeout: float = 1.0) -> str:
    PINGED.append(host)
    return host


def make_app(db_url: str, redis_url: str, prefix: str, **config: Any) -> Celery:
    """A Celery app on the test's database and the Redis broker, with this test's key prefix:
    ``SCORE`` and ``SCORE_V2`` batch tasks (one retry, no waits) and ``PING``."""
    app = create_app(
        "tkdl",
        settings=Settings(broker_url=redis_url, database_url=db_url, lease_ttl=6.0),
        task_default_queue=QUEUE,
        broker_transport_options={"global_keyprefix": prefix},
        result_expires=600,
        **config,
    )
    options = {"item_max_attempts": 2, "item_delay": 0.0}
    app.task(base=ScoreTask, bind=True, shared=False, name=SCORE, **options)(_score)
    app.task(base=ScoreTask, bind=True, shared=False, name=SCORE_V2, **options)(_score)
    app.task(base=ResilientTask, bind=True, shared=False, name=PING)(_ping)
    return app


@pytest.fixture
def prefix(redis_client: redis.Redis) -> Iterator[str]:
    """A Redis key prefix of this test; its keys (queues, results) go afterwards."""
    prefix = f"tkdl-{uuid.uuid4().hex[:12]}:"
    yield prefix
    keys = list(redis_client.scan_iter(match=f"{prefix}*"))
    if keys:
        redis_client.delete(*keys)


@pytest.fixture
def app(db_url: str, engine: Engine, redis_url: str, prefix: str) -> Iterator[Celery]:
    BROKEN.clear()
    yield make_app(db_url, redis_url, prefix)
    BROKEN.clear()


@pytest.fixture
def replays(db_url: str, app: Celery, at_t0: Clock) -> DeadLetterStore:
    """The store of ``app``'s database, replaying into ``app``."""
    return DeadLetterStore(db_url, app=app, clock=at_t0, queue="")


def queued(client: redis.Redis, key: str) -> list[dict[str, Any]]:
    """The messages waiting in a kombu Redis list (oldest first): headers and decoded body."""
    messages = []
    for raw in reversed(client.lrange(key, 0, -1)):
        envelope = json.loads(raw)
        body = envelope["body"]
        if envelope["properties"].get("body_encoding") == "base64":
            body = base64.b64decode(body)
        messages.append({"headers": envelope["headers"], "body": json.loads(body)})
    return messages


def sent_tasks(
    client: redis.Redis, prefix: str
) -> list[tuple[str, str, list[Any], dict[str, Any]]]:
    """(task name, task id, args, kwargs) of the task messages waiting in the app's queue."""
    return [
        (m["headers"]["task"], m["headers"]["id"], m["body"][0], m["body"][1])
        for m in queued(client, f"{prefix}{QUEUE}")
    ]


def run_batch(app: Celery, items: list[dict[str, Any]], batch_id: str) -> dict[str, Any]:
    """Run ``SCORE`` over ``items`` in this process, as a worker would."""
    summary: dict[str, Any] = app.tasks[SCORE](items, batch_id=batch_id)
    return summary


def test_a_batch_dead_letters_its_failed_items_with_key_batch_and_attempts(
    app: Celery, replays: DeadLetterStore, db_url: str
):
    BROKEN.update({"b", "d"})

    summary = run_batch(app, [{"id": k} for k in "abcd"], "batch-1")

    assert (summary["successful"], summary["failed_ids"]) == (2, ["b", "d"])
    letters = replays.list()
    assert [(x.task_name, x.batch_id, x.item_key) for x in letters] == [
        (SCORE, "batch-1", "b"),
        (SCORE, "batch-1", "d"),
    ]
    assert [(x.payload, x.error_type, x.attempts) for x in letters] == [
        ({"id": "b"}, "RuntimeError", 2),
        ({"id": "d"}, "RuntimeError", 2),
    ]
    assert batch_progress("batch-1", db_url)[2:4] == (2, 2)  # done, dead


def test_replay_of_item_letters_sends_one_batch_of_them_with_their_keys(
    app: Celery, replays: DeadLetterStore, redis_client: redis.Redis, prefix: str, db_url: str
):
    BROKEN.update({"b", "d"})
    run_batch(app, [{"id": k} for k in "abcd"], "batch-1")
    letter_ids = ids_of(replays.list())
    BROKEN.clear()  # the bug is fixed

    result = replay(replays, task=SCORE)

    [(name, task_id, args, kwargs)] = sent_tasks(redis_client, prefix)
    [sent] = result.sent
    assert sorted(result.letter_ids) == sorted(letter_ids) == sorted(sent.letter_ids)
    assert (sent.task_name, sent.task_id) == (name, task_id) == (SCORE, task_id)
    assert sent.batch_id is not None
    assert sent.batch_id.startswith("replay-")
    assert args == [[{"id": "b"}, {"id": "d"}]]
    assert kwargs == {"batch_id": sent.batch_id, "keys": ["b", "d"]}
    for letter in replays.list(status=None):
        assert (letter.status, letter.replays) == ("replayed", 1)
        assert (letter.replayed_into, letter.replay_task_id) == (SCORE, task_id)
        assert letter.replayed_at == T0
    assert replays.depth() == {}

    summary = app.tasks[name](*args, **kwargs)  # what the worker does with the message

    assert (summary["successful"], summary["failed"]) == (2, 0)
    assert batch_progress(sent.batch_id, db_url)[2:4] == (2, 0)


def test_replay_into_another_batch_task(
    app: Celery, replays: DeadLetterStore, redis_client: redis.Redis, prefix: str
):
    replays.record([entry(SCORE, key="a"), entry(SCORE, key="b")])
    a, b = ids_of(replays.list())

    result = replay(replays, [b], into=SCORE_V2)

    [(name, task_id, args, kwargs)] = sent_tasks(redis_client, prefix)
    assert (name, args, kwargs["keys"]) == (SCORE_V2, [[{"id": "b"}]], ["b"])
    assert (result.letter_ids, result.sent[0].task_id) == ([b], task_id)
    assert [(x.id, x.status, x.replayed_into) for x in replays.list(status=None)] == [
        (a, "dead", None),
        (b, "replayed", SCORE_V2),
    ]


def test_replay_splits_items_whose_keys_repeat_across_batches(
    app: Celery, replays: DeadLetterStore, redis_client: redis.Redis, prefix: str, db_url: str
):
    """Keys are unique within a batch: the same key from two batches goes in two batches."""
    replays.record(
        [entry(batch="b1", key="a"), entry(batch="b2", key="a"), entry(batch="b2", key="c")]
    )

    result = replay(replays, task=SCORE)

    messages = sent_tasks(redis_client, prefix)
    assert [kwargs["keys"] for _, _, _, kwargs in messages] == [["a", "c"], ["a"]]
    assert len(result.sent) == 2
    assert len({sent.batch_id for sent in result.sent}) == 2
    for name, _, args, kwargs in messages:
        summary = app.tasks[name](*args, **kwargs)
        assert summary["failed"] == 0
        assert batch_progress(kwargs["batch_id"], db_url).done == len(kwargs["keys"])


def test_replay_of_a_task_letter_sends_its_arguments_again(
    app: Celery, replays: DeadLetterStore, redis_client: redis.Redis, prefix: str
):
    replays.record(
        [entry(PING, {"args": ["h1"], "kwargs": {"timeout": 2.5}}, batch=None, key=None)]
    )
    [letter] = replays.list()

    result = replay(replays, [letter.id])

    [(name, task_id, args, kwargs)] = sent_tasks(redis_client, prefix)
    assert (name, args, kwargs) == (PING, ["h1"], {"timeout": 2.5})
    assert result.sent[0].batch_id is None
    replayed = replays.get(letter.id)
    assert (replayed.status, replayed.replay_task_id) == ("replayed", task_id)


def test_an_eager_replay_of_a_task_letter_runs_it_in_process(
    db_url: str, engine: Engine, redis_url: str, prefix: str
):
    app = make_app(db_url, redis_url, prefix, task_always_eager=True)
    store = DeadLetterStore(db_url, app=app, queue="")
    store.record([entry(PING, {"args": ["h1"], "kwargs": {}}, batch=None, key=None)])
    PINGED.clear()

    result = replay(store, all=True)

    [sent] = result.sent
    assert PINGED == ["h1"]
    assert [(x.status, x.replay_task_id) for x in store.list(status=None)] == [
        ("replayed", sent.task_id)
    ]


# the eager batch stores its progress through Celery's Redis backend, which calls redis-py's
# deprecated setex
@pytest.mark.filterwarnings("ignore:Call to deprecated setex:DeprecationWarning")
def test_an_eager_replay_of_item_letters_runs_the_new_batch_in_process(
    db_url: str, engine: Engine, redis_url: str, prefix: str
):
    BROKEN.clear()
    app = make_app(db_url, redis_url, prefix, task_always_eager=True)
    store = DeadLetterStore(db_url, app=app, queue="")
    store.record([entry(key="a"), entry(key="b")])

    result = replay(store, task=SCORE)

    [sent] = result.sent
    assert sent.batch_id is not None
    letters = store.list(status=None)
    assert [(x.status, x.replay_task_id) for x in letters] == [("replayed", sent.task_id)] * 2
    assert batch_progress(sent.batch_id, db_url)[2:4] == (2, 0)


def test_replay_with_a_filter_that_selects_nothing_sends_nothing(
    app: Celery, replays: DeadLetterStore, redis_client: redis.Redis, prefix: str
):
    replays.record([entry(key="a")])

    result = replay(replays, task="nobody.home")

    assert result == ([], [])
    assert sent_tasks(redis_client, prefix) == []


def test_replay_without_ids_filters_or_all_is_a_configuration_error(replays: DeadLetterStore):
    with pytest.raises(ConfigurationError, match="replay what"):
        replay(replays)


# -- refused replays: nothing sent, nothing changed -----------------------------------------------


class Refusal:
    """Three waiting item letters (``ids``); ``unchanged()`` checks that nothing was sent and
    none of them changed."""

    def __init__(self, store: DeadLetterStore, client: redis.Redis, prefix: str) -> None:
        store.record([entry(key="a"), entry(key="b"), entry(key="c")])
        self.store, self.client, self.prefix = store, client, prefix
        self.ids = ids_of(store.list())
        self.before = snapshot(store, self.ids)

    def unchanged(self) -> None:
        assert sent_tasks(self.client, self.prefix) == []
        assert snapshot(self.store, self.ids) == self.before


@pytest.fixture
def refused(
    app: Celery, replays: DeadLetterStore, redis_client: redis.Redis, prefix: str
) -> Refusal:
    return Refusal(replays, redis_client, prefix)


def test_replay_of_an_unknown_id_is_refused(replays: DeadLetterStore, refused: Refusal):
    with pytest.raises(DeadLetterNotFound, match="no dead letter with id 4040") as raised:
        replay(replays, [*refused.ids, 4040])

    assert raised.value.letter_ids == [4040]
    refused.unchanged()


def test_replay_into_an_unregistered_task_is_refused(replays: DeadLetterStore, refused: Refusal):
    with pytest.raises(ReplayRejected, match="task 'jobs.gone' is not registered in app 'tkdl'"):
        replay(replays, refused.ids, into="jobs.gone")

    refused.unchanged()


def test_replay_of_letters_whose_task_is_not_registered_is_refused(
    replays: DeadLetterStore, refused: Refusal
):
    replays.record([entry("jobs.retired", key="z")])
    [retired] = replays.list(task="jobs.retired")

    with pytest.raises(ReplayRejected, match="'jobs.retired' is not registered") as raised:
        replay(replays, all=True)

    assert raised.value.letter_ids == [retired.id]
    assert replays.get(retired.id).status == "dead"
    refused.unchanged()


def test_a_mixed_selection_with_one_invalid_payload_sends_nothing(
    replays: DeadLetterStore, refused: Refusal, engine: Engine
):
    bad = refused.ids[1]
    with engine.begin() as connection:
        connection.execute(
            update(DeadLetter).where(DeadLetter.id == bad).values(payload={"id": "b", "bad": 1})
        )

    with pytest.raises(
        ReplayRejected, match="no longer validates for 'tkdl.score_items'"
    ) as raised:
        replay(replays, task=SCORE)

    assert raised.value.letter_ids == [bad]
    assert "ValueError: has a 'bad' field" in str(raised.value)
    assert str(raised.value).startswith("replay refused, nothing was sent: ")
    refused.unchanged()


def test_an_item_letter_into_a_task_that_is_not_a_batch_task_is_refused(
    replays: DeadLetterStore, refused: Refusal
):
    with pytest.raises(ReplayRejected, match="'tkdl.ping' is not a BatchTask") as raised:
        replay(replays, refused.ids[:1], into=PING)

    assert raised.value.letter_ids == refused.ids[:1]
    refused.unchanged()


#: Letters naming Celery's built-in tasks, with payloads that fit their signatures: celery.map
#: would call PING with arguments from the row, past replay's argument check.
BUILTIN_LETTERS = {
    "celery.map": {"args": [{"task": PING, "args": [], "kwargs": {}}, [["h1"]]], "kwargs": {}},
    "celery.group": {"args": [[], "result", "group-id", []], "kwargs": {}},
    "celery.backend_cleanup": {"args": [], "kwargs": {}},
}


@pytest.mark.parametrize("name", sorted(BUILTIN_LETTERS))
def test_a_letter_naming_a_celery_builtin_is_refused(
    name: str, replays: DeadLetterStore, refused: Refusal
):
    """Issue 14 item 6: letters whose task_name was celery.* were sent."""
    replays.record([entry(name, BUILTIN_LETTERS[name], batch=None, key=None, task_id="t-b")])
    [letter] = replays.list(task=name)

    with pytest.raises(ReplayRejected, match=f"{name!r} is Celery's own task") as raised:
        replay(replays, all=True)

    assert raised.value.letter_ids == [letter.id]
    assert replays.get(letter.id).status == "dead"
    refused.unchanged()


def test_replay_into_celery_map_is_refused(replays: DeadLetterStore, refused: Refusal):
    replays.record([entry(PING, BUILTIN_LETTERS["celery.map"], batch=None, key=None)])
    [letter] = replays.list(task=PING)

    with pytest.raises(ReplayRejected, match="'celery.map' is Celery's own task"):
        replay(replays, [letter.id], into="celery.map")

    refused.unchanged()


def _plain(host: str) -> str:
    return host


@pytest.mark.parametrize("allowed", [False, True])
def test_replay_into_a_task_that_is_not_a_taskkit_task_needs_the_allow_list(
    allowed: bool, app: Celery, replays: DeadLetterStore, redis_client: redis.Redis, prefix: str
):
    plain = app.task(name="tkdl.plain", shared=False)(_plain)
    if allowed:
        app.conf.taskkit_replay_allow = ["tkdl.plain", "celery.map"]
    replays.record([entry("tkdl.plain", {"args": ["h1"], "kwargs": {}}, batch=None, key=None)])
    replays.record([entry("celery.map", BUILTIN_LETTERS["celery.map"], batch=None, key=None)])
    [letter] = replays.list(task="tkdl.plain")
    [builtin] = replays.list(task="celery.map")

    with pytest.raises(ReplayRejected, match="'celery.map' is Celery's own task"):
        replay(replays, [builtin.id])  # never, even when listed
    if not allowed:
        with pytest.raises(
            ReplayRejected, match="'tkdl.plain' is not a taskkit task .* taskkit_replay_allow"
        ):
            replay(replays, [letter.id])
        assert sent_tasks(redis_client, prefix) == []
        return
    result = replay(replays, [letter.id])

    assert [(name, args) for name, _, args, _ in sent_tasks(redis_client, prefix)] == [
        (plain.name, ["h1"])
    ]
    assert result.letter_ids == [letter.id]


def test_the_replay_allow_list_is_an_app_setting_of_task_names(
    db_url: str, engine: Engine, redis_url: str, prefix: str
):
    app = make_app(db_url, redis_url, prefix, taskkit_replay_allow=["tkdl.plain"])
    assert app.conf.taskkit_replay_allow == ["tkdl.plain"]
    store = DeadLetterStore(db_url, app=app, queue="")
    store.record([entry(PING, {"args": ["h1"], "kwargs": {}}, batch=None, key=None)])
    app.conf.taskkit_replay_allow = "tkdl.plain"

    with pytest.raises(ConfigurationError, match="taskkit_replay_allow must be a list"):
        replay(store, all=True)


def test_a_task_letter_whose_arguments_no_longer_fit_is_refused(
    replays: DeadLetterStore, refused: Refusal
):
    replays.record([entry(PING, {"args": [], "kwargs": {"port": 1}}, batch=None, key=None)])
    [letter] = replays.list(task=PING)

    with pytest.raises(ReplayRejected, match="no longer fits 'tkdl.ping'") as raised:
        replay(replays, all=True)

    assert raised.value.letter_ids == [letter.id]
    refused.unchanged()


def test_a_task_letter_whose_arguments_were_redacted_is_refused(
    replays: DeadLetterStore, refused: Refusal
):
    payload = {"args": ["h1"], "kwargs": {"timeout": "[redacted]"}, "redacted": ["timeout"]}
    replays.record([entry(PING, payload, batch=None, key=None)])
    [letter] = replays.list(task=PING)

    with pytest.raises(
        ReplayRejected, match=r"sensitive arguments \(timeout\) were redacted"
    ) as raised:
        replay(replays, all=True)

    assert raised.value.letter_ids == [letter.id]
    refused.unchanged()


def test_a_letter_whose_payload_was_not_json_is_refused(replays: DeadLetterStore, refused: Refusal):
    replays.record([entry(key="nan", payload={"id": "nan", "score": float("nan")})])
    [letter] = [x for x in replays.list() if x.item_key == "nan"]

    with pytest.raises(ReplayRejected, match="payload was not JSON") as raised:
        replay(replays, [*refused.ids, letter.id])

    assert raised.value.letter_ids == [letter.id]
    refused.unchanged()


def test_a_letter_that_was_already_replayed_is_not_replayed_again(
    app: Celery,
    replays: DeadLetterStore,
    redis_client: redis.Redis,
    prefix: str,
):
    replays.record([entry(key="a"), entry(key="b")])
    a, b = ids_of(replays.list())
    replay(replays, [a])
    before = snapshot(replays)

    with pytest.raises(ReplayRejected, match="only letters with status 'dead'") as raised:
        replay(replays, [a, b])

    assert raised.value.letter_ids == [a]
    assert snapshot(replays) == before
    assert len(sent_tasks(redis_client, prefix)) == 1  # the first replay's message only
    assert replay(replays, task=SCORE).letter_ids == [b]  # a filter skips replayed letters


# -- the broker queue of new letters --------------------------------------------------------------


def _published(client: redis.Redis, key: str) -> list[dict[str, Any]]:
    return [message["body"] for message in queued(client, key)]


def test_a_recorded_letter_is_published_to_the_dead_letter_queue(
    db_url: str, engine: Engine, redis_url: str, redis_client: redis.Redis, prefix: str
):
    app = make_app(db_url, redis_url, prefix)
    queue = f"dead-{uuid.uuid4().hex[:8]}"
    store = DeadLetterStore(db_url, queue=queue, app=app)

    store.record([entry(key="a", attempts=3, payload={"id": "a", "n": np.int64(2)})])

    [message] = _published(redis_client, f"{prefix}{queue}")
    assert {k: message[k] for k in ("task_name", "batch_id", "item_key", "payload")} == {
        "task_name": SCORE,
        "batch_id": "b1",
        "item_key": "a",
        "payload": {"id": "a", "n": 2},
    }
    assert (message["error_type"], message["attempts"], message["status"]) == (
        "KeyError",
        3,
        "dead",
    )
    assert datetime.fromisoformat(message["last_failed_at"]) == T0
    assert message["id"] == store.list()[0].id  # a consumer can `taskkit dlq replay` it


def test_a_batch_publishes_its_dead_items_when_the_app_sets_a_queue(
    db_url: str, engine: Engine, redis_url: str, redis_client: redis.Redis, prefix: str
):
    queue = f"dead-{uuid.uuid4().hex[:8]}"
    app = make_app(db_url, redis_url, prefix, taskkit_dead_letter_queue=queue)
    BROKEN.update({"b"})
    try:
        run_batch(app, [{"id": "a"}, {"id": "b"}], "batch-q")
    finally:
        BROKEN.clear()

    [message] = _published(redis_client, f"{prefix}{queue}")
    assert (message["batch_id"], message["item_key"], message["error_type"]) == (
        "batch-q",
        "b",
        "RuntimeError",
    )
    assert message["id"] == DeadLetterStore(db_url).list(batch_id="batch-q")[0].id
    with engine.connect() as connection:
        assert (
            connection.scalar(select(BatchItem.status).where(BatchItem.item_key == "b")) == "dead"
        )


def test_without_a_queue_nothing_is_published(
    db_url: str, engine: Engine, redis_url: str, redis_client: redis.Redis, prefix: str
):
    app = make_app(db_url, redis_url, prefix)
    DeadLetterStore(db_url, queue="", app=app).record([entry()])

    assert list(redis_client.scan_iter(match=f"{prefix}*")) == []


def test_recording_into_a_database_that_was_never_migrated_says_what_to_run(tmp_path):
    store = DeadLetterStore(f"sqlite:///{tmp_path / 'empty.db'}")
    with pytest.raises(ConfigurationError, match="taskkit db upgrade"):
        store.record([entry(key="a")])


def test_a_letter_is_published_to_a_rabbitmq_queue_too(
    db_url: str, engine: Engine, rabbitmq_url: str
):
    from kombu import Connection

    app = create_app("tkdl-amqp", settings=Settings(broker_url=rabbitmq_url, database_url=db_url))
    queue = f"tkdl-dead-{uuid.uuid4().hex[:8]}"
    store = DeadLetterStore(db_url, queue=queue, app=app)

    store.record([entry(key="a", payload={"id": "a"})])

    with Connection(rabbitmq_url) as connection:
        consumer = connection.SimpleQueue(queue)
        try:
            message = consumer.get(timeout=10)
            message.ack()
            assert message.payload["item_key"] == "a"
            assert message.payload["id"] == store.list()[0].id
        finally:
            consumer.close()
            connection.default_channel.queue_delete(queue)
