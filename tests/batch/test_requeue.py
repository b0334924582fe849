"""A chunk whose pool process is SIGKILLed runs again before the chunks still queued.

One worker subprocess (prefork, concurrency 2) on the real Redis broker, a batch of 52 one-item
chunks whose item sleeps a few seconds: two chunks run, 50 wait in the queue. The pool process
running one chunk is killed; the next chunk to start must be the killed one, not one of the 50
(Celery's own worker-lost retry sends it to the back of the queue, behind all of them). The
order of the chunk starts is read from Redis, where the workers write it (``tests.batch.apps``);
no timing is asserted (the seconds are measured by ``benchmarks/bench_batch.py``).
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from taskkit.tasks import submit_batch
from tests._support.workers import WorkerProcess, wait_for
from tests.batch import apps

#: Chunks waiting in the queue while the two pool processes run one each.
QUEUED = 50
#: Seconds each chunk's single item sleeps: long enough that the chunk still running in the other
#: process cannot finish (and take a queued chunk) before the killed one is sent again.
PAUSE = 6.0


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
    assert first["retries"] == victim["retries"] + 1  # a worker-lost retry, counted
    assert first["pid"] != victim["pid"]
    assert running == {e["offset"] for e in starts(batch_id)[:2]}
