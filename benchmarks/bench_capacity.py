"""Capacity of one PostgreSQL and one Redis for taskkit's traffic: N client processes at saturation.

``python -m benchmarks.bench_capacity`` runs this section alone. For each operation taskkit
sends to its shared services, N = 1, 2, 4, 8 client processes (``multiprocessing``, forked)
run it back to back, released together by a barrier; each runs ``WARM`` seconds uncounted,
then counts the operations that start and end within the next ``WINDOW`` seconds. Each
(operation, N) is measured ``ROUNDS`` times, the orders of N alternating (1, 2, 4, 8 then 8,
4, 2, 1), and the best round is kept (the one least disturbed by other work on the machine).

PostgreSQL (the shared server, a schema of this run, migrated to head):

- ``ledger chunk``: what ``BatchTask`` does with a chunk's ledger (no lease, so not
  ``fenced``): inside ``with ItemLedger(...)`` (one kept connection), ``claim(keys,
  durable=False)``, ``finish(done_at=first half, durable=False)``, ``finish(done_at=the
  rest)`` (durable) on 1,000 keys, each chunk a new batch;
- ``progress write``: ``write_training_progress`` of one report and one new epoch, fenced (the
  write a ``TrainingTask``'s progress writer makes at most once per ``progress_interval``);
- ``run heartbeat``: ``write_heartbeat``, fenced (what a ``TrainingTask`` writes at each renewal
  of its lease).

Redis (a ``redis-server`` of this run on loopback, so that ``INFO`` counts this bench alone; the
URL in ``TASKKIT_BENCH_CAPACITY_REDIS_URL`` instead, if set):

- ``lease cycle``: ``RedisLeaseStore.acquire`` + ``Lease.renew`` + ``Lease.release``;
- ``rate decision``: ``FleetRateLimit.acquire`` on one limit shared by every client;
- ``slot cycle``: ``FleetConcurrency.acquire`` + ``FleetSlot.renew`` + ``FleetSlot.release``;
- ``breaker call``: a healthy call through ``CircuitBreaker`` on ``RedisCircuitStorage`` with
  ``max_staleness=0`` (one round trip per call, the exact mode; the default 0.05 s asks Redis at
  most 20 times a second per process and breaker).

Server CPU: for PostgreSQL the CPU time of the clients' backends (found by their
``application_name``, read in ``/proc/<pid>/stat``: the server is local), which leaves out the
WAL writer and other background processes; for Redis ``INFO cpu`` (the whole server) and
``INFO commandstats`` (time inside the commands clients sent), their change over the window.
Clients and servers share this machine's cores, so every number here is a lower bound of what
one server does on a machine of its own.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from multiprocessing.synchronize import Barrier
from typing import Any

import redis
from sqlalchemy import create_engine
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from benchmarks._harness import commit, machine, replace_section, say, table
from benchmarks.bench_checkpoint import (
    POSTGRES_URL,
    backend_cpu,
    load_average,
    postgres_durability,
    postgres_schema,
)
from taskkit.db.models import ModelRun
from taskkit.db.session import dispose_engines, get_engine, session_scope
from taskkit.deadletter import ItemLedger
from taskkit.recovery import CircuitBreaker, FleetConcurrency, FleetRateLimit, RedisCircuitStorage
from taskkit.tasks import LeaseOwner, RedisLeaseStore
from taskkit.tasks._progress import EpochLog, ProgressReport, write_training_progress
from taskkit.tasks._training import write_heartbeat
from tests._support.redis_server import start_redis_server

CLIENTS = (1, 2, 4, 8)
WARM = float(os.environ.get("TASKKIT_BENCH_CAPACITY_WARM", "1"))
WINDOW = float(os.environ.get("TASKKIT_BENCH_CAPACITY_WINDOW", "4"))
ROUNDS = int(os.environ.get("TASKKIT_BENCH_CAPACITY_ROUNDS", "3"))
#: Keys of a ledger chunk (``BatchTask``'s default chunk size is what the issue names: 1,000).
CHUNK = 1000
REDIS_URL = os.environ.get("TASKKIT_BENCH_CAPACITY_REDIS_URL")

#: The fleet of the arithmetic: hosts, worker processes per host.
HOSTS = 100
PROCESSES = 8
#: Items a second each worker process runs in batch chunks (1 ms an item).
ITEMS_PER_SECOND = 1000
#: Seconds between a training run's lease renewals (the default ``lease_ttl`` of 15 s, / 3),
#: each a Redis renewal and a PostgreSQL heartbeat.
BEAT_EVERY = 5.0
#: Seconds between a training run's progress writes (the default ``progress_interval``: at most
#: one a second, an upper bound: a real epoch is longer).
PROGRESS_EVERY = 1.0
#: Fleet-limited task calls a second per worker process, each one rate decision and one
#: concurrency slot cycle (as in docs/scaling.md).
LIMITED_PER_SECOND = 10
#: The Redis commands the operations send (a slot's release is a ZREM, the rest scripts).
SENT_COMMANDS = ("evalsha", "zrem")
#: Round trips a second per process and breaker with the default ``max_staleness`` (0.05 s).
BREAKER_PER_SECOND = 20


@dataclass
class Context:
    run: str
    postgres_url: str = ""
    redis_url: str = ""

    @property
    def application(self) -> str:
        """The ``application_name`` of the clients' PostgreSQL connections."""
        return f"taskkit_bench_cap_{self.run}"


