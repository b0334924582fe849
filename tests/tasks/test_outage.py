"""Outages fail fast and leave nothing half-made (issue 15, hole 3).

Each test starts a redis-server of its own (ports 6391-6399), makes it the result backend or the
broker of an app, takes it away (killed, never started, hung by SIGSTOP, or a name that does not
resolve) and calls a submit path: ``submit_run``, ``resume_run``, ``submit_batch``,
``replay_dead_letters``. Each must raise ``BrokerUnavailable`` naming the URL without its
password, and leave the database as it was: no run, no batch, letters still waiting. The
``timeout`` marks only stop a hang (before the fix a dead result backend took ~20 s); the speed
is measured in ``benchmarks/bench_outage.py``, not asserted here.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from sqlalchemy import Engine, func, select

from taskkit.config import Settings
from taskkit.db.models import Batch, DeadLetter, ModelRun
from taskkit.deadletter import DeadLetterStore
from taskkit.errors import BrokerUnavailable
from taskkit.tasks import BatchTask, ResilientTask, create_app, replay_dead_letters, submit_batch
from taskkit.tasks._runs import resume_run, submit_run
from tests._support.letters import letter_entry
from tests.conftest import REDIS_URL

#: This part's port range: other sessions' servers live elsewhere.
PORTS = range(6391, 6400)
#: A password in every URL under test: it must never reach a message.
SECRET = "s3cr3t-outage"

pytestmark = pytest.mark.redis


def _free_port() -> int:
    for port in PORTS:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    pytest.fail(f"no free port in {PORTS.start}-{PORTS.stop - 1} for a redis-server", False)


class OwnRedis:
    """A redis-server of this test on a port of 6391-6399, stopped, hung or killed at will."""

    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed; the outage tests start their own", False)
        self.port = _free_port()
        self.url = f"redis://:{SECRET}@127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--daemonize", "no", "--requirepass", SECRET],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        client = redis.Redis(port=self.port, password=SECRET, socket_connect_timeout=0.2)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.exceptions.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        client.close()

    def hang(self) -> None:
        """Stop answering while the port stays open (the kernel still accepts connections)."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGSTOP)

    def kill(self) -> None:
        if self.process is not None:
            os.kill(self.process.pid, signal.SIGCONT)
            self.process.kill()
            self.process.wait(10)
            self.process = None


@pytest.fixture
def own_redis() -> Iterator[OwnRedis]:
    server = OwnRedis()
    yield server
    server.kill()


def _unreachable(how: str, own_redis: OwnRedis) -> str:
    """The URL of a Redis that is not there, in one of four ways."""
    if how == "killed":
        own_redis.kill()
        return own_redis.url
    if how == "hung":
        own_redis.hang()
        return own_redis.url
    if how == "closed port":
        url = own_redis.url
        own_redis.kill()  # the port of a server that never answers again: nothing listens
        return url
    return f"redis://:{SECRET}@taskkit-outage.invalid:6379/0"  # does not resolve


class OutageApp:
    """An app whose broker or result backend is ``down``, and its tasks."""

    def __init__(self, db_url: str, *, broker: str, backend: str) -> None:
        self.name = f"outage-{uuid.uuid4().hex[:10]}"
        self.queue = f"{self.name}-q"
        settings = Settings(broker_url=broker, result_backend=backend, database_url=db_url)
        self.app = app = create_app(
            self.name,
            settings=settings,
            task_default_queue=self.queue,
            taskkit_database_url=db_url,
        )

        @app.task(base=ResilientTask, bind=True, name=f"{self.name}.train")
        def train(self: Any, model_run_id: int, config: dict[str, Any]) -> None:
            """Never runs: no worker consumes this app's queue."""

        @app.task(base=BatchTask, bind=True, name=f"{self.name}.score")
        def score(self: Any, item: Any) -> None:
            """Never runs."""

        self.train, self.score = train, score


