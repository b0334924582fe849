"""RabbitMQ's consumer timeout under a long task (issue 15 hole 6).

The test starts a RabbitMQ node of its own (ports 5673 and 25673, files in a temporary folder)
whose ``consumer_timeout`` is 3 s, checked every second: the shared broker on 5672 is never
touched. This node is 3.10, which ignores ``x-consumer-timeout``, so the channel really is
closed under the task and the broker really delivers it again; the tests count executions in
Redis. The worker subprocess imports this module as its Celery app.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator

import pytest
import redis

from taskkit.config import Settings
from taskkit.tasks import ResilientTask, create_app
from taskkit.tasks._rabbitmq import (
    CONSUMER_TIMEOUT_ARGUMENT,
    amqp_defaults,
    consumer_timeout_supported,
    outlasting,
    rabbitmq_version,
)
from tests._support.apps import KEY_TTL, RUN
from tests._support.workers import WorkerProcess, wait_for
from tests.conftest import REDIS_URL

AMQP_PORT, DIST_PORT = 5673, 25673
NODE = f"taskkit-test-{RUN}@localhost"
URL = f"amqp://guest:guest@127.0.0.1:{AMQP_PORT}//"
QUEUE = f"rabbit-timeout-{RUN}"
#: The node's consumer timeout (ms); the task below runs well past it.
TIMEOUT_MS = 3000
#: What the workers ask for (s): the node ignores it, a 3.12+ node would honour it.
ASKED = 7200

app = create_app(
    "rabbit_timeout",
    settings=Settings(
        broker_url=URL,
        result_backend=REDIS_URL,
        lease_url=REDIS_URL,
        lease_ttl=2,
        consumer_timeout=ASKED,
    ),
    task_default_queue=QUEUE,
    result_expires=KEY_TTL,
)
counter = redis.Redis.from_url(REDIS_URL)


def key(*parts: object) -> str:
    return ":".join([f"rabbit-timeout-{RUN}", *map(str, parts)])


def count(what: str, name: str) -> int:
    return int(counter.get(key(what, name)) or 0)


@app.task(base=ResilientTask, bind=True, lease_key="name", name=f"rabbit-timeout-{RUN}.long")
def long_task(self: ResilientTask, name: str, seconds: float) -> int:
    """Hold the delivery for ``seconds``; count starts and completions in Redis."""
    counter.incr(key("runs", name))
    counter.expire(key("runs", name), KEY_TTL)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.1)
    counter.incr(key("done", name))
    counter.expire(key("done", name), KEY_TTL)
    return count("runs", name)


@app.task(base=ResilientTask, bind=True, name=f"rabbit-timeout-{RUN}.plain")
def plain_task(self: ResilientTask, name: str, seconds: float) -> int:
    """``long_task`` without a lease: only the worker's own bookkeeping stands between the copy
    the broker delivers again and a second run."""
    return long_task.run(name, seconds)


class PrivateRabbitMQ:
    """A RabbitMQ node of the test's own: its node name, ports, config and files."""

    def __init__(self, root: pathlib.Path) -> None:
        server = shutil.which("rabbitmq-server", path="/usr/lib/rabbitmq/bin") or shutil.which(
            "rabbitmq-server"
        )
        if server is None:
            pytest.fail("rabbitmq-server is not installed; the consumer timeout test needs it")
        self.bin = pathlib.Path(server).parent
        self.root = root
        for port in (AMQP_PORT, DIST_PORT):
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    pytest.fail(f"port {port} is in use; the private RabbitMQ node needs it")
        (root / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = 127.0.0.1:{AMQP_PORT}\nconsumer_timeout = {TIMEOUT_MS}\n"
        )
        # The timeout is checked on the channel's tick, once a minute unless told otherwise.
        (root / "advanced.config").write_text("[{rabbit, [{channel_tick_interval, 1000}]}].\n")
        (root / "enabled_plugins").write_text("[].\n")
        (root / "rabbitmq-env.conf").write_text("")
        self.env = {
            **os.environ,
            "HOME": str(root),  # its own Erlang cookie
            "RABBITMQ_NODENAME": NODE,
            "RABBITMQ_NODE_PORT": str(AMQP_PORT),
            "RABBITMQ_DIST_PORT": str(DIST_PORT),
            "RABBITMQ_MNESIA_BASE": str(root / "mnesia"),
            "RABBITMQ_LOG_BASE": str(root / "log"),
            "RABBITMQ_CONFIG_FILE": str(root / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(root / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(root / "enabled_plugins"),
            "RABBITMQ_CONF_ENV_FILE": str(root / "rabbitmq-env.conf"),
            "RABBITMQ_PID_FILE": str(root / "pid"),
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        }
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self._out = (self.root / "server.out").open("wb")
        self.process = subprocess.Popen(
            [str(self.bin / "rabbitmq-server")],
            env=self.env,
            stdout=self._out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

        def accepts() -> bool:
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(
                    "RabbitMQ exited:\n" + (self.root / "server.out").read_text()[-3000:]
                )
            from kombu import Connection

            try:
                with Connection(URL, connect_timeout=1) as connection:
                    connection.ensure_connection(max_retries=1)
                return True
            except Exception:
                return False

        wait_for(accepts, 90, "the private RabbitMQ node to accept connections", step=0.5)

    def ctl(self, *args: str) -> str:
        done = subprocess.run(
            [str(self.bin / "rabbitmqctl"), "-n", NODE, "-q", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        return done.stdout

    def stop(self) -> None:
        if self.process is None:
            return
        try:
            self.ctl("stop")
            self.process.wait(30)
        except Exception:
            os.killpg(self.process.pid, 9)
            self.process.wait(30)
        finally:
            self._out.close()
            self.process = None


@pytest.fixture(scope="module")
def rabbit() -> Iterator[PrivateRabbitMQ]:
    root = pathlib.Path(tempfile.mkdtemp(prefix="taskkit-rabbit-"))
    node = PrivateRabbitMQ(root)
    try:
        node.start()
        yield node
    finally:
        node.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def rabbit_worker(
    rabbit: PrivateRabbitMQ, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[WorkerProcess]:
    worker = WorkerProcess(
        "rabbit-timeout",
        tmp_path_factory.mktemp("rabbit-worker"),
        app=__name__,
        queue=QUEUE,
        concurrency=2,
    )
    try:
        worker.wait_ready()
        yield worker
    finally:
        worker.stop()
        print(f"--- worker log ---\n{worker.log()[-6000:]}")
        counter.delete(*counter.keys(key("*")) or [key("none")])


def test_workers_ask_rabbitmq_for_a_longer_consumer_timeout(rabbit, rabbit_worker):
    consumers = rabbit.ctl("list_consumers", "queue_name", "arguments")
    (line,) = [row for row in consumers.splitlines() if row.startswith(QUEUE + "\t")]
    assert CONSUMER_TIMEOUT_ARGUMENT in line
    assert str(ASKED * 1000) in line


def test_a_worker_on_rabbitmq_before_3_12_says_the_node_timeout_applies(rabbit_worker):
    assert rabbit_worker.log().count("ignores x-consumer-timeout") == 1


def test_a_task_longer_than_the_consumer_timeout_completes_once(rabbit, rabbit_worker):
    result = long_task.delay("long", 4 * TIMEOUT_MS / 1000)
    assert result.get(timeout=60) == 1

    # Every delivery of the task is acknowledged in the end, none runs it a second time.
    wait_for(lambda: queue_size(rabbit) == 0, 60, "the queue to empty", step=0.5)
    assert (count("runs", "long"), count("done", "long")) == (1, 1)
    log = rabbit_worker.log()
    assert "delivery acknowledgement on channel" in log  # the channel really was closed
    assert rabbit_worker.process.poll() is None  # and the worker lives on
    assert long_task.delay("after", 0).get(timeout=30) == 1


def test_a_task_without_a_lease_longer_than_the_consumer_timeout_completes_once(
    rabbit, rabbit_worker
):
    result = plain_task.delay("plain", 4 * TIMEOUT_MS / 1000)
    assert result.get(timeout=60) == 1
    wait_for(lambda: queue_size(rabbit) == 0, 60, "the queue to empty", step=0.5)
    assert (count("runs", "plain"), count("done", "plain")) == (1, 1)
    assert "was delivered again while this worker still runs it" in rabbit_worker.log()
    assert rabbit_worker.process.poll() is None


def queue_size(rabbit: PrivateRabbitMQ) -> int:
    """Messages in the test queue, ready or delivered and not yet acknowledged."""
    for row in rabbit.ctl("list_queues", "name", "messages").splitlines():
        if row.startswith(QUEUE + "\t"):
            return int(row.split("\t")[1])
    return -1


def test_the_broker_version_decides_whether_the_argument_is_honoured():
    assert rabbitmq_version({"version": b"3.10.8"}) == (3, 10, 8)
    assert rabbitmq_version({"version": "4.0.0-rc.1"}) == (4, 0, 0)
    assert rabbitmq_version({}) is None
    assert consumer_timeout_supported((3, 10, 8)) is False
    assert consumer_timeout_supported((3, 12, 0)) is True
    assert consumer_timeout_supported(None) is None


def test_tasks_whose_time_limit_outlasts_the_consumer_timeout_are_named():
    other = create_app(
        "outlasting",
        settings=Settings(broker_url=URL, result_backend=REDIS_URL),
        task_soft_time_limit=600,
    )

    @other.task(name="short", shared=False)
    def short() -> None: ...

    @other.task(name="long", time_limit=7200, shared=False)
    def long() -> None: ...

    assert {"long", "short"} & set(outlasting(other, 3600)) == {"long"}
    assert {"long", "short"} <= set(outlasting(other, 300))


def test_only_an_amqp_broker_retries_channel_errors():
    assert amqp_defaults("amqp://guest@rabbit//", 60)["broker_channel_error_retry"] is True
    assert "broker_channel_error_retry" not in amqp_defaults("redis://127.0.0.1:6379/0", 60)
    assert app.conf.broker_channel_error_retry is True
    assert app.conf.taskkit_consumer_timeout == ASKED