# -- the operations: built in a client process, called once per counted operation ------------


class _Ledger:
    """What ``BatchTask`` does with a chunk's ledger (without a lease: not ``fenced``)."""

    def __init__(self, context: Context, index: int) -> None:
        self.engine = get_engine(context.postgres_url)
        self.keys = [f"item-{i:05d}" for i in range(CHUNK)]
        self.first, self.rest = list(range(CHUNK // 2)), list(range(CHUNK // 2, CHUNK))
        self.prefix = f"cap-{context.run}-{index}-"
        self.count = 0

    def __call__(self) -> None:
        self.count += 1
        with ItemLedger(f"{self.prefix}{self.count}", self.engine) as ledger:
            ledger.claim(self.keys, durable=False)
            ledger.finish(done_at=self.first, durable=False)
            ledger.finish(done_at=self.rest)


def _new_run(context: Context, index: int) -> int:
    with session_scope(context.postgres_url) as session:
        run = ModelRun(
            name=f"cap-{context.run}-{index}", model_type="bench", status="running", fence=1
        )
        session.add(run)
        session.flush()
        return int(run.id)


class _Progress:
    def __init__(self, context: Context, index: int) -> None:
        self.url = context.postgres_url
        self.run_id = _new_run(context, index)
        self.epochs = EpochLog()
        self.epoch = 0

    def __call__(self) -> None:
        self.epoch += 1
        metrics = {"loss": 1.0 / self.epoch, "accuracy": 1.0 - 1.0 / (self.epoch + 1)}
        self.epochs.add(self.epoch, metrics)
        report = ProgressReport(self.epoch, 10**9, f"epoch {self.epoch}", metrics)
        write_training_progress(
            self.run_id, report, database_url=self.url, epochs=self.epochs, fence=1
        )


class _Heartbeat:
    def __init__(self, context: Context, index: int) -> None:
        self.url = context.postgres_url
        self.run_id = _new_run(context, index)

    def __call__(self) -> None:
        write_heartbeat(self.run_id, database_url=self.url, fence=1)


def _redis(context: Context) -> redis.Redis:
    return redis.Redis.from_url(context.redis_url, socket_timeout=10)


class _LeaseCycle:
    def __init__(self, context: Context, index: int) -> None:
        self.store = RedisLeaseStore(_redis(context), prefix=f"cap-{context.run}")
        self.key = f"run-{index}"
        self.owner = LeaseOwner.here(task_id=f"cap-{index}")

    def __call__(self) -> None:
        lease = self.store.acquire(self.key, self.owner, 15.0)
        if lease is None:
            raise RuntimeError(f"lease {self.key} is held")
        lease.renew()
        lease.release()


class _RateDecision:
    def __init__(self, context: Context, index: int) -> None:
        self.limit = FleetRateLimit(_redis(context), f"cap-{context.run}", 1e9)

    def __call__(self) -> None:
        if not self.limit.acquire().allowed:
            raise RuntimeError("the rate limit said no")


class _SlotCycle:
    def __init__(self, context: Context, index: int) -> None:
        self.limit = FleetConcurrency(_redis(context), f"cap-{context.run}", 10**6, ttl=15)

    def __call__(self) -> None:
        slot, _ = self.limit.acquire()
        if slot is None:
            raise RuntimeError("no concurrency slot")
        slot.renew()
        slot.release()


class _BreakerCall:
    def __init__(self, context: Context, index: int) -> None:
        storage = RedisCircuitStorage(
            _redis(context), prefix=f"cap-{context.run}:", max_staleness=0
        )
        self.call = CircuitBreaker(
            failure_threshold=5, recovery_timeout=60, name="dependency", storage=storage
        )(lambda: None)

    def __call__(self) -> None:
        self.call()


@dataclass(frozen=True)
class Operation:
    label: str
    service: str  # "postgres" or "redis"
    unit: str  # what one operation is, for the table
    make: Callable[[Context, int], Callable[[], None]]
    #: What one operation sends: statements (PostgreSQL) or commands (Redis).
    sends: int
    items: int = 0


OPERATIONS = [
    Operation("ledger chunk (1,000 items)", "postgres", "chunks", _Ledger, 3, CHUNK),
    Operation("progress write (report + 1 epoch)", "postgres", "writes", _Progress, 1),
    Operation("run heartbeat", "postgres", "beats", _Heartbeat, 1),
    Operation("lease acquire + renew + release", "redis", "cycles", _LeaseCycle, 3),
    Operation("fleet rate decision", "redis", "decisions", _RateDecision, 1),
    Operation("fleet slot acquire + renew + release", "redis", "cycles", _SlotCycle, 3),
    Operation("breaker call (`max_staleness=0`)", "redis", "calls", _BreakerCall, 1),
]


# -- one run: N clients released together --------------------------------------------------


@dataclass
class Result:
    clients: int
    count: int = 0
    seconds: float = WINDOW
    latencies: list[float] = field(default_factory=list)
    client_cpu: float = 0.0
    #: Server CPU seconds in the window (None: not measurable here).
    server_cpu: float | None = None
    #: Redis only: microseconds inside commands (``INFO commandstats``), and commands.
    command_usec: float | None = None
    commands: int | None = None

    @property
    def rate(self) -> float:
        return self.count / self.seconds

    def per_op(self, value: float | None) -> float | None:
        return None if value is None or not self.count else value / self.count


def _backend_pids(context: Context) -> list[int]:
    """The PostgreSQL backends of this run's clients (their ``application_name``)."""
    engine = create_engine(POSTGRES_URL, poolclass=NullPool)
    try:
        with engine.connect() as connection:
            rows = connection.exec_driver_sql(
                "SELECT pid FROM pg_stat_activity WHERE application_name = %(name)s",
                {"name": context.application},
            )
            return [int(pid) for (pid,) in rows]
    finally:
        engine.dispose()


def _client(
    operation: Operation, context: Context, index: int, barrier: Barrier, results: Any
) -> None:
    """One client process: build the operation, wait for the others, run, report."""
    try:
        call = operation.make(context, index)
        call()  # the first call loads scripts, prepares, connects
        results.put(("ready", index))
        barrier.wait(timeout=120)
        start = time.monotonic()
        begin, end = start + WARM, start + WARM + WINDOW
        count = 0
        latencies: list[float] = []
        cpu_begin: float | None = None
        while True:
            before = time.monotonic()
            if before >= begin and cpu_begin is None:
                cpu_begin = time.process_time()
            call()
            after = time.monotonic()
            if after > end:
                break
            if before >= begin:
                count += 1
                latencies.append(after - before)
        cpu = time.process_time() - (cpu_begin if cpu_begin is not None else 0.0)
        results.put(("done", index, count, latencies, cpu))
    except BaseException as exc:
        results.put(("error", index, f"{type(exc).__name__}: {exc}"))
        raise


def _redis_stats(client: redis.Redis) -> tuple[float, float, int]:
    """(server CPU seconds, microseconds inside commands, commands) so far."""
    cpu = client.info("cpu")
    stats = client.info("commandstats")
    # Only what clients send: commandstats also counts the commands scripts call, and an
    # EVALSHA's time includes theirs.
    sent = [stats.get(f"cmdstat_{name}", {}) for name in SENT_COMMANDS]
    usec = sum(float(value.get("usec", 0)) for value in sent)
    calls = sum(int(value.get("calls", 0)) for value in sent)
    return float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]), usec, calls