@pytest.fixture
def cleanup_queues() -> Iterator[list[str]]:
    """Queues a test may have sent to on the shared Redis (none, when all goes right)."""
    queues: list[str] = []
    yield queues
    client = redis.Redis.from_url(REDIS_URL)
    for queue in queues:
        client.delete(queue)
    client.close()


def _count(engine: Engine, model: Any) -> int:
    with engine.connect() as connection:
        return int(connection.execute(select(func.count()).select_from(model)).scalar_one())


def _assert_names_the_url(error: BrokerUnavailable, what: str, port: int | None) -> None:
    message = str(error)
    assert what in message
    assert SECRET not in message
    assert SECRET not in repr(error.args)
    if port is not None:
        assert f"redis://:***@127.0.0.1:{port}/0" in message
    assert "Check that it is running" in message  # says what to look at


def _fail_and_hand_to(engine: Engine, task_name: str) -> None:
    """The run failed (its worker died); it names ``task_name``, a task of the app that
    resumes it."""
    with engine.begin() as connection:
        connection.execute(
            ModelRun.__table__.update().values(
                status="failed", error_message="worker died", task_name=task_name
            )
        )


OUTAGES = ["killed", "closed port", "hung", "unresolvable"]


@pytest.mark.timeout(15)
@pytest.mark.parametrize("how", OUTAGES)
def test_submit_run_with_the_result_backend_down_creates_no_run(
    how: str, own_redis: OwnRedis, db_url: str, engine: Engine, cleanup_queues: list[str]
) -> None:
    backend = _unreachable(how, own_redis)
    kit = OutageApp(db_url, broker=REDIS_URL, backend=backend)
    cleanup_queues.append(kit.queue)
    with pytest.raises(BrokerUnavailable) as caught:
        submit_run(kit.train, {"epochs": 1}, name="outage", database_url=db_url)
    assert caught.value.service == "result backend"
    _assert_names_the_url(caught.value, "result backend", None if how == "unresolvable" else
                          own_redis.port)  # fmt: skip
    assert _count(engine, ModelRun) == 0


@pytest.mark.timeout(15)
@pytest.mark.parametrize("how", OUTAGES)
def test_submit_run_with_the_broker_down_creates_no_run(
    how: str, own_redis: OwnRedis, db_url: str, engine: Engine
) -> None:
    broker = _unreachable(how, own_redis)
    kit = OutageApp(db_url, broker=broker, backend=REDIS_URL)
    with pytest.raises(BrokerUnavailable) as caught:
        submit_run(kit.train, {"epochs": 1}, name="outage", database_url=db_url)
    assert caught.value.service == "broker"
    _assert_names_the_url(caught.value, "broker", None if how == "unresolvable" else
                          own_redis.port)  # fmt: skip
    assert _count(engine, ModelRun) == 0


@pytest.mark.timeout(15)
@pytest.mark.parametrize("down", ["broker", "result backend"])
def test_resume_run_in_an_outage_leaves_the_run_failed_and_its_task_id(
    down: str, own_redis: OwnRedis, db_url: str, engine: Engine, cleanup_queues: list[str]
) -> None:
    up = OutageApp(db_url, broker=REDIS_URL, backend=REDIS_URL)
    cleanup_queues.append(up.queue)
    run_id, task_id = submit_run(up.train, {"epochs": 1}, name="outage", database_url=db_url)
    url = _unreachable("killed", own_redis)
    kit = OutageApp(
        db_url,
        broker=url if down == "broker" else REDIS_URL,
        backend=url if down == "result backend" else REDIS_URL,
    )
    _fail_and_hand_to(engine, kit.train.name)
    cleanup_queues.append(kit.queue)
    with pytest.raises(BrokerUnavailable) as caught:
        resume_run(kit.app, run_id, require_checkpoint=False, database_url=db_url)
    _assert_names_the_url(caught.value, down, own_redis.port)
    with engine.connect() as connection:
        status, owner = connection.execute(
            select(ModelRun.status, ModelRun.task_id).where(ModelRun.id == run_id)
        ).one()
    assert (status, owner) == ("failed", task_id)


