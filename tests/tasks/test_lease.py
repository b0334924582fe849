"""Lease stores against a real Redis and real lock files: exclusivity, fencing, takeover."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid

import pytest
import redis

from taskkit.errors import ConfigurationError, LeaseLost
from taskkit.tasks import FileLeaseStore, LeaseOwner, RedisLeaseStore
from taskkit.tasks._lease import lease_store_from_url


@pytest.fixture
def redis_store(redis_url):
    client = redis.Redis.from_url(redis_url)
    prefix = f"tk-lease-{uuid.uuid4().hex[:8]}"
    yield RedisLeaseStore(client, prefix=prefix)
    for key in client.scan_iter(f"{prefix}:*"):
        client.delete(key)


@pytest.fixture(params=["redis", "file"])
def store(request, tmp_path):
    if request.param == "redis":
        return request.getfixturevalue("redis_store")
    return FileLeaseStore(tmp_path / "leases")


def dead_pid() -> int:
    """The pid of a process of this host that has exited."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_one_owner_at_a_time_and_tokens_only_grow(store):
    first = store.acquire("run-1", LeaseOwner.here("t1"), ttl=10)
    assert first is not None
    assert store.acquire("run-1", LeaseOwner.here("t2"), ttl=10) is None
    assert store.holder("run-1") == LeaseOwner.here("t1")
    first.release()
    second = store.acquire("run-1", LeaseOwner.here("t2"), ttl=10)
    assert second is not None
    assert second.token > first.token
    second.release()
    assert store.holder("run-1") is None


def test_a_live_owner_in_another_process_keeps_the_lease(store, tmp_path):
    script = (
        "import sys, time\n"
        "from taskkit.tasks import LeaseOwner, FileLeaseStore, RedisLeaseStore\n"
        "import redis\n"
        f"kind, arg, prefix = {type(store).__name__!r}, sys.argv[1], sys.argv[2]\n"
        "store = (FileLeaseStore(__import__('pathlib').Path(arg)) if kind == 'FileLeaseStore'\n"
        "         else RedisLeaseStore(redis.Redis.from_url(arg), prefix=prefix))\n"
        "lease = store.acquire('run-2', LeaseOwner.here('owner'), ttl=10)\n"
        "print('held', flush=True)\n"
        "time.sleep(60)\n"
    )
    if isinstance(store, FileLeaseStore):
        arg, prefix = str(store.directory), ""
    else:
        kwargs = store.client.connection_pool.connection_kwargs
        arg, prefix = f"redis://{kwargs['host']}:{kwargs['port']}/{kwargs['db']}", store.prefix
    owner = subprocess.Popen(
        [sys.executable, "-c", script, arg, prefix], stdout=subprocess.PIPE, text=True
    )
    try:
        assert owner.stdout is not None
        assert owner.stdout.readline().strip() == "held"
        assert store.acquire("run-2", LeaseOwner.here("intruder"), ttl=10) is None
        holder = store.holder("run-2")
        assert holder is not None
        assert holder.pid == owner.pid
        owner.kill()
        owner.wait()
        # The owner is provably dead (same host, process gone): taken over at once.
        lease = store.acquire("run-2", LeaseOwner.here("successor"), ttl=10)
        assert lease is not None
        lease.release()
    finally:
        owner.kill()


def test_a_dead_owner_recorded_in_redis_is_replaced_with_a_larger_token(redis_store):
    ghost = LeaseOwner(task_id="t-dead", host=LeaseOwner.here("x").host, pid=dead_pid())
    held = redis_store.acquire("run-3", ghost, ttl=60)
    assert held is not None
    taken = redis_store.acquire("run-3", LeaseOwner.here("t-new"), ttl=60)
    assert taken is not None
    assert taken.token > held.token
    assert redis_store.holder("run-3").task_id == "t-new"
    # The ghost's heartbeat now finds the lease gone: it is lost, and check() says so.
    assert held.renew() is False
    assert held.lost
    with pytest.raises(LeaseLost, match="run-3"):
        held.check()
    held.release()  # must not delete the new owner's lease
    assert redis_store.holder("run-3").task_id == "t-new"
    taken.release()


