"""The Celery app the two simulated hosts run (``tests/fleet_hosts``).

Its broker, result backend and lease store are the Redis of the test (``RedisOnLinks``), at
the address each process reaches it by: ``TASKKIT_TEST_HOSTS_REDIS`` (127.0.0.1 in the test
process, the root side of its own link in a host's worker). Every epoch a trainer starts is
appended to ``$TASKKIT_TEST_HOSTS_DIR/epochs-<nonce>-<host>`` (a file: it needs no network,
so a partitioned host still records what it does). ``TASKKIT_TEST_HOSTS_LIMITS``, when set, is
the Redis of the leases and fleet limits (else the broker's).

The batch (``items``) and the limited tasks (``rated``, ``rated_open``, ``slotted``) record
what they run in files of that directory too (``runs-<nonce>``, ``calls-<nonce>``).
"""

from __future__ import annotations

import os
import pathlib
import time
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from taskkit.config import Settings
from taskkit.tasks import BatchTask, ResilientTask, TrainingTask, create_app
from workers.training import run_training

LEASE_TTL = 3.0
QUEUE = "tk-hosts-q"
HOST = os.environ.get("TASKKIT_TEST_HOST", "test")

settings = Settings(
    broker_url=os.environ.get("TASKKIT_TEST_HOSTS_REDIS", "redis://127.0.0.1:1/0"),
    lease_url=os.environ.get("TASKKIT_TEST_HOSTS_LIMITS", ""),
    visibility_timeout=5.0,
    lease_ttl=LEASE_TTL,
    progress_interval=0.0,
)
app = create_app(
    "tkhosts",
    settings=settings,
    task_default_queue=QUEUE,
    taskkit_outer_delay=0.05,
    taskkit_outer_max_delay=0.2,
    taskkit_inner_delay=0.01,
    taskkit_inner_max_delay=0.02,
)


def epochs_file(nonce: str, host: str) -> pathlib.Path:
    return pathlib.Path(os.environ["TASKKIT_TEST_HOSTS_DIR"]) / f"epochs-{nonce}-{host}"


def epochs_started(nonce: str, host: str) -> list[int]:
    path = epochs_file(nonce, host)
    lines = path.read_text().splitlines() if path.exists() else []
    return [int(line.split()[0]) for line in lines]


@app.task(base=TrainingTask, bind=True, shared=False, name="tkhosts.train")
def train(self: TrainingTask, model_run_id: int, config: dict[str, Any]) -> dict[str, Any]:
    nonce = str(config.get("nonce", model_run_id))

    def on_epoch(epoch: int) -> None:
        if "TASKKIT_TEST_HOSTS_DIR" in os.environ:
            with epochs_file(nonce, HOST).open("a") as out:
                out.write(f"{epoch} {time.time():.3f}\n")

    return run_training(self, config, on_epoch=on_epoch)


# -- a batch across the hosts (test_partition_batch) --------------------------------------------

#: Items between progress reports, and done items between ledger writes.
ITEMS_ROUND = 5
#: Longest wait of a gate (bounds a test that never opens it).
GATE_TIMEOUT = 60.0

_side_effects: list[redis.Redis] = []


def hosts_dir() -> pathlib.Path:
    return pathlib.Path(os.environ["TASKKIT_TEST_HOSTS_DIR"])


def side_effects() -> redis.Redis:
    """Where an item's effect lands: the test's Redis over this host's link, with short
    timeouts and no retries (a cut-off host's item fails within a second)."""
    if not _side_effects:
        _side_effects.append(
            redis.Redis.from_url(
                settings.broker_url,
                socket_timeout=0.3,
                socket_connect_timeout=0.3,
                retry=Retry(NoBackoff(), 0),
            )
        )
    return _side_effects[0]


def done_key(nonce: str) -> str:
    return f"tkhosts:done:{nonce}"


def gate_path(nonce: str, key: str, what: str) -> pathlib.Path:
    return hosts_dir() / f"gate-{nonce}-{key}-{what}"


def _gate(nonce: str, key: str) -> None:
    """The first run of a gated item records its host in ``gate-...-owner`` and waits for
    ``gate-...-open``; later runs (another host's) pass."""
    try:
        descriptor = os.open(gate_path(nonce, key, "owner"), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    with os.fdopen(descriptor, "w") as owner:
        owner.write(HOST)
    deadline = time.monotonic() + GATE_TIMEOUT
    while not gate_path(nonce, key, "open").exists() and time.monotonic() < deadline:
        time.sleep(0.02)


@app.task(
    base=BatchTask,
    bind=True,
    name="tkhosts.items",
    batch_size=ITEMS_ROUND,
    ledger_flush_every=ITEMS_ROUND,
    item_max_attempts=1,
)
def items(self: BatchTask, item: dict[str, Any]) -> None:
    """One item: each run appended to ``runs-<nonce>`` (``<key> <host>``); an item with
    ``"fail"`` raises (dead-lettered), any other adds its key to a Redis set (idempotent)."""
    nonce, key = item["nonce"], item["id"]
    with (hosts_dir() / f"runs-{nonce}").open("a") as out:
        out.write(f"{key} {HOST}\n")
    if item.get("gate"):
        _gate(nonce, key)
    if item.get("fail"):
        raise ValueError(f"item {key} is designed to fail")
    side_effects().sadd(done_key(nonce), key)


# -- fleet limits across the hosts (test_partition_limits) ---------------------------------------

#: The fleet rate limit of ``rated`` and ``rated_open``, in calls per second.
RATE = 4


def record_call(task: str, nonce: str, index: int, started: float) -> None:
    """``<task> <index> <host> <start> <end>`` appended to ``calls-<nonce>`` (a file: a host
    cut off from Redis still records what it runs)."""
    with (hosts_dir() / f"calls-{nonce}").open("a") as out:
        out.write(f"{task} {index} {HOST} {started:.6f} {time.time():.6f}\n")


@app.task(base=ResilientTask, bind=True, name="tkhosts.rated", fleet_rate_limit=f"{RATE}/s")
def rated(self: ResilientTask, nonce: str, index: int) -> None:
    record_call("rated", nonce, index, time.time())


@app.task(
    base=ResilientTask,
    bind=True,
    name="tkhosts.rated_open",
    fleet_rate_limit=f"{RATE}/s",
    fleet_fail_open=True,
)
def rated_open(self: ResilientTask, nonce: str, index: int) -> None:
    record_call("rated_open", nonce, index, time.time())


@app.task(base=ResilientTask, bind=True, name="tkhosts.slotted", fleet_concurrency=1)
def slotted(self: ResilientTask, nonce: str, index: int) -> None:
    started = time.time()
    time.sleep(0.2)
    record_call("slotted", nonce, index, started)