def measure(operation: Operation, context: Context, clients: int) -> Result:
    """One run of ``operation`` with ``clients`` processes."""
    dispose_engines()  # no pooled connection of this process crosses a fork
    fork = multiprocessing.get_context("fork")
    barrier = fork.Barrier(clients + 1)
    results = fork.Queue()
    processes = [
        fork.Process(target=_client, args=(operation, context, i, barrier, results), daemon=True)
        for i in range(clients)
    ]
    result = Result(clients)
    monitor = _redis(context) if operation.service == "redis" else None
    try:
        for process in processes:
            process.start()
        for _ in range(clients):
            message = results.get(timeout=120)
            if message[0] == "error":
                raise RuntimeError(f"{operation.label}: client {message[1]}: {message[2]}")
        pids = _backend_pids(context) if operation.service == "postgres" else []
        barrier.wait(timeout=60)
        time.sleep(WARM)
        server_before: float | None = None
        usec_before = calls_before = 0.0
        if monitor is not None:
            server_before, usec_before, calls = _redis_stats(monitor)
            calls_before = float(calls)
        elif pids:
            cpus = [backend_cpu(pid) for pid in pids]
            server_before = None if None in cpus else sum(c for c in cpus if c is not None)
        time.sleep(WINDOW)
        if monitor is not None and server_before is not None:
            server_after, usec_after, calls_after = _redis_stats(monitor)
            result.server_cpu = server_after - server_before
            result.command_usec = usec_after - usec_before
            result.commands = int(calls_after - calls_before)  # INFO itself left out
        elif server_before is not None:
            cpus = [backend_cpu(pid) for pid in pids]
            if None not in cpus:
                result.server_cpu = sum(c for c in cpus if c is not None) - server_before
        for _ in range(clients):
            message = results.get(timeout=WINDOW + 120)
            if message[0] == "error":
                raise RuntimeError(f"{operation.label}: client {message[1]}: {message[2]}")
            _, _, count, latencies, cpu = message
            result.count += count
            result.latencies += latencies
            result.client_cpu += cpu
        for process in processes:
            process.join(timeout=30)
    finally:
        for process in processes:
            if process.is_alive():
                process.kill()
                process.join(timeout=10)
        if monitor is not None:
            monitor.close()
    return result


