"""Redelivered chunks: a killed chunk runs again first; a duplicate chunk is not a failure.

One worker subprocess (prefork, concurrency 2) on the real Redis broker, a batch of 52 one-item
chunks whose item sleeps a few seconds: two chunks run, 50 wait in the queue. The pool process
running one chunk is killed; the next chunk to start must be the killed one, not one of the 50
(Celery's own worker-lost retry sends it to the back of the queue, behind all of them). The
order of the chunk starts is read from Redis, where the workers write it (``tests.batch.apps``),
and the killed chunk must start again within 5 s of the kill (issue 15's bound; the median of
5 kills is measured by ``benchmarks/bench_batch.py``).

The same on the embedded default broker (``taskkit+sqlite`` under a temporary ``TASKKIT_HOME``,
``tests.batch.embedded_apps``): there the transport puts the copy at the front of its queue in
the SQLite file (``Channel._put_front``).

A second delivery of a chunk under another task id, while the first runs, finds the chunk's
lease (task, batch, offset) held: it is dropped as a duplicate (``taskkit.tasks._duplicates``),
its items are not dead-lettered, and each item runs once.
"""

from __future__ import annotations

import os
import signal
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from taskkit.config import reset_settings
from taskkit.db.migrate import upgrade
from taskkit.db.session import dispose_engines
from taskkit.deadletter import DeadLetterStore
from taskkit.tasks import duplicate_count, submit_batch
from tests._support.workers import WorkerProcess, wait_for
from tests.batch import apps

#: Chunks waiting in the queue while the two pool processes run one each.
QUEUED = 50
#: Seconds each chunk's single item sleeps: long enough that the chunk still running in the other
#: process cannot finish (and take a queued chunk) before the killed one is sent again.
PAUSE = 6.0
#: Seconds from the kill until the killed chunk starts again (issue 15: under 5 s).
BOUND = 5.0


@pytest.fixture
def queue() -> Iterator[str]:
    """A queue of the test's own (its leftover chunks are deleted afterwards, so no later test's
    worker runs them)."""
    name = f"{apps.QUEUE}-requeue-{uuid.uuid4().hex[:8]}"
    yield name
    for key in apps.counter.scan_iter(f"{apps.PREFIX}:{name}*"):
        apps.counter.delete(key)


