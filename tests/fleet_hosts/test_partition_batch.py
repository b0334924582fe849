"""Issue 19, a batch across two simulated hosts: host A is partitioned (its link down, not
killed) in the middle of its chunk; host B takes the chunk over once A's lease and its message's
visibility have lapsed, and finishes the batch. When A's link comes back, A's stale chunk writes
nothing: every item is done or dead exactly once, each dead item has one letter of one run, and
the items that ran on both hosts are the ones A had not written yet (at most
``ledger_flush_every + batch_size``).

How A is caught mid-chunk: the last item of each chunk is a gate, which waits (on its first run
only) for a file the test creates. A is partitioned while its gate waits; the gate is opened at
once, so A's last item runs cut off: its effect (a Redis write over the link) fails and A holds
it as dead, and A's end-of-chunk ledger write (the done flags and the dead letters) sits in its
connection until the link heals. Unfenced, that write marked the item dead that B had done, and
added A's failures to B's letters; the chunk's claim fences it (``ItemLedger.claim(fenced=True)``)
so it is refused where it lands."""

from __future__ import annotations

import importlib
import pathlib
import re
import uuid
from collections import Counter
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import pytest
import redis
from sqlalchemy import text

from taskkit.config import reset_settings
from taskkit.db.session import get_engine
from taskkit.deadletter import ItemLedger, batch_progress
from taskkit.tasks import submit_batch
from tests._support.netns import NamespacedWorker
from tests._support.workers import wait_for
from tests.conftest import empty_tables
from tests.fleet_hosts.conftest import Fleet

pytestmark = pytest.mark.timeout(150)

#: Items per chunk: two chunks, one on each host.
CHUNK = 20
ITEMS = 2 * CHUNK


def flush_redis(fleet: Fleet) -> None:
    """Empty the fleet's Redis (queues, leases, results): a test starts and ends clean."""
    client = redis.Redis.from_url(fleet.redis.url())
    try:
        client.flushall()
    finally:
        client.close()