# -- services ------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextmanager
def redis_server() -> Iterator[tuple[str, str]]:
    """(URL, what it is): a redis-server of this run on loopback (no persistence), or
    ``TASKKIT_BENCH_CAPACITY_REDIS_URL``."""
    if REDIS_URL:
        yield REDIS_URL, f"`{REDIS_URL}` (INFO counts every client of that server)"
        return
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError(
            "bench_capacity needs redis-server (apt-get install redis-server) or "
            "TASKKIT_BENCH_CAPACITY_REDIS_URL"
        )
    version = subprocess.run([binary, "--version"], capture_output=True, text=True, check=False)
    port = _free_port()
    with tempfile.TemporaryDirectory(prefix="tk-capacity-") as directory:
        process = start_redis_server(port, directory)
        try:
            server = version.stdout.split(" sha=")[0].strip() or "redis-server"
            yield f"redis://127.0.0.1:{port}/0", f"{server}, a server of this run (no persistence)"
        finally:
            process.kill()
            process.wait(timeout=10)


# -- the run and the report ----------------------------------------------------------------------


def measure_all(context: Context) -> dict[tuple[str, int], Result]:
    best: dict[tuple[str, int], Result] = {}
    for round_ in range(ROUNDS):
        order = CLIENTS if round_ % 2 == 0 else tuple(reversed(CLIENTS))
        for operation in OPERATIONS:
            for clients in order:
                result = measure(operation, context, clients)
                say(
                    f"  round {round_ + 1} {operation.label}, {clients} client(s): "
                    f"{result.rate:,.0f} {operation.unit}/s"
                )
                key = (operation.label, clients)
                if key not in best or result.rate > best[key].rate:
                    best[key] = result
    return best


