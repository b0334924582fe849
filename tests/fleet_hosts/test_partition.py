"""Issue 19, two hosts simulated on this machine: host A is partitioned (its link down, not
killed) mid-training; host B takes the run over after the lease ttl and completes it
bit-identical to an uninterrupted run; when A's link comes back, A's stale trainer writes
nothing (no checkpoint, no progress row, no model) and stops.

The last promise holds by fencing: A's lease counts as lost once its renewals failed for the
ttl, every row A writes for the run lands only while the run's fence is A's token (B raised it
when it took the run), and checkpoints carry their writer's token (a stale writer neither
replaces nor deletes B's). Writes stalled in A's connections are refused where they land.
Services reach the hosts only over their veth links (``tests/_support/netns.py``)."""

from __future__ import annotations

import importlib
import pathlib
import re
import uuid
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import numpy as np
import pytest
from sqlalchemy import text

from taskkit.config import reset_settings
from taskkit.db.models import ModelRun
from taskkit.db.session import get_engine, session_scope
from taskkit.tasks import load_model, submit_run
from tests._support.netns import NamespacedWorker
from tests._support.workers import wait_for
from tests.conftest import empty_tables
from tests.fleet_hosts.conftest import Fleet, ObjectStore

pytestmark = pytest.mark.timeout(150)

EPOCHS = 16
CONFIG = {"epochs": EPOCHS, "seed": 9, "batch_size": 200, "epoch_pause": 0.3}
SECRET = "two-hosts-tests-key-0123"
WRITTEN = ("checkpoints", "checkpoint_chunks", "training_epochs", "training_progress", "model_runs")


@pytest.fixture(params=["database", "s3"])
def storage(request: pytest.FixtureRequest) -> ObjectStore | None:
    """Where checkpoints are shared: PostgreSQL (DatabaseStorage) or the S3 server
    (FsspecStorage), each reached by the hosts over their links."""
    if request.param == "s3":
        return request.getfixturevalue("object_store")  # type: ignore[no-any-return]
    return None


def storage_env(storage: ObjectStore | None, address: str | None = None) -> dict[str, str]:
    if storage is None:
        return {"TASKKIT_CHECKPOINT_STORAGE": "database"}
    return storage.env(address)


