"""A delivery the lease turns away is a duplicate, not a failure (``taskkit.tasks._duplicates``).

Worker subprocesses on the real Redis broker, leases in Redis, dead letters in this run's
PostgreSQL schema. Counts (runs, completions) are read from Redis where the task wrote them.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from taskkit.deadletter import DeadLetterStore
from taskkit.tasks import duplicate_count, duplicate_dropped
from tests._support.workers import WorkerProcess, wait_for
from tests.tasks import apps

pytestmark = pytest.mark.usefixtures("redis_url")


@pytest.fixture
def worker(pg_schema_url: str, tmp_path: Path) -> Iterator[WorkerProcess]:
    """One worker, two pool processes (the owner and the duplicate run side by side), whose
    dead letters go to this run's schema."""
    worker = WorkerProcess(
        "dupes",
        tmp_path,
        queue=apps.QUEUE,
        concurrency=2,
        env={"TASKKIT_DATABASE_URL": pg_schema_url},
    )
    try:
        worker.wait_ready()
        yield worker
    finally:
        worker.stop()
        print(f"--- log of worker {worker.name} ---\n{worker.log()[-4000:]}")


def test_a_second_task_for_a_held_lease_is_dropped_and_counted_not_failed(
    worker: WorkerProcess, pg_schema_url: str
) -> None:
    name = f"dupe-{uuid.uuid4().hex[:8]}"
    before = duplicate_count(apps.long_job)
    owner = apps.long_job.delay(name, 4.0)
    wait_for(lambda: apps.runs(name) == 1, 30, "the owner to start")

    duplicate = apps.long_job.delay(name, 0.1)  # the same lease key, another task id

    wait_for(lambda: duplicate.state == "IGNORED", 30, "the duplicate to be dropped")
    assert duplicate.info == {
        "duplicate_of": owner.id,
        "lease": f"{apps.long_job.name}:{name}",
        "holder": duplicate.info["holder"],
    }
    assert owner.id in duplicate.info["holder"]
    assert owner.get(timeout=60) == 1
    assert apps.runs(name) == 1  # the work ran once, by its owner
    assert int(apps.counter.get(apps.key("done", name)) or 0) == 1
    assert duplicate.state == "IGNORED"  # not FAILURE, and nothing ran it later
    assert duplicate_count(apps.long_job) == before + 1
    letters = DeadLetterStore(pg_schema_url).list(task=apps.long_job.name, status=None)
    assert [letter for letter in letters if letter.task_id == duplicate.id] == []
    log = worker.log()
    assert f"{duplicate.id}] is a duplicate" in log
    assert not [line for line in log.splitlines() if duplicate.id in line and "fail" in line]


def test_the_duplicate_signal_reaches_receivers_and_a_failing_receiver_is_only_logged() -> None:
    """The metrics hook: in process, with the same call the worker makes."""
    from taskkit.tasks import LeaseOwner
    from taskkit.tasks._duplicates import record_duplicate

    seen: list[dict[str, object]] = []

    def receiver(sender: object = None, **kwargs: object) -> None:
        seen.append({"sender": sender, **kwargs})

    def broken(sender: object = None, **kwargs: object) -> None:
        raise RuntimeError("metrics backend down")

    duplicate_dropped.connect(receiver, weak=False)
    duplicate_dropped.connect(broken, weak=False)
    holder = LeaseOwner("owner-id", "host", 1)
    before = duplicate_count(apps.long_job)
    try:
        record_duplicate(apps.long_job, "copy-id", "key-1", holder)
    finally:
        duplicate_dropped.disconnect(receiver)
        duplicate_dropped.disconnect(broken)
    assert seen == [
        {
            "sender": apps.long_job,
            "signal": duplicate_dropped,
            "task_id": "copy-id",
            "key": "key-1",
            "holder": holder,
        }
    ]
    assert duplicate_count(apps.long_job) == before + 1