@pytest.mark.timeout(15)
@pytest.mark.parametrize("down", ["broker", "result backend"])
@pytest.mark.parametrize("how", ["killed", "hung"])
def test_submit_batch_in_an_outage_records_no_batch(
    down: str, how: str, own_redis: OwnRedis, db_url: str, engine: Engine,
    cleanup_queues: list[str],
) -> None:  # fmt: skip
    url = _unreachable(how, own_redis)
    kit = OutageApp(
        db_url,
        broker=url if down == "broker" else REDIS_URL,
        backend=url if down == "result backend" else REDIS_URL,
    )
    cleanup_queues.append(kit.queue)
    with pytest.raises(BrokerUnavailable) as caught:
        submit_batch(kit.score, [{"id": i} for i in range(10)], chunk_size=3, batch_id="b-out")
    _assert_names_the_url(caught.value, down, own_redis.port)
    assert _count(engine, Batch) == 0


@pytest.mark.timeout(15)
@pytest.mark.parametrize("down", ["broker", "result backend"])
def test_replay_in_an_outage_leaves_the_letters_waiting(
    down: str, own_redis: OwnRedis, db_url: str, engine: Engine, cleanup_queues: list[str]
) -> None:
    url = _unreachable("killed", own_redis)
    kit = OutageApp(
        db_url,
        broker=url if down == "broker" else REDIS_URL,
        backend=url if down == "result backend" else REDIS_URL,
    )
    cleanup_queues.append(kit.queue)
    store = DeadLetterStore(db_url, queue="", app=kit.app)
    store.record(
        [
            letter_entry(kit.score.name, {"id": "a"}, batch="b1", key="a"),
            letter_entry(kit.train.name, {"args": [1, {}], "kwargs": {}}, batch=None, key=None),
        ]
    )
    with pytest.raises(BrokerUnavailable) as caught:
        replay_dead_letters(app=kit.app, store=store, all=True)
    _assert_names_the_url(caught.value, down, own_redis.port)
    with engine.connect() as connection:
        statuses = connection.execute(select(DeadLetter.status)).scalars().all()
    assert sorted(statuses) == ["dead", "dead"]


def test_broker_unavailable_is_a_connection_error_that_rebuilds_from_its_args() -> None:
    error = BrokerUnavailable("redis://:***@cache:6379/0", "Connection refused", "broker")
    assert isinstance(error, ConnectionError)
    again = type(error)(*error.args)
    assert str(again) == str(error)
    assert (again.url, again.service, again.reason) == (error.url, "broker", "Connection refused")
    assert "redis://:***@cache:6379/0" in str(error)
    assert "Check" in str(error)


@pytest.fixture
def no_check(monkeypatch: pytest.MonkeyPatch) -> None:
    """The service goes down after the check before the send found it up: skip the check, so
    the send is the first to meet the outage (the rest is real)."""
    import taskkit.tasks._batch
    import taskkit.tasks._runs

    for module in (taskkit.tasks._runs, taskkit.tasks._batch):
        monkeypatch.setattr(module, "check_reachable", lambda app: None, raising=False)


@pytest.mark.timeout(15)
@pytest.mark.parametrize("down", ["broker", "result backend"])
def test_an_outage_met_by_the_send_deletes_the_new_run_again(
    down: str, own_redis: OwnRedis, db_url: str, engine: Engine, no_check: None,
    cleanup_queues: list[str],
) -> None:  # fmt: skip
    url = _unreachable("killed", own_redis)
    kit = OutageApp(
        db_url,
        broker=url if down == "broker" else REDIS_URL,
        backend=url if down == "result backend" else REDIS_URL,
    )
    cleanup_queues.append(kit.queue)
    with pytest.raises(BrokerUnavailable) as caught:
        submit_run(kit.train, {"epochs": 1}, name="outage", database_url=db_url)
    _assert_names_the_url(caught.value, down, own_redis.port)
    assert _count(engine, ModelRun) == 0


