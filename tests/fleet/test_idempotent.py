"""Idempotent submission through real Redis (the message is sent to the fleet app's queue)."""

from __future__ import annotations

import uuid

from tests._support.apps import RedisTestApp


def test_same_key_same_task_id_one_message(fleet_app: RedisTestApp) -> None:
    from taskkit.tasks import submit
    from tests.fleet.apps import rated

    kit = fleet_app
    queue = f"{kit.prefix}:{kit.queue}"
    before = kit.counter.llen(queue)
    key = f"order-{uuid.uuid4().hex}"
    first = submit(rated, 1, idempotency_key=key)
    again = submit(rated, 1, idempotency_key=key)
    other = submit(rated, 1, idempotency_key=key + "-b")
    assert again.id == first.id
    assert other.id != first.id
    assert kit.counter.llen(queue) - before == 2  # one message per key
    kit.counter.delete(queue)


def test_short_window_expires(fleet_app: RedisTestApp) -> None:
    from taskkit.tasks import submit
    from tests.fleet.apps import rated

    kit = fleet_app
    key = f"order-{uuid.uuid4().hex}"
    first = submit(rated, 1, idempotency_key=key, window=60)
    kit.counter.delete(f"taskkit:idempotency:{rated.name}:{key}")  # the window has passed
    assert submit(rated, 1, idempotency_key=key).id != first.id
    kit.counter.delete(f"{kit.prefix}:{kit.queue}")
