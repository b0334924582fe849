"""The transport against a broker file someone else wrote, an unusable path, an old SQLite,
a failed COMMIT, and a consumer too busy to poll."""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from kombu import Connection, Exchange, Queue
from kombu.transport.virtual.exchange import TopicExchange

from taskkit.broker import SCHEME
from taskkit.broker import _transport as transport
from taskkit.broker._schema import connect as open_broker_file
from taskkit.errors import BrokerUnavailable
from taskkit.tasks import check_reachable
from tests.broker.consumer import EXCHANGE, QUEUE
from tests.conftest import FakeClock


def connect(db: Path, **options: Any) -> Connection:
    return Connection(f"{SCHEME}+sqlite:///{db}", transport_options=options)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "queue.db"


@pytest.mark.parametrize(
    "payload",
    [
        "not json",
        "[1]",
        '{"properties": 1}',
        '{"properties": {"delivery_info": 1}}',
        '{"body": 5, "properties": {"body_encoding": "base64"}}',
        '{"headers": [], "properties": {}}',
    ],
)
def test_a_malformed_row_is_dropped_with_a_warning_and_the_next_message_comes(db, caplog, payload):
    with connect(db) as conn:
        QUEUE(conn.default_channel).declare()
        with sqlite3.connect(db) as raw:
            raw.execute(
                "INSERT INTO messages (queue, payload) VALUES (?, ?)", (QUEUE.name, payload)
            )
        conn.Producer().publish({"n": 1}, exchange=EXCHANGE, routing_key="q")
        got: list[Any] = []
        with caplog.at_level(logging.WARNING, logger="taskkit.broker"):
            with conn.Consumer(QUEUE, callbacks=[lambda body, m: (got.append(body), m.ack())]):
                conn.drain_events(timeout=5)
        assert got == [{"n": 1}]
    warnings = [r.getMessage() for r in caplog.records if r.name == "taskkit.broker"]
    assert len(warnings) == 1
    assert f"queue {QUEUE.name!r}" in warnings[0]
    assert "message 1 " in warnings[0]
    assert payload not in warnings[0]
    with sqlite3.connect(db) as raw:
        assert raw.execute("SELECT count(*) FROM messages").fetchone() == (0,)


def test_check_reachable_on_an_unusable_broker_file_raises_broker_unavailable():
    app = Celery("t", broker="taskkit+sqlite:////proc/nope/q.db", backend="cache+memory://")
    with pytest.raises(BrokerUnavailable):
        check_reachable(app)


def test_a_locked_broker_file_is_a_kombu_connection_error(db, monkeypatch):
    monkeypatch.setattr(transport, "PROBE_TIMEOUT", 0.05)
    with connect(db) as conn:
        conn.connect()
    with sqlite3.connect(db, isolation_level=None) as raw:
        raw.execute("BEGIN IMMEDIATE")
        try:
            fresh = connect(db)
            with pytest.raises(fresh.connection_errors):
                fresh.connect()  # no retries: Connection.connect() tries once
            fresh.release()
        finally:
            raw.execute("ROLLBACK")


def test_an_old_sqlite_is_one_line_naming_the_version(db, monkeypatch):
    monkeypatch.setattr(sqlite3, "sqlite_version_info", (3, 31, 1))
    monkeypatch.setattr(sqlite3, "sqlite_version", "3.31.1")
    with pytest.raises(RuntimeError, match=r"^taskkit\+sqlite needs SQLite 3\.35.*3\.31\.1") as e:
        connect(db).connect()
    assert "\n" not in str(e.value)


class _FailingCommit:
    """A connection whose COMMIT fails once (a full disk, an I/O error)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.failed = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.conn, name)

    def execute(self, sql: str, *args: Any) -> Any:
        if sql == "COMMIT" and not self.failed:
            self.failed = True
            raise sqlite3.OperationalError("disk I/O error")
        return self.conn.execute(sql, *args)


def test_a_failed_commit_rolls_back_and_leaves_no_open_transaction(db):
    with connect(db) as conn:
        channel: Any = conn.default_channel
        real = channel.conn
        channel._conn = _FailingCommit(real)
        with pytest.raises(sqlite3.OperationalError), channel._write() as c:
            c.execute("INSERT INTO queues (name, last_seen) VALUES ('x', 0)")
        assert not real.in_transaction
        channel._conn = real
        with channel._write():  # a nested BEGIN would fail here
            pass


def test_a_busy_consumer_keeps_its_expiring_queues_while_it_extends_its_messages(db):
    clock = FakeClock(time.time())
    control = Queue("pidbox", Exchange("ctl", type="fanout"), expires=10, auto_delete=True)
    with (
        connect(db, clock=clock, visibility_timeout=30) as busy,
        connect(db, clock=clock, visibility_timeout=30) as other,
    ):
        task_channel: Any = busy.default_channel
        control_channel: Any = busy.channel()  # as Celery's pidbox: a channel of its own
        consumer = busy.Consumer(control, channel=control_channel, no_ack=True)
        consumer.consume()
        QUEUE(task_channel).declare()
        busy.Producer().publish("long task", exchange=EXCHANGE, routing_key="q")
        held = QUEUE(task_channel).get()
        for _ in range(10):  # 100 s without a poll; the keeper extends every 10 s
            clock.advance(10)
            assert task_channel.extend_visibility([held.delivery_tag]) == 1
            QUEUE(other.default_channel).get()  # another process's janitor runs
        assert other.default_channel._has_queue("pidbox")
        held.ack()


def test_topic_patterns_are_computed_from_the_routing_key_not_read_from_the_file(db):
    topic = Exchange("events", type="topic")
    with connect(db) as conn:
        queue = Queue("watch", topic, routing_key="task.*")
        queue(conn.default_channel).declare()
        with sqlite3.connect(db) as raw:
            raw.execute("UPDATE bindings SET pattern = '(a+)+$' WHERE queue = 'watch'")
        expected = TopicExchange(None).key_to_pattern("task.*")
        assert conn.default_channel.get_table("events") == [("task.*", expected, "watch")]


def test_processes_opening_a_new_broker_file_at_once_all_connect(tmp_path: Path):
    """Workers started together on a broker file that does not exist yet all switch it to WAL:
    SQLite refuses the switch at once ("database is locked", no busy wait) while another
    connection holds a lock, and ``connect`` tries again instead of failing. Before, about
    one trial in six of these failed."""
    for trial in range(20):
        path = tmp_path / f"broker-{trial}.db"
        start = threading.Barrier(4)
        errors: list[BaseException] = []

        def open_it(
            path: Path = path,
            start: threading.Barrier = start,
            errors: list[BaseException] = errors,
        ) -> None:
            start.wait(timeout=10)
            try:
                open_broker_file(path).close()
            except BaseException as error:
                errors.append(error)

        threads = [threading.Thread(target=open_it) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert errors == [], f"trial {trial}"