@pytest.mark.timeout(15)
def test_an_outage_met_by_the_resume_send_puts_the_run_back(
    own_redis: OwnRedis, db_url: str, engine: Engine, no_check: None,
    cleanup_queues: list[str],
) -> None:  # fmt: skip
    up = OutageApp(db_url, broker=REDIS_URL, backend=REDIS_URL)
    cleanup_queues.append(up.queue)
    run_id, task_id = submit_run(up.train, {"epochs": 1}, name="outage", database_url=db_url)
    kit = OutageApp(db_url, broker=REDIS_URL, backend=_unreachable("killed", own_redis))
    _fail_and_hand_to(engine, kit.train.name)
    with pytest.raises(BrokerUnavailable):
        resume_run(kit.app, run_id, require_checkpoint=False, database_url=db_url)
    with engine.connect() as connection:
        row = connection.execute(
            select(ModelRun.status, ModelRun.task_id, ModelRun.error_message)
        ).one()
    assert tuple(row) == ("failed", task_id, "worker died")


@pytest.mark.timeout(15)
def test_an_outage_met_by_the_batch_send_deletes_the_batch_again(
    own_redis: OwnRedis, db_url: str, engine: Engine, no_check: None,
    cleanup_queues: list[str],
) -> None:  # fmt: skip
    kit = OutageApp(db_url, broker=_unreachable("killed", own_redis), backend=REDIS_URL)
    with pytest.raises(BrokerUnavailable) as caught:
        submit_batch(kit.score, [{"id": i} for i in range(10)], chunk_size=3, batch_id="b-out")
    assert "the batch was not recorded" in str(caught.value)
    assert _count(engine, Batch) == 0


def test_a_send_refused_for_another_reason_records_the_run_failed_with_it(
    db_url: str, engine: Engine, cleanup_queues: list[str]
) -> None:
    kit = OutageApp(db_url, broker=REDIS_URL, backend=REDIS_URL)
    cleanup_queues.append(kit.queue)
    with pytest.raises(TypeError):  # a countdown that is not a number: not an outage
        submit_run(kit.train, {}, name="odd", database_url=db_url, countdown="soon")
    with engine.connect() as connection:
        status, error = connection.execute(select(ModelRun.status, ModelRun.error_message)).one()
    assert status == "failed"
    assert error.startswith("could not be sent:")


class KillsTheBrokerWhenRead:
    """Items that take the broker away when item ``at`` is read (on the second reading for a
    list: ``submit_batch`` reads a sized collection once for its keys, then to send it)."""

    def __init__(self, server: OwnRedis, count: int, at: int, *, sized: bool) -> None:
        self.server, self.count, self.at, self.sized = server, count, at, sized
        self.readings = 0

    def __len__(self) -> int:
        if not self.sized:
            raise TypeError("not sized")
        return self.count

    def __iter__(self) -> Iterator[dict[str, int]]:
        self.readings += 1
        for i in range(self.count):
            if i == self.at and (self.readings == 2 or not self.sized):
                self.server.kill()
            yield {"id": i}


@pytest.mark.timeout(15)
@pytest.mark.parametrize("sized", [False, True], ids=["generator", "list"])
def test_an_outage_partway_through_a_batch_leaves_the_batch_saying_what_was_sent(
    sized: bool, own_redis: OwnRedis, db_url: str, engine: Engine, cleanup_queues: list[str]
) -> None:
    kit = OutageApp(db_url, broker=own_redis.url, backend=REDIS_URL)
    items = KillsTheBrokerWhenRead(own_redis, 30, 20, sized=sized)
    source = items if sized else iter(items)

    with pytest.raises(BrokerUnavailable) as caught:
        submit_batch(kit.score, source, chunk_size=10, batch_id="b-partway")

    _assert_names_the_url(caught.value, "broker", own_redis.port)
    assert "the 2 chunk(s) sent before the failure (20 items) run under batch" in str(caught.value)
    with engine.connect() as connection:
        row = connection.execute(select(Batch.total, Batch.chunks, Batch.task_name)).one()
    assert tuple(row) == (20, 2, kit.score.name)
