"""RabbitMQ as the broker: the ladder works the same (in-process worker, Redis results)."""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Iterator

import pytest
from celery.contrib.testing.worker import start_worker

from taskkit.config import Settings
from taskkit.tasks import ResilientTask, create_app
from tests.conftest import REDIS_URL

QUEUE = f"taskkit-rabbit-{uuid.uuid4().hex[:8]}"
app = create_app(
    "rabbit",
    settings=Settings(broker_url="amqp://guest:guest@127.0.0.1:5672//", result_backend=REDIS_URL),
    task_default_queue=QUEUE,
    taskkit_inner_delay=0.01,
    taskkit_outer_delay=0.05,
    taskkit_outer_max_delay=0.1,
    # The in-process solo worker has no event loop to send AMQP heartbeats from; without this
    # it wakes every 10 s and each retry waits for that.
    broker_heartbeat=0,
)
runs: list[int] = []
failures = itertools.count()


@app.task(base=ResilientTask, bind=True, shared=False)
def flaky(self: ResilientTask, fail: int) -> int:
    runs.append(self.request.retries)
    if next(failures) < fail:
        raise ConnectionError("downstream restarting")
    return len(runs)


@pytest.fixture(scope="module")
def rabbit_worker(rabbitmq_url: str, redis_url: str) -> Iterator[object]:
    app.conf.broker_url = rabbitmq_url
    with start_worker(app, pool="solo", perform_ping_check=False, loglevel="WARNING") as worker:
        yield worker
    with app.connection() as connection:
        connection.default_channel.queue_delete(QUEUE)


def test_inner_and_outer_retries_on_rabbitmq(rabbit_worker):
    assert app.conf.broker_transport_options == {}  # no Redis-only options on AMQP
    assert flaky.delay(4).get(timeout=30) == 5
    assert runs == [0, 0, 0, 1, 1]  # three in process, then re-queued through RabbitMQ
