"""Issue 19, fleet limits under a partition: host A is cut off from the Redis that holds the
fleet limits (and leases) while it still reaches the broker. Failing closed, A runs none of
the limited tasks while it is cut off: each delivery is re-queued (not run, not failed) and
runs once A reaches that Redis again; with ``fleet_fail_open=True`` A runs them, unlimited.
Host B keeps running its share within the limits, and over the whole test the fleet's calls
stay within the rate limit and the concurrency limit.

The limits' Redis (``RedisOnLinks``, a server of the test's own) listens on an address of A's
link of its own (a /32 on the root side, routed in A's namespace), and on B's link. A is cut
off from it, and from it only, by a blackhole route to that address in A's namespace (the
broker, on the link's other address, stays reachable): A's packets to it go nowhere, as in a
partition.

A whole-link partition also cuts A off from the broker: A takes no new deliveries, and what it
holds comes back to B once its visibility lapses. The second test shows that the calls A had
booked rate slots for then run spaced on B, not as one burst."""

from __future__ import annotations

import importlib
import itertools
import pathlib
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import pytest

from taskkit.config import reset_settings
from tests._support.netns import Host, NamespacedWorker, RedisOnLinks, ip
from tests._support.workers import wait_for
from tests.fleet_hosts.conftest import Fleet
from tests.fleet_hosts.test_partition_batch import flush_redis

pytestmark = pytest.mark.timeout(120)

#: Calls of each limited task sent to each host.
RATED = 6
SLOTTED = 3
OPEN = 4
#: Slack of a run's start against its rate slot (Celery's countdown timer), in seconds.
TIMER_SLACK = 0.05


@dataclass
class Limits:
    """The Redis of the fleet limits, and the address of it on A's link."""

    server: RedisOnLinks
    a_address: str

    def url(self, host: Host, hosts: list[Host]) -> str:
        address = self.a_address if host is hosts[0] else host.root_ip
        return self.server.url(address)


def route(host: Host, address: str, *, cut: bool) -> None:
    """A blackhole route to ``address`` in ``host``'s namespace (``cut``), or the link's."""
    target = ["blackhole", f"{address}/32"] if cut else [f"{address}/32", "dev", host.veth + "p"]
    ip("-n", host.netns, "route", "replace", *target)


@pytest.fixture
def limits(fleet: Fleet) -> Iterator[Limits]:
    a, b = fleet.hosts[0], fleet.hosts[1]
    address = f"{a.root_ip.rsplit('.', 1)[0]}.100"
    ip("addr", "add", f"{address}/32", "dev", a.veth)
    try:
        route(a, address, cut=False)
        server = RedisOnLinks([address, b.root_ip], fleet.directory)
        try:
            yield Limits(server, address)
        finally:
            server.stop()
    finally:
        ip("-n", a.netns, "route", "del", f"{address}/32", check=False)
        ip("addr", "del", f"{address}/32", "dev", a.veth, check=False)