@pytest.fixture
def apps(
    fleet: Fleet,
    storage: ObjectStore | None,
    pg_schema_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[ModuleType]:
    """The hosts' app in this process (Redis at 127.0.0.1, PostgreSQL and S3 directly)."""
    values = {
        "TASKKIT_TEST_HOSTS_REDIS": fleet.redis.url(),
        "TASKKIT_TEST_HOSTS_DIR": str(fleet.directory),
        "TASKKIT_DATABASE_URL": pg_schema_url,
        "TASKKIT_SECRET_KEY": SECRET,
        **storage_env(storage),
    }
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    reset_settings()
    module = importlib.import_module("tests.fleet_hosts.apps")
    module.app.conf.taskkit_database_url = pg_schema_url
    yield module
    reset_settings()
    empty_tables(get_engine(pg_schema_url))


@pytest.fixture
def workers() -> Iterator[dict[str, NamespacedWorker]]:
    started: dict[str, NamespacedWorker] = {}
    yield started
    for worker in started.values():
        worker.stop()


def start_worker(
    fleet: Fleet,
    index: int,
    schema_url: str,
    storage: ObjectStore | None,
    workers: dict[str, NamespacedWorker],
    tmp: pathlib.Path,
) -> NamespacedWorker:
    host = fleet.hosts[index]
    env = {
        "TASKKIT_TEST_HOST": host.label,
        "TASKKIT_TEST_HOSTS_REDIS": fleet.redis.url(host.root_ip),
        "TASKKIT_TEST_HOSTS_DIR": str(fleet.directory),
        "TASKKIT_DATABASE_URL": fleet.database_url(schema_url, host.root_ip),
        "TASKKIT_SECRET_KEY": SECRET,
        **storage_env(storage, host.root_ip),
    }
    worker = NamespacedWorker(
        host, f"host-{host.label}", tmp, app="tests.fleet_hosts.apps", queue="tk-hosts-q", env=env
    )
    workers[host.label] = worker
    worker.wait_ready()
    return worker


def status(run_id: int) -> str:
    with session_scope() as db:
        run = db.get(ModelRun, run_id)
        return run.status if run is not None else "missing"


def snapshot(schema_url: str, storage: ObjectStore | None) -> dict[str, list[Any]]:
    """Every row of the tables a trainer writes, and every object of the S3 storage."""
    with get_engine(schema_url).connect() as connection:
        found = {
            table: sorted(map(tuple, connection.execute(text(f"SELECT * FROM {table}"))), key=repr)
            for table in WRITTEN
        }
    found["s3 objects"] = storage.objects() if storage is not None else []
    return found


def test_a_partitioned_host_loses_the_run_to_the_other_and_writes_nothing_after(
    fleet: Fleet,
    apps: ModuleType,
    storage: ObjectStore | None,
    pg_schema_url: str,
    workers: dict[str, NamespacedWorker],
    tmp_path: pathlib.Path,
) -> None:
    for index in (0, 1):
        start_worker(fleet, index, pg_schema_url, storage, workers, tmp_path)
    nonce = uuid.uuid4().hex
    config = {**CONFIG, "nonce": nonce}
    run_id, _ = submit_run(apps.train, config, name="two-hosts")
    wait_for(lambda: any(apps.epochs_started(nonce, h.label) for h in fleet.hosts), 60, "training")
    # "a" is the host that took the run first, "b" the other.
    a, b = sorted(fleet.hosts, key=lambda h: not apps.epochs_started(nonce, h.label))
    worker_a = workers[a.label]
    wait_for(lambda: len(apps.epochs_started(nonce, a.label)) >= 4, 60, "3 epochs on host A")

    a.partition()
    try:
        wait_for(lambda: status(run_id) in ("completed", "failed"), 90, "host B to finish the run")
        assert status(run_id) == "completed", worker_a.log()[-3000:]
        # B's task ends after the status: its last progress write and its checkpoint cleanup
        # come after it, and are B's, not stale writes.
        wait_for(lambda: "succeeded in" in workers[b.label].log(), 30, "host B's task to end")
        taken_over = apps.epochs_started(nonce, b.label)
        assert taken_over, "host B ran no epoch"
        assert taken_over[0] > 0, "host B started over instead of resuming A's checkpoint"
        model = load_model(run_id)
        written = snapshot(pg_schema_url, storage)
    finally:
        a.heal()

    # Healed, A's trainer learns its lease was taken over and stops; every delivery of the
    # task (A's, B's, a re-queued copy) ends.
    wait_for(lambda: "was lost" in worker_a.log(), 60, "host A's trainer to find its lease lost")
    wait_for(lambda: all_ended(workers.values()), 60, "every delivery of the task to end")
    stale = changes(written, snapshot(pg_schema_url, storage))

    reference = reference_model(apps)
    assert np.array_equal(model.coef_, reference.coef_)
    assert np.array_equal(model.intercept_, reference.intercept_)

    # Fenced (ModelRun.fence where the rows land, the fencing token in checkpoint manifests,
    # and A's lease lost once its renewals failed for the ttl): nothing of A's lands.
    assert stale == {}


def all_ended(workers: Any) -> bool:
    """Every task a worker received has ended (succeeded, retried, failed)."""
    logs = [worker.log() for worker in workers]
    received = sum(log.count("] received") for log in logs)
    ended = sum(len(re.findall(r"\] (?:succeeded in|retry:|raised)", log)) for log in logs)
    return received > 0 and ended >= received


def changes(before: dict[str, list[Any]], after: dict[str, list[Any]]) -> dict[str, Any]:
    """The rows each table gained and lost between two snapshots (checkpoint bytes elided)."""

    def shown(row: tuple[Any, ...]) -> str:
        return repr(row)[:120]

    found = {}
    for table, rows in before.items():
        gained = [shown(r) for r in after[table] if r not in rows]
        lost = [shown(r) for r in rows if r not in after[table]]
        if gained or lost:
            found[table] = {"gained": gained, "lost": lost}
    return found


def reference_model(apps: ModuleType) -> Any:
    """The model of an uninterrupted run of CONFIG, trained in this process."""
    config = {**CONFIG, "epoch_pause": 0.0}
    with session_scope() as db:
        run = ModelRun(name="ref", model_type="sgd", config=config, task_name=apps.train.name)
        db.add(run)
        db.flush()
        run_id = run.id
    apps.train(run_id, config)
    return load_model(run_id)