def test_an_owner_on_another_host_is_waited_out_until_its_lease_expires(redis_store):
    remote = LeaseOwner(task_id="t-remote", host="some-other-host", pid=1)
    assert redis_store.acquire("run-4", remote, ttl=1) is not None
    assert redis_store.acquire("run-4", LeaseOwner.here("t-local"), ttl=10) is None
    deadline = time.monotonic() + 5
    lease = None
    while lease is None and time.monotonic() < deadline:
        time.sleep(0.1)
        lease = redis_store.acquire("run-4", LeaseOwner.here("t-local"), ttl=10)
    assert lease is not None  # expired, since nobody renewed it
    lease.release()


def test_the_heartbeat_keeps_a_short_lease_alive(redis_store):
    lease = redis_store.acquire("run-5", LeaseOwner.here("t"), ttl=1)
    assert lease is not None
    with lease.kept_alive():
        time.sleep(2.5)  # well past the ttl: only the heartbeat keeps it
        assert redis_store.acquire("run-5", LeaseOwner(task_id="x", host="h", pid=1), 1) is None
        assert not lease.lost
    assert redis_store.holder("run-5") is None


def test_file_store_hashes_keys_so_a_run_id_cannot_escape_the_directory(tmp_path):
    store = FileLeaseStore(tmp_path / "leases")
    lease = store.acquire("../../etc/passwd", LeaseOwner.here("t"), ttl=5)
    assert lease is not None
    assert [p.parent for p in (tmp_path / "leases").iterdir()] == [tmp_path / "leases"]
    lease.release()


def test_lease_url_schemes(tmp_path):
    assert isinstance(lease_store_from_url((tmp_path / "l").as_uri()), FileLeaseStore)
    assert isinstance(lease_store_from_url("redis://127.0.0.1:6379/0"), RedisLeaseStore)
    with pytest.raises(ConfigurationError, match="TASKKIT_LEASE_URL"):
        lease_store_from_url("zookeeper://x")


def test_a_task_whose_lease_is_taken_over_stops_at_its_next_progress_report(worker):
    from tests._support.workers import wait_for
    from tests.tasks import apps

    result = apps.long_job.delay("stolen", 4.0)
    wait_for(lambda: apps.runs("stolen") == 1, 30, "the task to start")
    lease_key = f"taskkit:lease:{apps.long_job.name}:stolen"
    # Another worker takes the lease over (as after a partition): its value replaces ours.
    assert apps.counter.get(lease_key) is not None
    apps.counter.set(lease_key, '99|{"host": "elsewhere", "pid": 1, "task_id": "other"}', ex=60)
    # The heartbeat (every lease_ttl / 3 = 2 s) notices; the next progress report stops the task.
    with pytest.raises(LeaseLost, match="stolen"):
        result.get(timeout=30)
    assert apps.runs("stolen") == 1
    assert int(apps.counter.get(apps.key("done", "stolen")) or 0) == 0  # it never finished
    assert apps.counter.get(lease_key).startswith(b"99|")  # and left the new owner's lease alone
    apps.counter.delete(lease_key)


def test_a_task_whose_lease_vanishes_with_no_new_owner_is_run_again(worker):
    from tests._support.workers import wait_for
    from tests.tasks import apps

    result = apps.long_job.delay("vanished", 3.0)
    wait_for(lambda: apps.runs("vanished") == 1, 30, "the task to start")
    lease_key = f"taskkit:lease:{apps.long_job.name}:vanished"
    assert apps.counter.get(lease_key) is not None
    apps.counter.delete(lease_key)  # what a Redis restart without persistence does
    # The heartbeat notices, the next progress report stops the task, and since nobody holds
    # the lease the task is re-queued instead of failing: the second run completes.
    assert result.get(timeout=60) == 2
    assert apps.runs("vanished") == 2
    assert int(apps.counter.get(apps.key("done", "vanished")) or 0) == 1
