"""Crash tests: worker subprocesses on the real Redis broker are SIGKILLed mid-task.

Every count (runs, completions, the process that ran a task) is read from Redis, where the
tasks wrote it; nothing is inferred from logs.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator

import pytest

from tests._support.workers import WorkerProcess, wait_for
from tests.tasks import apps

pytestmark = pytest.mark.usefixtures("redis_url")


@pytest.fixture
def workers(tmp_path) -> Iterator[list[WorkerProcess]]:
    """Started workers are stopped after the test; their logs are printed (pytest shows them
    when the test fails)."""
    started: list[WorkerProcess] = []
    yield started
    for worker in started:
        worker.stop()
        print(f"--- log of worker {worker.name} ---\n{worker.log()[-4000:]}")


def start(workers, tmp_path, name, **kwargs) -> WorkerProcess:
    worker = WorkerProcess(name, tmp_path, queue=apps.QUEUE, **kwargs)
    workers.append(worker)
    worker.wait_ready()
    return worker


def pids(name: str) -> list[int]:
    return [int(p) for p in apps.counter.lrange(apps.key("pids", name), 0, -1)]


def done(name: str) -> int:
    return int(apps.counter.get(apps.key("done", name)) or 0)


def token(name: str, run: int) -> int:
    return int(apps.counter.get(apps.key("token", name, run)) or 0)


def test_sigkill_of_the_pool_process_runs_the_task_again_to_completion(workers, tmp_path):
    start(workers, tmp_path, "pool-kill", concurrency=1)
    result = apps.long_job.delay("pool-kill", 3.0)
    wait_for(lambda: apps.runs("pool-kill") == 1, 30, "the task to start")
    (victim,) = pids("pool-kill")
    os.kill(victim, signal.SIGKILL)

    assert result.get(timeout=60) == 2
    assert apps.runs("pool-kill") == 2
    assert done("pool-kill") == 1
    first, second = pids("pool-kill")
    assert first == victim
    assert second != victim
    # The dead process's lease was taken over at once, with a larger fencing token.
    assert token("pool-kill", 2) > token("pool-kill", 1) > 0


def test_a_task_that_kills_its_process_every_time_stops_after_max_retries(workers, tmp_path):
    start(workers, tmp_path, "poison", concurrency=1)
    result = apps.kills_its_process.delay("poison", 100)
    with pytest.raises(Exception, match="Worker exited prematurely"):
        result.get(timeout=60)
    # max_retries=2: the first run and two retries, then a recorded failure; no loop.
    assert apps.retries_seen("poison") == [0, 1, 2]
    time.sleep(3)  # room for a wrong fourth run
    assert apps.runs("poison") == 3


@pytest.mark.parametrize("extend", ["true", "false"], ids=["keeper", "lease-only"])
def test_a_task_three_times_longer_than_the_visibility_timeout_runs_once(workers, tmp_path, extend):
    """With the keeper, the message is never redelivered; without it, Redis redelivers it
    every 5 s and the lease drops each copy. Either way the body runs once."""
    env = {"TASKKIT_TEST_VISIBILITY": "5", "TASKKIT_EXTEND_VISIBILITY": extend}
    start(workers, tmp_path, "long-a", env=env, concurrency=2)
    start(workers, tmp_path, "long-b", env=env)  # idle, ready to take a redelivered copy
    name = f"long-{extend}"
    result = apps.long_job.delay(name, 15.0)
    assert result.get(timeout=90) == 1
    time.sleep(6)  # one more visibility timeout: a stray copy would start now
    assert apps.runs(name) == 1
    assert done(name) == 1
    if extend == "true":
        assert apps.deliveries(result.id) == 1
    else:
        assert apps.deliveries(result.id) >= 3  # redelivered, and dropped by the lease


def test_a_killed_workers_task_is_taken_over_by_another_within_60_seconds(workers, tmp_path):
    # taskkit's default settings: 30 s visibility timeout, 5 s restore sweep, 15 s lease.
    env = {"TASKKIT_TEST_VISIBILITY": "30", "TASKKIT_TEST_LEASE_TTL": "15"}
    first = start(workers, tmp_path, "takeover-a", env=env)
    second = start(workers, tmp_path, "takeover-b", env=env)
    result = apps.long_job.delay("takeover", 6.0)
    wait_for(lambda: apps.runs("takeover") == 1, 30, "the task to start")
    (pid,) = pids("takeover")
    owner, survivor = (first, second) if pid in first.children() else (second, first)
    assert pid in owner.children()

    owner.kill()
    killed_at = time.monotonic()
    took = wait_for(lambda: apps.runs("takeover") == 2, 90, "the takeover")
    print(f"taken over {took:.1f}s after the kill")
    assert took < 60
    assert pids("takeover")[1] in survivor.children()

    assert result.get(timeout=60) == 2
    time.sleep(2)
    assert done("takeover") == 1
    assert apps.runs("takeover") == 2
    assert time.monotonic() - killed_at < 90


def _held_message(name: str) -> tuple[str, str]:
    """The raw message of the task now running, as the Redis transport keeps it (tag, entry)."""
    unacked = apps.counter.hgetall(f"{apps.PREFIX}:unacked")
    for tag, entry in unacked.items():
        payload = json.loads(entry)[0]
        args = payload["headers"].get("argsrepr", "")
        if repr(name) in args:
            return tag.decode(), entry.decode()
    raise AssertionError(f"no unacknowledged message for {name!r} among {len(unacked)}")


def _redeliver(entry: str) -> None:
    """Put a copy back on the queue exactly as kombu's restore does (``redelivered`` set)."""
    payload, _exchange, _routing_key = json.loads(entry)
    payload["headers"]["redelivered"] = True
    payload["properties"]["delivery_info"]["redelivered"] = True
    apps.counter.lpush(f"{apps.PREFIX}:{apps.QUEUE}", json.dumps(payload))


def test_a_redelivered_copy_of_a_task_that_succeeded_does_not_run_again(workers, tmp_path):
    start(workers, tmp_path, "redeliver", concurrency=1)
    result = apps.long_job.delay("succeeded", 1.0)
    wait_for(lambda: apps.runs("succeeded") == 1, 30, "the task to start")
    _tag, entry = _held_message("succeeded")
    assert result.get(timeout=30) == 1

    _redeliver(entry)
    wait_for(
        lambda: apps.counter.llen(f"{apps.PREFIX}:{apps.QUEUE}") == 0, 30, "the copy to be taken"
    )
    wait_for(
        lambda: not apps.counter.hlen(f"{apps.PREFIX}:unacked"), 30, "the copy to be acknowledged"
    )
    assert apps.runs("succeeded") == 1
    assert done("succeeded") == 1
    assert result.state == "SUCCESS"


def test_a_copy_of_a_task_whose_owner_is_alive_is_dropped_and_nothing_runs_twice(workers, tmp_path):
    start(workers, tmp_path, "dup", concurrency=2)
    result = apps.long_job.delay("dup", 4.0)
    wait_for(lambda: apps.runs("dup") == 1, 30, "the task to start")
    _tag, entry = _held_message("dup")
    _redeliver(entry)  # the other pool process takes it while the first still runs

    assert result.get(timeout=60) == 1
    # The watcher copy comes back after the lease ttl, finds the success, and is dropped.
    time.sleep(8)
    assert apps.runs("dup") == 1
    assert done("dup") == 1
