"""A retry at the front of its queue on the embedded broker (``Channel._put_front``, used by
``taskkit.tasks._requeue.requeue_at_front`` after a pool process died), on a real SQLite file.

The copy of a held message replaces it in one transaction: it is the next message a consumer of
the queue takes, whatever waits (also messages requeued earlier), behind higher priorities only;
the held row is gone, and the held delivery's acknowledgement afterwards deletes nothing else
and warns of nothing. A message no longer held under its tag is not copied (False).
"""

from __future__ import annotations

import logging
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
from kombu import Connection

from taskkit.broker import SCHEME
from taskkit.tasks._requeue import requeue_at_front
from tests.broker.consumer import EXCHANGE, QUEUE
from tests.conftest import FakeClock

#: Celery task protocol 2 keeps these in the headers (``requeue_at_front`` needs them).
HEADERS = {"id": "t-1", "task": "tk.job", "retries": 0, "eta": None}


def connect(db: Path, **options: Any) -> Connection:
    return Connection(f"{SCHEME}+sqlite:///{db}", transport_options=options)


def publish(conn: Connection, *bodies: Any, **kwargs: Any) -> None:
    producer = conn.Producer()
    for body in bodies:
        producer.publish(
            body,
            exchange=EXCHANGE,
            routing_key="q",
            declare=[QUEUE],
            headers={**HEADERS, "id": f"t-{body}"},
            **kwargs,
        )


def count(db: Path) -> int:
    with sqlite3.connect(db) as raw:
        total: int = raw.execute("SELECT count(*) FROM messages").fetchone()[0]
    return total


def take(conn: Connection) -> Any:
    message = QUEUE(conn.default_channel).get()
    assert message is not None
    return message


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "queue.db"


def test_the_copy_replaces_the_held_message_and_is_taken_next(db, caplog):
    with connect(db) as conn:
        publish(conn, "a", "b", "c")
        a = take(conn)
        assert requeue_at_front(a, 1) is True
        assert count(db) == 3  # the copy in place of the held row, not beside it
        with caplog.at_level(logging.WARNING, logger="taskkit.broker"):
            a.ack()  # what Celery does next (acks_late): nothing left to delete
        assert caplog.text == ""
        assert count(db) == 3
        copy = take(conn)
        assert copy.payload == "a"
        assert copy.headers["retries"] == 1
        assert copy.headers["id"] == "t-a"
        assert copy.headers["eta"] is None
        assert not copy.delivery_info.get("redelivered")
        copy.ack()
        assert [take(conn).payload for _ in range(2)] == ["b", "c"]


def test_the_copy_goes_ahead_of_a_message_requeued_before_it(db):
    with connect(db) as conn:
        publish(conn, "a", "b", "c")
        a, b = take(conn), take(conn)
        b.requeue()  # back at the front, keeping its place (its id)
        assert requeue_at_front(a, 1) is True
        a.ack()
        assert [take(conn).payload for _ in range(3)] == ["a", "b", "c"]


def test_a_redelivered_message_is_copied_without_its_redelivered_flags(db):
    with connect(db) as conn:
        publish(conn, "a", "b")
        take(conn).requeue()
        again = take(conn)
        assert again.delivery_info["redelivered"]
        assert requeue_at_front(again, 1) is True
        again.ack()
        copy = take(conn)
        assert copy.payload == "a"
        assert not copy.delivery_info.get("redelivered")
        assert "redelivered" not in copy.headers


def test_a_higher_priority_still_comes_first(db):
    with connect(db) as conn:
        publish(conn, "low")
        low = take(conn)
        publish(conn, "high", priority=9)
        publish(conn, "later")
        assert requeue_at_front(low, 1) is True
        low.ack()
        assert [take(conn).payload for _ in range(3)] == ["high", "low", "later"]


def test_an_acknowledged_message_is_copied_to_the_front_with_nothing_to_replace(db):
    with connect(db) as conn:
        publish(conn, "a", "b")
        a = take(conn)
        a.ack()  # a task without acks_late: acknowledged when it was received
        assert requeue_at_front(a, 1) is True
        assert [take(conn).payload for _ in range(2)] == ["a", "b"]


def test_a_message_taken_over_by_another_worker_is_not_copied(db):
    clock = FakeClock(time.time())
    with (
        connect(db, clock=clock, visibility_timeout=5) as first,
        connect(db, clock=clock, visibility_timeout=5) as second,
    ):
        publish(first, "slow")
        late = take(first)
        clock.advance(6)
        taken = take(second)
        assert requeue_at_front(late, 1) is False  # Celery's own retry decides
        assert count(db) == 1
        taken.ack()
    assert count(db) == 0