def _us(seconds: float | None) -> str:
    return "?" if seconds is None else f"{seconds * 1e6:,.0f}"


def report(
    best: dict[tuple[str, int], Result], redis_server: str, durability: str, load: str
) -> str:
    rows = []
    for operation in OPERATIONS:
        results = [best[operation.label, n] for n in CLIENTS]
        at_peak = peak(best, operation)
        single = best[operation.label, 1]
        rates = [f"**{r.rate:,.0f}**" if r is at_peak else f"{r.rate:,.0f}" for r in results]
        server = at_peak.per_op(at_peak.server_cpu)
        rows.append(
            [
                operation.label,
                "PostgreSQL" if operation.service == "postgres" else "Redis",
                f"{operation.unit}/s",
                *rates,
                f"{statistics.median(single.latencies) * 1e3:.2f}" if single.latencies else "?",
                _us(server),
                _us(at_peak.per_op(at_peak.client_cpu)),
                "?" if not server else f"{1 / server:,.0f}",
            ]
        )
    headers = [
        "operation", "server", "unit", *[f"{n} client{'s' if n > 1 else ''}" for n in CLIENTS],
        "latency, 1 client (ms)", "server CPU per op, at the peak (us)",
        "client CPU per op, at the peak (us)", "per server core (1 / server CPU)",
    ]  # fmt: skip
    ledger = peak(best, OPERATIONS[0])
    redis_rows = []
    for operation in OPERATIONS:
        r = peak(best, operation)
        if operation.service == "redis" and r.commands and r.command_usec is not None:
            redis_rows.append(
                [
                    operation.label,
                    f"{r.commands / r.count:.2f}",
                    f"{r.command_usec / r.commands:.1f}",
                    _us(r.per_op(r.server_cpu)),
                ]
            )
    fleet = table(
        ["traffic", "needed /s", "measured here /s (peak)", "share", "server cores needed"],
        fleet_rows(best),
    )
    return f"""## Capacity of one PostgreSQL and one Redis (issue 19)

`python -m benchmarks.bench_capacity`: N client processes (forked, released together) run one
taskkit operation back to back against one server; each counts what starts and ends in a
{WINDOW:g} s window after {WARM:g} s of warm-up; best of {ROUNDS} rounds (N in alternating
orders); the peak over N in bold. PostgreSQL: the shared server ({durability}), a schema of
this run; its server CPU is the clients' backends' (`/proc`), without the WAL writer's. Redis:
{redis_server}; server CPU from `INFO cpu`. Clients and servers share this machine's
{os.cpu_count()} cores with other work (load average {load} before the run): from 2 clients on,
the clients take most of the CPU, so the throughputs are a **lower bound** of one server's
capacity; the server's own CPU per operation varies less with the load, and the last column
turns it into operations per server core (an extrapolation, not a measurement). Ledger at its
peak: **{ledger.rate * CHUNK:,.0f} items/s** ({ledger.rate * 3:,.0f} statements/s).
Machine: {machine()}; commit {commit()}.

{table(headers, rows)}

Redis time inside the commands the clients sent (`INFO commandstats`: `EVALSHA` with what its
script calls, and `ZREM`) at the peak; the rest of the server's CPU is the network:

{table(["operation", "commands per op", "us per command", "server CPU per op (us)"], redis_rows)}

A fleet of {HOSTS} hosts x {PROCESSES} worker processes against these measurements
(docs/scaling.md states the assumptions): its traffic as a share of the peak measured here, and
the server CPU it needs at the measured cost per operation (a Redis executes commands on one
core):

{fleet}
"""