@pytest.fixture
def worker(
    env: dict[str, str], queue: str, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[WorkerProcess]:
    worker = WorkerProcess("requeue", tmp_path, app="tests.batch.apps", queue=queue, concurrency=2)
    try:
        worker.wait_ready()
        yield worker
    finally:
        worker.kill()  # the chunks left would take minutes; nothing of them is checked
        worker.stop()
        report = getattr(request.node, "rep_call", None)
        if report is not None and report.failed:
            print("\n".join(line[:400] for line in worker.log().splitlines()[-80:]))


def starts(batch_id: str) -> list[dict[str, Any]]:
    return [e for e in apps.chunk_events(batch_id) if e["event"] == "start"]


def test_a_killed_chunk_runs_again_before_the_queued_chunks(
    worker: WorkerProcess, queue: str
) -> None:
    items = [{"id": n, "nonce": uuid.uuid4().hex[:8], "pause": PAUSE} for n in range(QUEUED + 2)]
    submission = submit_batch(apps.flaky_items, items, chunk_size=1, queue=queue)
    batch_id = submission.batch_id

    wait_for(lambda: len(starts(batch_id)) == 2, 30, "two chunks to start")
    victim = starts(batch_id)[0]
    # Kill it inside its item (a PAUSE-long sleep), not between the chunk's start and the item:
    # the item's first run is then counted, and the copy's run is the second.
    nonce = items[victim["offset"]]["nonce"]
    wait_for(lambda: apps.runs(nonce), 30, "the killed chunk's item to start")
    os.kill(victim["pid"], signal.SIGKILL)
    killed_at = time.time()
    running = {e["offset"] for e in starts(batch_id)}

    def after_kill() -> list[dict[str, Any]]:
        return starts(batch_id)[2:]

    wait_for(after_kill, 60, "a chunk to start after the kill")
    first = after_kill()[0]
    print(f"\nfirst chunk started {first['time'] - killed_at:.2f} s after the kill: {first}")
    assert first["offset"] == victim["offset"], (
        f"chunk {first['offset']} (queued) started before the killed chunk "
        f"{victim['offset']} ran again"
    )
    assert first["time"] - killed_at < BOUND, (
        f"the killed chunk started again {first['time'] - killed_at:.2f} s after the kill"
    )
    assert first["retries"] == victim["retries"] + 1  # a worker-lost retry, counted
    assert first["pid"] != victim["pid"]
    assert running == {e["offset"] for e in starts(batch_id)[:2]}

    # The copy ran the chunk (it took the dead process's lease over), it was not dropped.
    wait_for(
        lambda: any(
            e["event"] == "end" and e["offset"] == victim["offset"]
            for e in apps.chunk_events(batch_id)
        ),
        PAUSE + 30,
        "the killed chunk's second run to end",
    )
    (end,) = [
        e
        for e in apps.chunk_events(batch_id)
        if e["event"] == "end" and e["offset"] == victim["offset"]
    ]
    assert end["state"] == "SUCCESS"
    assert apps.runs(items[victim["offset"]]["nonce"]) == {victim["offset"]: 2}


@pytest.fixture
def embedded_home(tmp_path: Path) -> Iterator[Path]:
    """The embedded default under a temporary ``TASKKIT_HOME``, for this process and its worker:
    no other ``TASKKIT_*`` variable (so the broker is ``taskkit+sqlite``), the database
    migrated, lease ttl 3 s."""
    home = tmp_path / "home"
    with pytest.MonkeyPatch.context() as patch:
        for name in list(os.environ):
            if name.startswith("TASKKIT_") and name != "TASKKIT_TEST_RUN":
                patch.delenv(name)
        patch.setenv("TASKKIT_HOME", str(home))
        patch.setenv("TASKKIT_LEASE_TTL", "3")
        reset_settings()
        upgrade()
        try:
            yield home
        finally:
            dispose_engines()
            reset_settings()
    reset_settings()


def test_on_the_embedded_broker_a_killed_chunk_runs_again_first_within_5_s(
    embedded_home: Path, tmp_path: Path
) -> None:
    sys.modules.pop("tests.batch.embedded_apps", None)  # its app reads this test's home
    from tests.batch import embedded_apps

    assert str(embedded_apps.app.conf.broker_url).startswith("taskkit+sqlite:")
    worker = WorkerProcess(
        "requeue-embedded", tmp_path, app="tests.batch.embedded_apps", concurrency=2
    )
    try:
        worker.wait_ready()
        items = [{"id": n, "pause": PAUSE} for n in range(QUEUED + 2)]
        submit_batch(embedded_apps.naps, items, chunk_size=1)

        def starts() -> list[dict[str, Any]]:
            return embedded_apps.events("chunks.jsonl")

        wait_for(lambda: len(starts()) == 2, 30, "two chunks to start")
        victim = starts()[0]
        wait_for(
            lambda: any(e["id"] == victim["offset"] for e in embedded_apps.events("items.jsonl")),
            30,
            "the killed chunk's item to start",
        )
        os.kill(victim["pid"], signal.SIGKILL)
        killed_at = time.time()
        wait_for(lambda: len(starts()) > 2, 60, "a chunk to start after the kill")
        first = starts()[2]
        print(f"\nfirst chunk started {first['time'] - killed_at:.2f} s after the kill: {first}")
        assert first["offset"] == victim["offset"], (
            f"chunk {first['offset']} (queued) started before the killed chunk "
            f"{victim['offset']} ran again"
        )
        assert first["retries"] == victim["retries"] + 1  # a worker-lost retry, counted
        assert first["pid"] != victim["pid"]
        assert first["time"] - killed_at < BOUND, (
            f"the killed chunk started again {first['time'] - killed_at:.2f} s after the kill"
        )
    except BaseException:
        print("\n".join(line[:400] for line in worker.log().splitlines()[-80:]))
        raise
    finally:
        worker.kill()  # the chunks left would take minutes; nothing of them is checked
        worker.stop()


def test_a_duplicate_chunk_delivery_is_dropped_and_dead_letters_nothing(
    worker: WorkerProcess, queue: str, env: dict[str, str]
) -> None:
    nonce = uuid.uuid4().hex[:8]
    items = [{"id": n, "nonce": nonce, "pause": 1.5} for n in (1, 2, 3)]
    batch_id = uuid.uuid4().hex
    arguments = {"batch_id": batch_id, "offset": 0}
    before = duplicate_count(apps.flaky_items)
    owner = apps.flaky_items.apply_async((items,), arguments, queue=queue)
    wait_for(lambda: starts(batch_id), 30, "the chunk to start")

    duplicate = apps.flaky_items.apply_async((items,), arguments, queue=queue)

    wait_for(lambda: duplicate.state == "IGNORED", 30, "the duplicate to be dropped")
    summary = owner.get(timeout=60)
    assert (summary["successful"], summary["failed"], summary["skipped"]) == (3, 0, 0)
    assert duplicate.state == "IGNORED"
    assert duplicate.info["duplicate_of"] == owner.id
    assert duplicate_count(apps.flaky_items) == before + 1
    store = DeadLetterStore(env["TASKKIT_DATABASE_URL"])
    assert store.list(batch_id=batch_id, status=None) == []
    assert store.list(task=apps.flaky_items.name, status=None) == []
    assert apps.runs(nonce) == {1: 1, 2: 1, 3: 1}


def test_a_message_that_cannot_be_copied_is_left_to_celerys_retry() -> None:
    """Another transport's message, or a task-protocol-1 one (retries in the body), is not
    copied: ``requeue_at_front`` says so and Celery's own retry sends it (pure logic)."""
    from taskkit.tasks._requeue import requeue_at_front

    class RedisLikeChannel:
        def _lookup(self, *_: object) -> list[str]:
            return ["q"]

        def _get_message_priority(self, *_: object, **__: object) -> int:
            return 0

        def _q_for_pri(self, queue: str, _: int) -> str:
            return queue

        def conn_or_acquire(self) -> object:
            raise AssertionError("nothing may be pushed")

    class Message:
        def __init__(self, raw: object, channel: object) -> None:
            self._raw, self.channel = raw, channel

    protocol_1 = {"headers": {}, "properties": {"delivery_info": {}}, "body": "..."}
    assert requeue_at_front(Message(protocol_1, RedisLikeChannel()), 1) is False
    assert requeue_at_front(Message({"headers": {}}, object()), 1) is False
    assert requeue_at_front(object(), 1) is False