@pytest.fixture
def apps(fleet: Fleet, monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    """The hosts' app in this process (it only sends: Redis at 127.0.0.1)."""
    monkeypatch.setenv("TASKKIT_TEST_HOSTS_REDIS", fleet.redis.url())
    monkeypatch.setenv("TASKKIT_TEST_HOSTS_DIR", str(fleet.directory))
    reset_settings()
    flush_redis(fleet)
    yield importlib.import_module("tests.fleet_hosts.apps")
    reset_settings()
    flush_redis(fleet)


@pytest.fixture
def workers() -> Iterator[dict[str, NamespacedWorker]]:
    started: dict[str, NamespacedWorker] = {}
    yield started
    for worker in started.values():
        worker.kill()


def queue(host: Host) -> str:
    """Each host consumes a queue of its own: what is sent to A runs on A or nowhere."""
    return f"tk-hosts-{host.label}"


def calls(apps: ModuleType, nonce: str) -> list[tuple[str, int, str, float, float]]:
    """``(task, index, host, start, end)`` of every call of a limited task."""
    path = apps.hosts_dir() / f"calls-{nonce}"
    found = []
    for line in path.read_text().splitlines() if path.exists() else []:
        task, index, host, start, end = line.split()
        found.append((task, int(index), host, float(start), float(end)))
    return found


def test_a_host_cut_off_from_the_limits_redis_runs_no_limited_task(
    fleet: Fleet,
    limits: Limits,
    apps: ModuleType,
    workers: dict[str, NamespacedWorker],
    tmp_path: pathlib.Path,
) -> None:
    hosts = list(fleet.hosts.hosts)
    a = hosts[0]
    for host in hosts:
        env = {
            "TASKKIT_TEST_HOST": host.label,
            "TASKKIT_TEST_HOSTS_REDIS": fleet.redis.url(host.root_ip),
            "TASKKIT_TEST_HOSTS_LIMITS": limits.url(host, hosts),
            "TASKKIT_TEST_HOSTS_DIR": str(fleet.directory),
        }
        workers[host.label] = NamespacedWorker(
            host,
            f"limits-{host.label}",
            tmp_path,
            app="tests.fleet_hosts.apps",
            queue=queue(host),
            concurrency=2,
            env=env,
        )
    for worker in workers.values():
        worker.wait_ready()
    nonce = uuid.uuid4().hex[:12]
    counts = {"rated": RATED, "slotted": SLOTTED, "rated_open": OPEN}

    route(a, limits.a_address, cut=True)
    try:
        sent_at = time.time()
        sent: dict[tuple[str, str, int], Any] = {}
        for host in hosts:
            for name, count in counts.items():
                for index in range(count):
                    task = getattr(apps, name)
                    sent[name, host.label, index] = task.apply_async(
                        (nonce, index), queue=queue(host)
                    )

        def ran(name: str, host: str) -> int:
            return sum(1 for call in calls(apps, nonce) if call[0] == name and call[2] == host)

        def requeued(name: str) -> bool:
            log = workers[a.label].log()
            return all(
                f"tkhosts.{name}[{sent[name, 'a', i].id}] over its fleet" in log
                for i in range(counts[name])
            )

        wait_for(lambda: all(ran(n, "b") == c for n, c in counts.items()), 60, "B's calls")
        wait_for(lambda: ran("rated_open", "a") == OPEN, 30, "A's fail-open calls")
        wait_for(lambda: requeued("rated") and requeued("slotted"), 30, "A to re-queue its calls")
        while_cut = calls(apps, nonce)
        states = {key: result.state for key, result in sent.items() if key[1] == "a"}
        healed_at = time.time()
    finally:
        route(a, limits.a_address, cut=False)

    # Cut off, A ran none of the fail-closed tasks and failed none: each was re-queued. It
    # ran every fail-open one.
    assert {(call[0], call[2]) for call in while_cut} == {
        ("rated", "b"),
        ("slotted", "b"),
        ("rated_open", "b"),
        ("rated_open", "a"),
    }
    assert all(
        state not in ("FAILURE", "SUCCESS")
        for (name, _, _), state in states.items()
        if name != "rated_open"
    ), states
    a_log = workers[a.label].log()
    assert "Redis unreachable for fleet rate limit 'tkhosts.rated'" in a_log
    assert "Redis unreachable for fleet concurrency 'tkhosts.slotted'" in a_log

    # Reachable again, A runs each of them once; nothing failed.
    total = sum(counts.values()) * len(hosts)
    wait_for(lambda: len(calls(apps, nonce)) >= total, 60, "A's calls after the cut")
    for result in sent.values():
        assert result.get(timeout=30) is None
    found = calls(apps, nonce)
    assert Counter((task, host, index) for task, index, host, _, _ in found) == Counter(
        dict.fromkeys(sent, 1)
    )

    # The limits held over the whole test. Rate: the fleet's rate slots are 1 / rate apart
    # from when the calls were sent, and no call starts before its slot, so the n-th call to
    # start (on either host) starts at least (n - 1) / rate after the calls were sent.
    starts = sorted(start for task, _, _, start, _ in found if task == "rated")
    for n, start in enumerate(starts):
        assert start >= sent_at + n / apps.RATE - TIMER_SLACK, [s - sent_at for s in starts]
    # Concurrency 1: no two calls overlap (a slot is taken before a call starts and given back
    # after it ends).
    spans = sorted((start, end) for task, _, _, start, end in found if task == "slotted")
    for (_, end), (start, _) in itertools.pairwise(spans):
        assert start >= end, spans
    # A's fail-closed calls all ran after the cut ended.
    assert all(
        start >= healed_at
        for task, _, host, start, _ in found
        if host == "a" and task != "rated_open"
    )


#: Calls of the rate-limited task in the whole-link test (10 s of its slots).
BOOKED = 40


def start_on_shared_queue(
    fleet: Fleet, host: Host, workers: dict[str, NamespacedWorker], tmp: pathlib.Path
) -> NamespacedWorker:
    """A worker of ``host`` on the queue both hosts share, with the limits on the broker."""
    env = {
        "TASKKIT_TEST_HOST": host.label,
        "TASKKIT_TEST_HOSTS_REDIS": fleet.redis.url(host.root_ip),
        "TASKKIT_TEST_HOSTS_DIR": str(fleet.directory),
    }
    worker = workers[host.label] = NamespacedWorker(
        host,
        f"booked-{host.label}",
        tmp,
        app="tests.fleet_hosts.apps",
        queue="tk-hosts-q",
        concurrency=2,
        env=env,
    )
    worker.wait_ready()
    return worker


def test_what_a_cut_off_host_had_booked_runs_spaced_on_the_other(
    fleet: Fleet,
    apps: ModuleType,
    workers: dict[str, NamespacedWorker],
    tmp_path: pathlib.Path,
) -> None:
    """A whole-link partition, the limits on the broker's Redis. A delivery over the rate
    limit books a later slot and is re-queued to run then; the worker that takes the re-queued
    message holds it until then. Host A takes every call (B is started later), books their
    slots and holds the messages; A is cut off, B starts, and what A held comes back to B once
    its visibility lapses, past its slots. Those calls used to run at once on B, as one burst;
    a booking later than ``FLEET_BOOKED_GRACE`` now asks the limit again, and they run spaced.
    (The call A was re-queuing when it was cut off waits in its connection for the heal.)"""
    from taskkit.tasks._base import FLEET_BOOKED_GRACE

    a, b = fleet.hosts[0], fleet.hosts[1]
    worker_a = start_on_shared_queue(fleet, a, workers, tmp_path)
    nonce = uuid.uuid4().hex[:12]
    results = [apps.rated.apply_async((nonce, i), queue="tk-hosts-q") for i in range(BOOKED)]

    def booked() -> int:
        return worker_a.log().count("over its fleet rate limit; re-queued in")

    wait_for(lambda: booked() >= BOOKED - 1, 30, "host A to book a slot for every call")
    a.partition()
    try:
        worker_b = start_on_shared_queue(fleet, b, workers, tmp_path)
        wait_for(lambda: len(calls(apps, nonce)) >= BOOKED - 2, 60, "host B to run what A held")
    finally:
        a.heal()
    for result in results:
        assert result.get(timeout=60) is None

    # Calls start at their slots, 1 / rate apart, or up to the grace late: in any second, at
    # most rate * (1 + grace) calls, and one more for a body's own delay.
    starts = sorted(start for task, _, _, start, _ in calls(apps, nonce) if task == "rated")
    most = max(sum(1 for s in starts if first <= s < first + 1.0) for first in starts)
    assert most <= apps.RATE * (1 + FLEET_BOOKED_GRACE) + 2, [s - starts[0] for s in starts]
    assert "after its booked fleet rate slot; asking again" in worker_b.log()
