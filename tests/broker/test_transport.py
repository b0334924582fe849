"""The ``taskkit+sqlite://`` kombu transport on a real SQLite file, with real processes.

Time moves by an injected clock (``transport_options["clock"]``) wherever one process can
see it; a message taken by a killed child process is seen again by the parent once the parent's
clock has passed the child's visibility timeout.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from kombu import Connection, Queue

import taskkit.broker
from taskkit.broker import SCHEME
from tests._support.workers import REPO, wait_for
from tests.broker.consumer import EXCHANGE, FANOUT, QUEUE
from tests.conftest import FakeClock


def connect(db: Path, **options: Any) -> Connection:
    return Connection(f"{SCHEME}+sqlite:///{db}", transport_options=options)


def publish(conn: Connection, *bodies: Any, **kwargs: Any) -> None:
    producer = conn.Producer()
    for body in bodies:
        producer.publish(body, exchange=EXCHANGE, routing_key="q", declare=[QUEUE], **kwargs)


def rows(db: Path, where: str = "1") -> list[tuple[Any, ...]]:
    with sqlite3.connect(db) as raw:
        return raw.execute(f"SELECT id, queue, receipt FROM messages WHERE {where}").fetchall()


def child(*args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.broker.consumer", *args],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "queue.db"


def test_importing_the_package_registers_the_url_scheme():
    from kombu.transport import resolve_transport

    assert resolve_transport(SCHEME) is taskkit.broker.Transport


def test_a_bad_url_is_one_line_naming_the_expected_form():
    with pytest.raises(ValueError, match=r"taskkit\+sqlite:///<path to a file>"):
        Connection("taskkit+memory://x").connect()


def test_ack_deletes_the_row(db):
    with connect(db) as conn:
        publish(conn, {"n": 1}, {"n": 2})
        first = QUEUE(conn.default_channel).get()
        assert first.payload == {"n": 1}
        assert len(rows(db)) == 2  # taken, not yet acknowledged: still in the file
        first.ack()
        second = QUEUE(conn.default_channel).get()
        second.ack()
        assert QUEUE(conn.default_channel).get() is None
    assert rows(db) == []


def test_reject_with_requeue_goes_back_to_the_front_of_its_queue(db):
    with connect(db) as conn:
        publish(conn, "a", "b", "c")
        a = QUEUE(conn.default_channel).get()
        a_id = a.delivery_tag.split(".")[0]
        a.requeue()
        again = QUEUE(conn.default_channel).get()
        assert again.payload == "a"
        assert again.delivery_tag.split(".")[0] == a_id  # same row, same place
        assert again.delivery_info["redelivered"]
        b = QUEUE(conn.default_channel).get()
        assert b.payload == "b"
        # basic_recover frees everything this channel holds, at the front as well
        conn.default_channel.basic_recover(requeue=True)
        assert [QUEUE(conn.default_channel).get().payload for _ in range(3)] == ["a", "b", "c"]


def test_a_higher_priority_comes_first(db):
    with connect(db) as conn:
        publish(conn, "low")
        publish(conn, "high", priority=9)
        assert QUEUE(conn.default_channel).get().payload == "high"


def test_a_message_taken_by_a_killed_process_comes_back_after_the_visibility_timeout(db, tmp_path):
    with connect(db) as conn:
        publish(conn, {"job": 1}, {"job": 2})
    out = tmp_path / "taken.json"
    taker = child("take-one", str(db), str(out), "2")
    try:
        wait_for(out.exists, 30, "the child to take a message")
        os.kill(taker.pid, signal.SIGKILL)
    finally:
        taker.kill()
        taker.wait(timeout=30)
    tag, body = json.loads(out.read_text())
    assert body == {"job": 1}

    clock = FakeClock(time.time())
    with connect(db, clock=clock, visibility_timeout=30) as conn:
        channel = conn.default_channel
        assert QUEUE(channel).get().payload == {"job": 2}  # job 1 is still invisible
        clock.advance(3)  # past the dead child's 2 s
        back = QUEUE(channel).get()
        assert back.payload == {"job": 1}
        assert back.delivery_info["redelivered"]
        # the dead taker's receipt is void: its late ack (had it lived) deletes nothing
        assert channel.extend_visibility([tag]) == 0
        back.ack()


def test_two_processes_never_take_the_same_message(db, tmp_path):
    count = 300
    with connect(db) as conn:
        publish(conn, *range(count))
    go = tmp_path / "go"
    outs = [tmp_path / "one.json", tmp_path / "two.json"]
    takers = [child("drain", str(db), str(out), str(go)) for out in outs]
    try:
        go.touch()
        for taker in takers:
            assert taker.wait(timeout=60) == 0
    finally:
        for taker in takers:
            taker.kill()
    taken = [json.loads(out.read_text()) for out in outs]
    everything = taken[0] + taken[1]
    assert sorted(everything) == list(range(count))  # each exactly once
    assert rows(db) == []


def test_extend_visibility_keeps_a_held_message_invisible(db):
    clock = FakeClock(time.time())
    with (
        connect(db, clock=clock, visibility_timeout=10) as holder,
        connect(db, clock=clock, visibility_timeout=10) as other,
    ):
        publish(holder, "long")
        held = QUEUE(holder.default_channel).get()
        for _ in range(3):
            clock.advance(8)
            assert holder.default_channel.extend_visibility([held.delivery_tag]) == 1
            assert QUEUE(other.default_channel).get() is None
        clock.advance(11)  # the holder stopped extending: it comes back
        assert QUEUE(other.default_channel).get().payload == "long"


def test_a_late_ack_after_another_worker_took_the_message_deletes_nothing(db, caplog):
    clock = FakeClock(time.time())
    with (
        connect(db, clock=clock, visibility_timeout=5) as first,
        connect(db, clock=clock, visibility_timeout=5) as second,
    ):
        publish(first, "slow")
        late = QUEUE(first.default_channel).get()
        clock.advance(6)
        taken = QUEUE(second.default_channel).get()
        with caplog.at_level(logging.WARNING, logger="taskkit.broker"):
            late.ack()
        assert "after its visibility timeout" in caplog.text
        assert len(rows(db)) == 1  # the second worker's copy is intact
        taken.ack()
    assert rows(db) == []


def test_expired_messages_are_dropped(db):
    clock = FakeClock(time.time())
    with connect(db, clock=clock) as conn:
        publish(conn, "stale", expiration=1)
        publish(conn, "fresh")
        clock.advance(2)
        assert QUEUE(conn.default_channel).get().payload == "fresh"
        assert QUEUE(conn.default_channel).get() is None
        clock.advance(3)  # the janitor's turn
        QUEUE(conn.default_channel).get()
    assert [r[0] for r in rows(db, "payload LIKE '%stale%'")] == []


def test_fanout_reaches_every_queue_bound_by_any_process(db):
    for name in ("left", "right"):
        binder = child("bind", str(db), name)
        assert binder.wait(timeout=60) == 0
    with connect(db) as conn:
        mine = Queue("mine", FANOUT)
        mine(conn.default_channel).declare()
        conn.Producer().publish({"to": "all"}, exchange=FANOUT)
        for name in ("left", "right", "mine"):
            message = Queue(name, FANOUT)(conn.default_channel).get(no_ack=True)
            assert message is not None, name
            assert message.payload == {"to": "all"}
    assert rows(db) == []  # no_ack: deleted on delivery


def test_a_no_ack_consumer_deletes_on_delivery(db):
    with connect(db) as conn:
        publish(conn, "one")
        got = []
        with conn.Consumer(QUEUE, no_ack=True, callbacks=[lambda body, _: got.append(body)]):
            conn.drain_events(timeout=5)
        assert got == ["one"]
    assert rows(db) == []


def test_an_unused_expiring_queue_and_its_messages_go(db):
    clock = FakeClock(time.time())
    with connect(db, clock=clock) as conn:
        reply = Queue("reply", FANOUT, expires=10, message_ttl=300)
        reply(conn.default_channel).declare()
        conn.Producer().publish("for a client that died", exchange=FANOUT)
        assert len(rows(db, "queue = 'reply'")) == 1
        clock.advance(61)
        QUEUE(conn.default_channel).get()  # any poll runs the janitor when it is due
        assert rows(db) == []
        assert conn.default_channel.get_table("fx") == []


def test_size_and_purge_count_ready_messages_only(db):
    with connect(db) as conn:
        publish(conn, 1, 2, 3)
        held = QUEUE(conn.default_channel).get()
        channel = conn.default_channel
        assert channel._size("q") == 2
        assert channel.queue_purge("q") == 2
        assert len(rows(db)) == 1  # the held one stays: its worker still runs it
        held.ack()
    assert rows(db) == []


def test_a_second_message_waits_for_a_free_slot_not_for_the_poll(db):
    """An acknowledgement wakes the poller (prefetch 1): the next message is taken at once."""
    with connect(db) as conn:
        publish(conn, "a", "b")
        got: list[Any] = []
        channel = conn.default_channel
        channel.basic_qos(prefetch_count=1)
        with conn.Consumer(QUEUE, channel=channel, callbacks=[lambda b, m: got.append(m)]):
            conn.drain_events(timeout=5)
            assert [m.payload for m in got] == ["a"]
            got[0].ack()
            conn.drain_events(timeout=5)
            assert [m.payload for m in got] == ["a", "b"]
            got[1].ack()
    assert rows(db) == []


def test_the_visibility_keeper_extends_the_messages_a_consumer_holds(db):
    """The worker's keeper (its heartbeat for the broker) uses the channel's own method."""
    from types import SimpleNamespace

    from taskkit.tasks import create_app
    from taskkit.tasks._visibility import extend_held_messages, uses_visibility_timeout

    clock = FakeClock(time.time())
    app = create_app("keeper", broker_url=f"{SCHEME}+sqlite:///{db}")
    assert uses_visibility_timeout(app)
    with (
        connect(db, clock=clock, visibility_timeout=10) as holder,
        connect(db, clock=clock, visibility_timeout=10) as other,
    ):
        publish(holder, "held", "prefetched")
        channel = holder.default_channel
        held = [QUEUE(channel).get(), QUEUE(channel).get()]
        consumer = SimpleNamespace(task_consumer=SimpleNamespace(channel=channel))
        clock.advance(8)
        assert extend_held_messages(consumer) == 2
        clock.advance(8)
        assert QUEUE(other.default_channel).get() is None
        for message in held:
            message.ack()
    assert rows(db) == []
