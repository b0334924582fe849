"""``requeue_at_front`` pushes its copy only when the message's exchange and routing key name
exactly one queue; none (no binding) or several (topic, fanout) return False, nothing pushed,
so Celery's own retry runs: no loss, no duplicates. A fake kombu channel (pure logic)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from taskkit.tasks._requeue import requeue_at_front


class FakeChannel:
    def __init__(self, queues: list[str]) -> None:
        self.queues = queues
        self.pushed: list[tuple[str, str]] = []

    def _lookup(self, exchange: str, routing_key: str) -> list[str]:
        return list(self.queues)

    def _get_message_priority(self, payload: dict[str, Any], reverse: bool = False) -> int:
        return 0

    def _q_for_pri(self, queue: str, priority: int) -> str:
        return queue

    @contextmanager
    def conn_or_acquire(self) -> Iterator[Any]:
        yield self

    def rpush(self, key: str, body: str) -> None:
        self.pushed.append((key, body))


class FakeMessage:
    def __init__(self, channel: FakeChannel) -> None:
        self.channel = channel
        self._raw = {
            "body": "e30=",
            "headers": {"id": "t1", "task": "tk.job", "retries": 0},
            "properties": {"delivery_info": {"exchange": "tasks", "routing_key": "jobs"}},
        }


@pytest.mark.parametrize("queues", [[], ["jobs", "audit"], ["a", "b", "c"]])
def test_no_queue_or_several_queues_leave_the_retry_to_celery(queues: list[str]) -> None:
    channel = FakeChannel(queues)
    assert requeue_at_front(FakeMessage(channel), 1) is False
    assert channel.pushed == []


def test_exactly_one_queue_gets_the_copy_at_its_front() -> None:
    channel = FakeChannel(["jobs"])
    assert requeue_at_front(FakeMessage(channel), 1) is True
    assert [key for key, _ in channel.pushed] == ["jobs"]
