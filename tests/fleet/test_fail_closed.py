"""Fail closed: a worker whose limits' Redis is down runs no limited body; it re-queues them."""

from __future__ import annotations

import pathlib
import shutil
import subprocess
from collections.abc import Iterator

import pytest
import redis
from celery.exceptions import TimeoutError as ResultTimeout

from tests._support.apps import RedisTestApp
from tests._support.workers import WorkerProcess, wait_for

PORT = 6411


def _start(port: int, tmp_path: pathlib.Path) -> subprocess.Popen[bytes]:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed", pytrace=False)
    server = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    client = redis.Redis(port=port, socket_connect_timeout=0.2)
    wait_for(lambda: _pings(client), 20, f"redis-server on {port}")
    return server


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.exceptions.ConnectionError:
        return False


@pytest.fixture
def limits_redis(tmp_path: pathlib.Path) -> Iterator[list[subprocess.Popen[bytes]]]:
    servers = [_start(PORT, tmp_path)]
    yield servers
    for server in servers:
        if server.poll() is None:
            server.kill()
            server.wait(timeout=10)


def test_limited_task_waits_while_its_redis_is_down(
    fleet_app: RedisTestApp,
    tmp_path: pathlib.Path,
    limits_redis: list[subprocess.Popen[bytes]],
) -> None:
    from tests.fleet.apps import rated

    kit = fleet_app
    kit.counter.delete(kit.key("retries", "rated"))
    queue = f"{kit.queue}-closed"  # nothing another test left on the shared queue reaches it
    worker = WorkerProcess(
        "closed",
        tmp_path,
        app="tests.fleet.apps",
        queue=queue,
        env={"TASKKIT_TEST_FLEET_REDIS": f"redis://127.0.0.1:{PORT}/0"},
    )
    try:
        worker.wait_ready()
        server = limits_redis[0]
        server.kill()  # the limits' Redis goes away; the broker stays
        server.wait(timeout=10)
        result = rated.apply_async((7,), queue=queue)
        try:
            wait_for(lambda: worker.log().count("over its fleet rate limit") >= 2, 60, "re-queues")
        except AssertionError as error:
            pytest.fail(f"{error}; worker log:\n{worker.log()[-6000:]}")
        assert kit.counter.llen(kit.key("retries", "rated")) == 0  # no body ran
        assert result.state != "SUCCESS"
        limits_redis.append(_start(PORT, tmp_path))
        try:
            assert result.get(timeout=60) == 7
        except ResultTimeout:  # say what the worker did meanwhile
            tail = worker.log()[-6000:]
            pytest.fail(f"no result 60 s after the limits' Redis came back; worker log:\n{tail}")
        assert [int(r) for r in kit.counter.lrange(kit.key("retries", "rated"), 0, -1)] == [0]
    finally:
        worker.stop()