def peak(best: dict[tuple[str, int], Result], operation: Operation) -> Result:
    """The run of ``operation`` with the most operations a second, over every N."""
    return max((best[operation.label, n] for n in CLIENTS), key=lambda result: result.rate)


def fleet_rows(best: dict[tuple[str, int], Result]) -> list[list[str]]:
    """The 100-host arithmetic: what such a fleet sends against what was measured."""
    processes = HOSTS * PROCESSES
    per_second = [
        processes * ITEMS_PER_SECOND / CHUNK,
        processes / PROGRESS_EVERY,
        processes / BEAT_EVERY,
        processes / BEAT_EVERY,
        processes * LIMITED_PER_SECOND,
        processes * LIMITED_PER_SECOND,
        processes * BREAKER_PER_SECOND,
    ]
    what = [
        f"batch: ledger chunks, 3 statements each ({ITEMS_PER_SECOND:,} items/s per process)",
        f"training: progress writes (one per {PROGRESS_EVERY:g} s, the most)",
        f"training: run heartbeats (one per {BEAT_EVERY:g} s)",
        f"training: lease renewals (one per {BEAT_EVERY:g} s; measured: whole cycles)",
        f"limits: rate decisions ({LIMITED_PER_SECOND} limited calls/s per process)",
        f"limits: slot cycles ({LIMITED_PER_SECOND} limited calls/s per process)",
        f"breakers: round trips (the most at the default staleness, {BREAKER_PER_SECOND}/s)",
    ]
    rows = []
    for operation, label, needed in zip(OPERATIONS, what, per_second, strict=True):
        result = peak(best, operation)
        server = result.per_op(result.server_cpu)
        rows.append(
            [
                label,
                f"{needed:,.0f}",
                f"{result.rate:,.0f}",
                f"{needed / result.rate:.0%}" if result.rate else "?",
                "?" if server is None else f"{needed * server:.2f}",
            ]
        )
    return rows


def run() -> str:
    say(f"bench_capacity: {len(OPERATIONS)} operations x N = {CLIENTS}, {ROUNDS} round(s)")
    load = load_average()
    started = time.perf_counter()
    run_id = uuid.uuid4().hex[:8]
    with postgres_schema("taskkit_bench_cap") as url, redis_server() as (redis_url, server):
        durability = postgres_durability(url)
        context = Context(run_id, redis_url=redis_url)
        context.postgres_url = (
            make_url(url)
            .update_query_dict({"application_name": context.application})
            .render_as_string(hide_password=False)
        )
        try:
            best = measure_all(context)
        finally:
            if REDIS_URL:
                client = redis.Redis.from_url(redis_url)
                keys = list(client.scan_iter(match=f"*cap-{run_id}*", count=1000))
                if keys:
                    client.delete(*keys)
                client.close()
    say(f"  bench_capacity took {time.perf_counter() - started:.0f} s")
    return report(best, server, durability, load)


if __name__ == "__main__":
    replace_section(run())
