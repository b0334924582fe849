"""Fleet limits on ResilientTask across real worker subprocesses on real Redis."""

from __future__ import annotations

import pathlib
from collections.abc import Iterator

import pytest
from celery.result import AsyncResult

from taskkit.recovery import FleetConcurrency
from tests._support.apps import RedisTestApp
from tests._support.workers import WorkerProcess, wait_for


@pytest.fixture
def two_workers(
    fleet_app: RedisTestApp, tmp_path: pathlib.Path, redis_url: str
) -> Iterator[list[WorkerProcess]]:
    workers = [
        WorkerProcess(
            f"fleet{i}",
            tmp_path,
            app="tests.fleet.apps",
            queue=fleet_app.queue,
            concurrency=2,
            env={"TASKKIT_TEST_LEASE_TTL": "3"},
        )
        for i in range(2)
    ]
    try:
        for worker in workers:
            worker.wait_ready()
        yield workers
    finally:
        for worker in workers:
            worker.stop()


def _retries(kit: RedisTestApp, name: str) -> list[int]:
    return [int(r) for r in kit.counter.lrange(kit.key("retries", name), 0, -1)]


def test_concurrency_never_exceeded_across_two_workers(
    fleet_app: RedisTestApp, two_workers: list[WorkerProcess]
) -> None:
    from tests.fleet.apps import slotted

    kit = fleet_app
    kit.counter.delete(kit.key("running"), kit.key("max_running"), kit.key("retries", "slotted"))
    results = [slotted.delay(0.3) for _ in range(12)]
    assert [r.get(timeout=120) for r in results] == ["done"] * 12
    assert int(kit.counter.get(kit.key("max_running")) or 0) <= 2
    # Four pool processes, two slots: some deliveries were throttled, none counted a retry.
    assert any("over its fleet concurrency limit" in w.log() for w in two_workers)
    assert _retries(kit, "slotted") == [0] * 12
    assert all(AsyncResult(r.id, app=kit.app).state == "SUCCESS" for r in results)


def test_rate_limited_calls_are_requeued_not_retried(
    fleet_app: RedisTestApp, two_workers: list[WorkerProcess]
) -> None:
    from tests.fleet.apps import rated

    kit = fleet_app
    kit.counter.delete(kit.key("retries", "rated"))
    results = [rated.delay(n) for n in range(30)]
    assert [r.get(timeout=120) for r in results] == list(range(30))
    assert any("over its fleet rate limit" in w.log() for w in two_workers)
    assert _retries(kit, "rated") == [0] * 30  # each body ran once, with request.retries == 0


def test_a_killed_holders_slot_is_freed_by_expiry(
    fleet_app: RedisTestApp, tmp_path: pathlib.Path, redis_url: str
) -> None:
    from tests.fleet.apps import hog

    kit = fleet_app
    # A queue of its own: the killed worker's 600 s task comes back after the visibility
    # timeout, and must not reach a later test's worker on the shared queue.
    queue = f"{kit.queue}-hog"
    worker = WorkerProcess(
        "hog",
        tmp_path,
        app="tests.fleet.apps",
        queue=queue,
        concurrency=1,
        env={"TASKKIT_TEST_LEASE_TTL": "2"},
    )
    try:
        worker.wait_ready()
        hog.apply_async(("acme", 600), queue=queue)
        wait_for(lambda: kit.counter.get(kit.key("hog_started", "acme")), 60, "hog to start")
    finally:
        worker.kill()
    # The same limit, as another host sees it: the dead holder's slot is taken...
    limit = FleetConcurrency(redis_url, hog.name, 1, ttl=2)
    assert limit.holders("acme") == 1
    slot, decision = limit.acquire("acme")
    if slot is not None:  # the slot had already expired (a slow test machine): still freed
        slot.release()
    else:
        assert not decision.allowed
        # ...and freed ttl after its last heartbeat, with nobody releasing it.
        wait_for(lambda: limit.acquire("acme")[0] is not None, 30, "the slot to expire")