@pytest.fixture
def apps(fleet: Fleet, pg_schema_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    """The hosts' app in this process (Redis at 127.0.0.1, PostgreSQL directly)."""
    values = {
        "TASKKIT_TEST_HOSTS_REDIS": fleet.redis.url(),
        "TASKKIT_TEST_HOSTS_DIR": str(fleet.directory),
        "TASKKIT_DATABASE_URL": pg_schema_url,
    }
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    reset_settings()
    flush_redis(fleet)
    module = importlib.import_module("tests.fleet_hosts.apps")
    module.app.conf.taskkit_database_url = pg_schema_url
    yield module
    reset_settings()
    empty_tables(get_engine(pg_schema_url))
    flush_redis(fleet)


@pytest.fixture
def workers() -> Iterator[dict[str, NamespacedWorker]]:
    started: dict[str, NamespacedWorker] = {}
    yield started
    for worker in started.values():
        worker.kill()  # the test's state goes with the fleet's Redis and the schema


def start_workers(
    fleet: Fleet, schema_url: str, workers: dict[str, NamespacedWorker], tmp: pathlib.Path
) -> None:
    for host in fleet.hosts:
        env = {
            "TASKKIT_TEST_HOST": host.label,
            "TASKKIT_TEST_HOSTS_REDIS": fleet.redis.url(host.root_ip),
            "TASKKIT_TEST_HOSTS_DIR": str(fleet.directory),
            "TASKKIT_DATABASE_URL": fleet.database_url(schema_url, host.root_ip),
        }
        workers[host.label] = NamespacedWorker(
            host,
            f"batch-{host.label}",
            tmp,
            app="tests.fleet_hosts.apps",
            queue="tk-hosts-q",
            env=env,
        )
    for worker in workers.values():
        worker.wait_ready()


def make_items(nonce: str) -> list[dict[str, Any]]:
    """Every seventh item (from the fourth) fails by design; the last of each chunk is a gate."""
    items: list[dict[str, Any]] = []
    for index in range(ITEMS):
        item: dict[str, Any] = {"id": f"i{index:03d}", "nonce": nonce}
        if index % 7 == 3:
            item["fail"] = True
        if index % CHUNK == CHUNK - 1:
            item["gate"] = True
        items.append(item)
    return items


def ledger_state(schema_url: str, batch_id: str, keys: list[str]) -> dict[str, Any]:
    """Each item's status in the ledger, and the batch's dead letters (key, attempts, status)."""
    statuses = ItemLedger(batch_id, get_engine(schema_url)).statuses(keys)
    with get_engine(schema_url).connect() as connection:
        letters = sorted(
            tuple(row)
            for row in connection.execute(
                text("SELECT item_key, attempts, status FROM dead_letters WHERE batch_id = :batch"),
                {"batch": batch_id},
            )
        )
    return {"statuses": statuses, "letters": letters}


def runs(apps: ModuleType, nonce: str) -> list[tuple[str, str]]:
    """``(key, host)`` of every run of an item function, in order."""
    path = apps.hosts_dir() / f"runs-{nonce}"
    lines = path.read_text().splitlines() if path.exists() else []
    return [(line.split()[0], line.split()[1]) for line in lines]


def all_ended(workers: Any) -> bool:
    """Every task a worker received has ended (succeeded, retried, failed, ignored)."""
    logs = [worker.log() for worker in workers]
    received = sum(log.count("] received") for log in logs)
    ended = sum(len(re.findall(r"\] (?:succeeded in|retry:|raised|ignored)", log)) for log in logs)
    return received > 0 and ended >= received


def test_a_partitioned_host_loses_its_chunk_and_writes_nothing_wrong_after(
    fleet: Fleet,
    apps: ModuleType,
    pg_schema_url: str,
    workers: dict[str, NamespacedWorker],
    tmp_path: pathlib.Path,
) -> None:
    start_workers(fleet, pg_schema_url, workers, tmp_path)
    nonce = uuid.uuid4().hex[:12]
    items = make_items(nonce)
    keys = [item["id"] for item in items]
    designed = sorted(item["id"] for item in items if item.get("fail"))
    gates = [item["id"] for item in items if item.get("gate")]
    submission = submit_batch(apps.items, items, chunk_size=CHUNK)
    batch_id = submission.batch_id

    def owner(key: str) -> str | None:
        path = apps.gate_path(nonce, key, "owner")
        return path.read_text() or None if path.exists() else None

    wait_for(lambda: all(owner(key) for key in gates), 60, "each chunk to reach its gate")
    owners = {key: owner(key) for key in gates}
    assert sorted(owners.values()) == ["a", "b"], owners  # one chunk on each host
    a = fleet.hosts[0]
    a_chunk = gates.index(next(key for key, host in owners.items() if host == a.label))
    a_keys = set(keys[a_chunk * CHUNK : (a_chunk + 1) * CHUNK])

    a.partition()
    try:
        for key in gates:  # A's gate item now runs cut off; B's chunk ends
            apps.gate_path(nonce, key, "open").touch()
        wait_for(
            lambda: batch_progress(batch_id, pg_schema_url).finished == ITEMS,
            90,
            "host B to take A's chunk over and finish the batch",
        )
        finished_by_b = ledger_state(pg_schema_url, batch_id, keys)
    finally:
        a.heal()

    # Healed, A's stale chunk ends (its ledger write refused), and so does every delivery.
    wait_for(lambda: all_ended(workers.values()), 60, "every delivery of the chunks to end")
    summary = submission.get(timeout=60)
    wait_for(lambda: all_ended(workers.values()), 60, "every delivery of the chunks to end")
    after = ledger_state(pg_schema_url, batch_id, keys)
    a_log = workers[a.label].log()

    # Nothing of A's landed after B finished.
    assert after == finished_by_b, a_log[-3000:]
    # Every item done or dead exactly once: the designed failures dead, each with one letter
    # of one run, every other item done.
    assert after["statuses"] == {key: "dead" if key in designed else "done" for key in keys}, a_log[
        -3000:
    ]
    assert after["letters"] == [(key, 1, "dead") for key in designed]
    progress = batch_progress(batch_id, pg_schema_url)
    assert (progress.total, progress.done, progress.dead, progress.claimed) == (
        ITEMS,
        ITEMS - len(designed),
        len(designed),
        0,
    )
    assert summary["failed_ids"] == designed
    assert summary["successful"] == ITEMS - len(designed)

    # No item lost: each one's effect landed (a Redis set: idempotent per key).
    client = redis.Redis.from_url(fleet.redis.url())
    try:
        effects = {member.decode() for member in client.smembers(apps.done_key(nonce))}
    finally:
        client.close()
    assert effects == set(keys) - set(designed)

    # Re-run only what A had not written: at most ledger_flush_every + batch_size items of A's
    # chunk ran on both hosts (its failed items too: their letters are written at the chunk's
    # end), and none ran more than twice. B's own chunk ran once.
    ran = runs(apps, nonce)
    count = Counter(key for key, _ in ran)
    assert set(count) == set(keys)
    twice = {key for key, n in count.items() if n > 1}
    assert max(count.values()) == 2
    assert twice <= a_keys
    assert {host for key, host in ran if key in twice} == {"a", "b"}
    bound = apps.items.ledger_flush_every + apps.items.batch_size
    assert len(twice - set(designed)) <= bound, sorted(twice)

    # The fence did it: A's end-of-chunk write reached the database and was refused there.
    assert "a newer delivery claimed the chunk" in a_log, a_log[-3000:]
