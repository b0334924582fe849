"""Per-item overhead of batch_with_retry against a bare loop, parallel_batch_process, the
item ledger's cost, and how soon a chunk whose pool process was killed runs again.

The floor is the loop a user would write without taskkit: ``for item in items:
out.append(fn(item))``. ``batch_with_retry`` runs the same trivial function over the same items
with no failures, so the difference is what its bookkeeping costs per item (the try/except
around each call, the batch boundaries, the progress and retry checks after each batch, and
the fixed cost of setting up one call, spread over all items). ``parallel_batch_process``
with 4 threads is shown for information: with a function this cheap, threads only add the cost
of starting them and of contending for the GIL; they pay off when the function waits on I/O.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, Any, NamedTuple

import redis
from celery import signals
from psycopg import generators
from sqlalchemy import text

from benchmarks._harness import per_call_ns, say, table
from benchmarks.bench_checkpoint import postgres_schema
from taskkit.config import Settings, load_settings
from taskkit.db.session import get_engine
from taskkit.deadletter import ItemLedger
from taskkit.deadletter._ledger import _keys_json
from taskkit.recovery import batch_with_retry, parallel_batch_process
from taskkit.tasks import BatchTask, create_app, submit_batch

ITEMS = 100_000
BATCH_SIZE = 100
WORKERS = 4
#: Target (issue): batch_with_retry adds less than 1 µs per item over a bare loop.
TARGET_NS = 1_000.0
#: Every contestant is measured once per round, round-robin, and keeps its best round.
ROUNDS = 3


def double(item: int) -> int:
    return item * 2


def bare_loop(items: list[int], fn: Callable[[int], int]) -> list[int]:
    out = []
    for item in items:
        out.append(fn(item))
    return out


def per_item_overhead_ns(bare_ns_per_item: float, batched_ns_per_item: float) -> float:
    """What ``batch_with_retry`` adds to each item: its time per item minus the bare loop's."""
    return batched_ns_per_item - bare_ns_per_item


def measure() -> dict[str, float]:
    """ns per item for each contestant, best of ``ROUNDS`` round-robin rounds."""
    items = list(range(ITEMS))
    cases: dict[str, Callable[[], object]] = {
        "bare loop (floor)": lambda: bare_loop(items, double),
        f"batch_with_retry (batch_size={BATCH_SIZE})": lambda: batch_with_retry(
            items, double, batch_size=BATCH_SIZE
        ),
        f"parallel_batch_process ({WORKERS} threads)": lambda: parallel_batch_process(
            items, double, num_workers=WORKERS, batch_size=BATCH_SIZE
        ),
    }
    best: dict[str, float] = {}
    for round_number in range(1, ROUNDS + 1):
        say(f"  round {round_number}/{ROUNDS}")
        for name, case in cases.items():
            per_item = per_call_ns(case, repeat=3) / ITEMS
            best[name] = min(best.get(name, float("inf")), per_item)
    return best


def overhead_section() -> str:
    logging.disable(logging.CRITICAL)
    try:
        results = measure()
    finally:
        logging.disable(logging.NOTSET)
    names = list(results)
    bare, batched = results[names[0]], results[names[1]]
    overhead = per_item_overhead_ns(bare, batched)
    verdict = "met" if overhead < TARGET_NS else "**not met**"
    rows = [
        [name, f"{value:,.1f}", f"{per_item_overhead_ns(bare, value):,.1f}"]
        for name, value in results.items()
    ]
    return f"""## batch_with_retry per-item overhead

{ITEMS:,} items, a trivial function (`item * 2`) that never fails, no waits. The floor is the
bare loop `for item in items: out.append(fn(item))`; `batch_with_retry` runs the same function
over the same list with `batch_size={BATCH_SIZE}`. Its per-item overhead is its time per item
minus the floor's: the try/except around each call, the batch boundaries and the per-batch
retry and progress checks, plus the fixed cost of one call spread over all items. Each figure is
the best of {ROUNDS} round-robin rounds (each itself the best of timeit repeats).
`parallel_batch_process` with {WORKERS} threads is for information only: a function this cheap
holds the GIL, so threads add their start-up and contention and cannot run faster; they pay
off for functions that wait on I/O.

{table(["contestant", "ns per item", "overhead over the bare loop, ns per item"], rows)}

Target: batch_with_retry's overhead < 1 µs (1000 ns) per item. Measured: {overhead:,.1f} ns
per item, target {verdict}.
"""


# -- BatchTask with and without the item ledger ---------------------------------------------------

#: Items per chunk (submit_batch's default chunk size).
CHUNK = 1000
#: Timed chunks per contestant and item cost; the four tasks take turns (each round in another
#: order: the same one would always run after the same task) and each keeps its median.
LEDGER_ROUNDS = 15
#: ... for the 20 µs row, whose chunks take 20 ms, where one chunk's wake-ups move the median
#: most: more chunks, for the same few seconds.
LEDGER_ROUNDS_CHEAP = 41
#: ... and with no work (1 ms chunks): a second of chunks per task.
LEDGER_ROUNDS_NO_WORK = 801
#: (label, seconds of CPU work per item; None: one PostgreSQL upsert per item).
ITEM_COSTS: list[tuple[str, float | None]] = [
    ("no work (`return item`): the ledger's whole cost", 0.0),
    ("20 µs of CPU work", 20e-6),
    ("100 µs of CPU work (a small model's prediction)", 100e-6),
    ("one PostgreSQL upsert of its result (the idempotent side effect)", None),
]
#: Issue 18's target ratio (with / without) per row of ITEM_COSTS (the upsert row: issue 9's 0.8x).
LEDGER_TARGETS = [0.5, 0.9, 0.97, 0.8]
LEDGER_HEADERS = [
    "item function",
    "items/s without ledger",
    "items/s, floor (the promises' statements only)",
    "items/s, floor + keys (its claim stores the chunk's keys)",
    "items/s with ledger",
    "ledger cost, µs per item",
    "with / without",
]

ledger_app = create_app(
    "benchbatch", settings=Settings(broker_url="memory://", result_backend="cache+memory://")
)
_cost: list[float | None] = [0.0]


def _work(item: int) -> None:
    cost = _cost[0]
    if cost is None:
        with get_engine(ledger_app.conf.taskkit_database_url).begin() as connection:
            connection.execute(_UPSERT, {"item": item})
        return
    end = time.perf_counter() + cost
    while time.perf_counter() < end:
        pass


_UPSERT = text(
    "INSERT INTO bench_batch_effects (item) VALUES (:item) ON CONFLICT (item) DO NOTHING"
)


@ledger_app.task(base=BatchTask, bind=True, name="benchbatch.with_ledger")
def with_ledger(self: BatchTask, item: int) -> None:
    _work(item)


@ledger_app.task(base=BatchTask, bind=True, name="benchbatch.without_ledger", ledger=False)
def without_ledger(self: BatchTask, item: int) -> None:
    _work(item)


class _Floor:
    """The statements any ledger that keeps the ledger's three promises makes per chunk, and
    nothing else, sent as the ledger sends its own (prepared on one psycopg connection, through
    libpq, each statement's answer read before the next is sent):

    - a one-row lookup, sent when the chunk starts (before its keys are computed), its answer
      read before the first item: a redelivered chunk must know what to skip before it runs
      anything (the ledger's ``probe``);
    - a one-row claim, sent without waiting (a first delivery finds nothing to skip);
    - a one-row write every ``ledger_flush_every`` items, sent without waiting and committed
      without a WAL flush (items re-run after a kill stay within ``ledger_flush_every +
      batch_size``);
    - one durable one-row write, sent when the items are done and read before the task
      returns: the chunk's end must be on disk before its message is acked.

    No flags, and no keys unless ``keys``: then the claim also stores the chunk's keys, as the
    ledger's JSON in a column compressed with lz4 as ``batch_chunks.keys`` is (the record that
    lets ``batch_items`` and ``statuses`` answer for each item from the moment it is
    claimed)."""

    def __init__(self, table: str, keys: bool = False) -> None:
        self.table, self.keys = table, keys
        self.raw: Any = None  # the pool's DBAPI connection, held while the section runs
        self.connection: Any = None  # its psycopg connection
        self.chunk = b""
        #: Items of the running chunk, and how many of them ran.
        self.size = self.ran = 0
        self.pending = False

    def statements(self) -> dict[bytes, str]:
        table, keyed = self.table, self.keys
        sync_off = "set_config('synchronous_commit', 'off', true)"
        claim = (
            f"INSERT INTO {table} AS f (chunk{', keys' if keyed else ''}) "
            f"VALUES ($1{', $2' if keyed else ''}) ON CONFLICT (chunk) DO UPDATE "
            f"SET claims = f.claims + 1 RETURNING claims, {sync_off}"
        )
        return {
            b"probe": f"SELECT claims FROM {table} WHERE chunk = $1",
            b"claim": claim,
            b"flush": f"UPDATE {table} SET flushes = flushes + 1 WHERE chunk = $1 "
            f"RETURNING {sync_off}",
            b"end": f"UPDATE {table} SET done = true WHERE chunk = $1",
        }

    def open(self, url: str) -> None:
        self.raw = get_engine(url).raw_connection()  # the ledger's engine, so its settings
        self.connection = self.raw.driver_connection
        self.connection.autocommit = True
        with self.connection.cursor() as cursor:
            cursor.execute(
                f"CREATE TABLE {self.table} (chunk text PRIMARY KEY, "
                + ("keys text NOT NULL, " if self.keys else "")
                + "claims integer NOT NULL DEFAULT 1, flushes integer NOT NULL DEFAULT 0, "
                "done boolean NOT NULL DEFAULT false)"
            )
            if self.keys:
                cursor.execute(f"ALTER TABLE {self.table} ALTER COLUMN keys SET COMPRESSION lz4")
        pgconn = self.connection.pgconn
        for name, statement in self.statements().items():
            pgconn.send_prepare(b"floor_" + name, statement.encode())
            self._answer()

    def close(self) -> None:
        if self.raw is not None:
            self.connection.autocommit = False
            self.raw.close()  # back to its pool
            self.raw = self.connection = None

    def send(self, name: bytes, *more: bytes) -> None:
        """Send a statement, the answer of the one before read first."""
        if self.pending:
            self._answer()
        pgconn = self.connection.pgconn
        pgconn.send_query_prepared(b"floor_" + name, [self.chunk, *more])
        self.connection.wait(generators.send(pgconn))
        self.pending = True

    def _answer(self) -> None:
        self.pending = False
        for result in self.connection.wait(generators.fetch_many(self.connection.pgconn)):
            if result.error_message:
                raise RuntimeError(result.error_message.decode())

    def start(self) -> None:
        """The chunk starts: its lookup sent."""
        self.chunk = uuid.uuid4().hex.encode()  # a new row, as a first delivery's claim inserts
        self.send(b"probe")

    def claim(self, size: int, keys: list[str]) -> None:
        """Before the first item: the lookup's answer read, the claim sent."""
        self.size, self.ran = size, 0
        if self.keys:
            self.send(b"claim", _keys_json(keys).encode())
        else:
            self.send(b"claim")

    def flushed(self) -> None:
        """``flush_items``: called where the ledger writes done items, and at the chunk's end
        (whose durable write carries them)."""
        if self.ran < self.size:
            self.send(b"flush")

    def end(self) -> None:
        self.send(b"end")

    def settle(self) -> None:
        if self.pending:
            self._answer()


_floor = _Floor("bench_batch_floor")
_keyed_floor = _Floor("bench_batch_floor_keys", keys=True)


class _FloorTask(BatchTask):
    """``ledger=False`` plus the floor's statements (``_Floor``), sent where the ledger sends
    its own: the lookup when the chunk starts, the claim once its keys are known, the flushes,
    and the end once its items are done, settled after the chunk's summary is built."""

    floor = _floor

    def run_batch(
        self, items: Any, batch_id: Any = None, keys: Any = None, offset: int = 0
    ) -> dict[str, Any]:
        self.floor.start()
        return super().run_batch(items, batch_id, keys, offset)

    def _run_chunk(self, chunk: Any, ledger: Any, offset: int) -> dict[str, Any]:
        self.floor.claim(len(chunk.items), chunk.keys)
        summary = super()._run_chunk(chunk, ledger, offset)
        self.floor.settle()
        return summary

    def _finish(self, chunk: Any, ledger: Any, dead: Any) -> None:
        super()._finish(chunk, ledger, dead)
        self.floor.end()

    def flush_items(self) -> None:
        self.floor.flushed()


class _KeyedFloorTask(_FloorTask):
    """``_FloorTask`` whose claim also stores the chunk's keys (``_Floor(keys=True)``)."""

    floor = _keyed_floor


@ledger_app.task(base=_FloorTask, bind=True, name="benchbatch.floor", ledger=False)
def floor_only(self: BatchTask, item: int) -> None:
    _work(item)
    _floor.ran += 1


@ledger_app.task(base=_KeyedFloorTask, bind=True, name="benchbatch.floor_keys", ledger=False)
def floor_with_keys(self: BatchTask, item: int) -> None:
    _work(item)
    _keyed_floor.ran += 1


class LedgerRow(NamedTuple):
    """Items/s of one item cost, each the median of its rounds."""

    label: str
    without: float
    with_: float
    #: ``ledger=False`` plus only the statements a ledger's promises need (``_Floor``).
    floor: float
    #: ... whose claim also stores the chunk's keys (``_Floor(keys=True)``).
    keyed: float


def ledger_measure(url: str) -> list[LedgerRow]:
    """A ``LedgerRow`` per item cost: the four tasks take turns, round by round; every chunk
    is a new batch."""
    ledger_app.conf.taskkit_database_url = url
    with get_engine(url).begin() as connection:
        connection.exec_driver_sql("CREATE TABLE bench_batch_effects (item bigint PRIMARY KEY)")
    _floor.open(url)
    _keyed_floor.open(url)
    contestants = (
        ("without", without_ledger),
        ("floor", floor_only),
        ("keyed", floor_with_keys),
        ("with", with_ledger),
    )
    measured = []
    try:
        for label, cost in ITEM_COSTS:
            _cost[0] = cost
            times: dict[str, list[float]] = {name: [] for name, _ in contestants}
            rounds = (
                LEDGER_ROUNDS_NO_WORK
                if cost == 0
                else LEDGER_ROUNDS_CHEAP
                if cost is not None and cost <= 20e-6
                else LEDGER_ROUNDS
            )
            for round_ in range(rounds + 1):
                turn = round_ % len(contestants)
                for name, task in contestants[turn:] + contestants[:turn]:
                    items = list(range(round_ * CHUNK, (round_ + 1) * CHUNK))
                    if cost is None:  # the upserts' table starts empty for every chunk
                        with get_engine(url).begin() as connection:
                            connection.exec_driver_sql("TRUNCATE bench_batch_effects")
                    start = time.perf_counter()
                    summary = task(items, batch_id=uuid.uuid4().hex)
                    elapsed = time.perf_counter() - start
                    assert summary["successful"] == CHUNK, summary
                    if round_:  # round 0 warms connections and caches
                        times[name].append(elapsed)
            rate = {name: CHUNK / statistics.median(times[name]) for name, _ in contestants}
            measured.append(
                LedgerRow(label, rate["without"], rate["with"], rate["floor"], rate["keyed"])
            )
    finally:
        _floor.close()
        _keyed_floor.close()
    return measured


#: Chunks timed statement by statement (``ledger_pieces``).
PIECE_ROUNDS = 30


class _Stopwatch:
    """Appends the seconds since its start (or last lap) to ``times[name]``."""

    def __init__(self, times: dict[str, list[float]]) -> None:
        self.times = times
        self.restart()

    def restart(self) -> None:
        self.started = time.perf_counter()

    def lap(self) -> float:
        now = time.perf_counter()
        elapsed, self.started = now - self.started, now
        return elapsed

    def __call__(self, name: str, before: float = 0.0) -> None:
        self.times[name].append(before + self.lap())


def ledger_pieces(url: str) -> dict[str, float]:
    """Milliseconds (medians) of the ledger's statements of a 1,000-key chunk, timed alone on
    the connection ``BatchTask`` uses (``with ItemLedger(...)``), each as ``BatchTask`` makes
    it and waited for: the claim a redelivery waits for; a first delivery's probe and claim
    (the probe answered during a 1 ms pause, as while the chunk's keys are computed; the claim
    sent without waiting); a mid-chunk flush waited for and as sent (``wait=False``, its answer
    read during the next millisecond, as the next items would run); the durable end waited
    for, and sent then settled after a 1 ms pause (as the summary is built); and a bare
    ``SELECT 1`` on a pooled connection: where a chunk's ledger cost goes."""
    keys = [str(i) for i in range(CHUNK)]
    engine = get_engine(url)
    names = ("claim", "probe", "claim sent", "flush", "flush sent", "end", "end sent", "SELECT 1")
    times: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(PIECE_ROUNDS):
        batch = uuid.uuid4().hex
        with ItemLedger(batch, engine) as first:
            timed = _Stopwatch(times)
            first.probe(0)
            timed("probe")
            time.sleep(0.001)  # the keys' computation
            timed.restart()
            first.claim(keys, durable=False, fenced=True, position=0)
            timed("claim sent")
            first.finish(done_at=range(CHUNK // 4), durable=False)
            timed("flush")
            first.finish(done_at=range(CHUNK // 2), durable=False, wait=False)
            timed("flush sent")
            time.sleep(0.001)  # the next items
            timed.restart()
            first.finish(done_at=range(CHUNK // 2, CHUNK), wait=False)
            sent = timed.lap()
            time.sleep(0.001)  # the summary
            timed.restart()
            first.settle()
            timed("end sent", sent)
        with ItemLedger(batch, engine) as again:  # a redelivery: its claim waited for
            timed = _Stopwatch(times)
            again.claim(keys, durable=False, fenced=True)
            timed("claim")
            again.finish(done_at=[0])
            timed("end")
        with get_engine(url).connect() as connection:
            timed = _Stopwatch(times)
            connection.exec_driver_sql("SELECT 1").all()
            timed("SELECT 1")
    return {name: statistics.median(values) * 1e3 for name, values in times.items()}


def _shown(ratio: float, target: float) -> str:
    """``ratio`` to two places, or three where two would round a miss up to its target."""
    shown = f"{ratio:.2f}x"
    return f"{ratio:.3f}x" if ratio < target and float(shown[:-1]) >= target else shown


def _ledger_verdict(measured: list[LedgerRow], pieces: dict[str, float]) -> str:
    """What the ratios say against their targets: for a missed row, whether the floor (the
    promises' statements alone) and the floor with the chunk's keys miss too, and where a
    chunk's ledger cost goes."""
    missed = []
    for row, target in zip(measured, LEDGER_TARGETS, strict=True):
        if row.with_ / row.without >= target:
            continue
        floor, keyed = row.floor / row.without, row.keyed / row.without
        head = (
            f"{row.label.split(' (')[0]}: {_shown(row.with_ / row.without, target)} against "
            f"{target}x, where the promises' statements alone reach {floor:.2f}x and with the "
            f"chunk's keys stored by the claim {keyed:.2f}x"
        )
        if floor < target:
            missed.append(f"{head}: no ledger that keeps them reaches the target on this machine")
        elif keyed < target:
            missed.append(
                f"{head}: no ledger that keeps them and records each claimed item in its claim "
                "(as `batch_items` and `statuses` promise) reaches the target on this machine"
            )
        else:
            share = (1 / row.with_ - 1 / row.without) / (1 / row.keyed - 1 / row.without)
            missed.append(
                f"{head}: the ledger costs {share:.1f} times that, the rest is its own work "
                "(the flags it stores, the Python around them)"
            )
    first = measured[0]
    chunk_ms = CHUNK / first.without * 1e3
    floor_ms = (CHUNK / first.floor - CHUNK / first.without) * 1e3
    keyed_ms = (CHUNK / first.keyed - CHUNK / first.without) * 1e3
    ledger_ms = (CHUNK / first.with_ - CHUNK / first.without) * 1e3
    sent_ms = pieces["probe"] + pieces["claim sent"] + pieces["flush sent"] + pieces["end sent"]
    where = (
        f"With no item work the floor's four statements add {floor_ms:.2f} ms to a chunk "
        f"that takes {chunk_ms:.2f} ms without the ledger, {keyed_ms:.2f} ms with the keys, "
        f"the ledger {ledger_ms:.2f} ms. Timed alone on the same connection (median of "
        f"{PIECE_ROUNDS} chunks, a 1 ms sleep where the chunk would run its items or build its "
        f"summary): a first delivery's probe {pieces['probe']:.2f} ms and claim "
        f"{pieces['claim sent']:.2f} ms, a mid-chunk flush {pieces['flush sent']:.2f} ms "
        f"({pieces['flush']:.2f} ms if waited for), its durable end {pieces['end sent']:.2f} ms "
        f"sent and settled ({sent_ms:.2f} ms in all); waited for, as a redelivery's are, the "
        f"claim takes {pieces['claim']:.2f} ms and the end {pieces['end']:.2f} ms; a bare "
        f"`SELECT 1` on a pooled connection (checkout, ping, return) takes "
        f"{pieces['SELECT 1']:.2f} ms here."
    )
    if not missed:
        return f"Every target met. {where}"
    return "Missed in this run: " + "; ".join(missed) + ". " + where


def ledger_section() -> str:
    from benchmarks._harness import machine

    say("BatchTask with and without the ledger on PostgreSQL")
    with postgres_schema("taskkit_bench_batch") as url:
        measured = ledger_measure(url)
        pieces = ledger_pieces(url)
    rows = []
    for (label, without, with_, floor, keyed), target in zip(measured, LEDGER_TARGETS, strict=True):
        ratio = with_ / without
        cost_us = (1 / with_ - 1 / without) * 1e6
        rows.append(
            [
                label,
                f"{without:,.0f}",
                f"{floor:,.0f} ({floor / without:.2f}x)",
                f"{keyed:,.0f} ({keyed / without:.2f}x)",
                f"{with_:,.0f}",
                f"{cost_us:,.1f}",
                _shown(ratio, target) + (f" (target {target}x)" if ratio < target else ""),
            ]
        )
    load = os.getloadavg()[0]
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    commit = _commit_of(["taskkit/deadletter/_ledger.py", "taskkit/tasks/_batch.py", __file__])
    return f"""## BatchTask throughput with the item ledger on PostgreSQL

One chunk of {CHUNK:,} items (submit_batch's default chunk size) run by a `BatchTask` in
process, with the ledger on PostgreSQL (`ledger=True`, the default) and without it
(`ledger=False`); the same item function, no failures, so the difference is the ledger: one
row per chunk in `batch_chunks` (the keys once, a done and a dead flag per position), so a
chunk costs four one-row statements whatever its size, each its own transaction in autocommit
on a connection the worker thread keeps between chunks. When the chunk starts, before its keys
are computed, a lookup of the chunks of its batch at its position (`ItemLedger.probe`); once
the keys are known, the claim (an upsert of the keys, lz4-compressed, returning the flags),
sent without waiting for its answer when the lookup found no row of these keys (a first
delivery: nothing to skip), waited for otherwise (a redelivery skips what it finished); one
update of the done flags per `ledger_flush_every` (500) items (not the last report's: the end
writes the same flags), sent without waiting; and the chunk's last update, sent when its items
are done and settled (its answer read, or the write made again) once the chunk's summary is
built. The claim and the mid-chunk flushes commit without waiting for the WAL flush
(`synchronous_commit = off`: a killed worker loses nothing); the last write is durable and
carries every flag of the delivery, so it stores again what a crash of PostgreSQL itself could
lose. With psycopg the four skip SQLAlchemy's execute (prepared once per connection, read from
libpq): a first delivery's chunk waits for its end's WAL flush and little else, the other
round trips overlapping the keys' computation, the items and the summary.

The floor column is what no ledger keeping the same three promises can go under:
`ledger=False` plus the statements they need and nothing else, each one row of a table of its
own, sent where the ledger sends its own: a one-row lookup when the chunk starts, its answer
read before the first item (a redelivered chunk must know what to skip before it runs
anything); a claim of a new row, sent without waiting; an update every `ledger_flush_every`
items, sent without waiting and without a WAL flush (items re-run after a kill stay within
`ledger_flush_every + batch_size`); and one durable update sent when the items are done and
read before the task returns (the chunk's end must be on disk before its message is acked).
Prepared and sent through libpq as the ledger sends its own, with no keys and no flags. The
floor + keys column is the same with the chunk's keys stored by its claim, as the ledger's
JSON in a column compressed with lz4 as `batch_chunks.keys` is: what lets `batch_items` and
`ItemLedger.statuses` answer for each item from the moment its chunk is claimed (leaving the
keys to a later statement would leave a claimed chunk's items unlisted until then). Median of
{LEDGER_ROUNDS_NO_WORK} chunks per task with no work, {LEDGER_ROUNDS_CHEAP} at 20 µs,
{LEDGER_ROUNDS} for the others, the four tasks taking turns (each round in another order);
each chunk is a new batch. Run in process because the broker and the worker add the same cost
to all four and would only move the ratios towards 1.

{table(LEDGER_HEADERS, rows)}

Targets (issue 18): 0.5x with no work, 0.9x at 20 µs, 0.97x at 100 µs (0.8x for the upsert).
{_ledger_verdict(measured, pieces)}

Before this ledger (a row per item, written twice: claimed, then done), the same section run
on its commit (7f0ec71) right before this one, at the same load (load average 1.3, 2026-12-01
20:01 UTC), gave 0.06x with no work, 0.61x at 20 µs and 0.88x at 100 µs: a ledger cost of 12.8
to 14.4 µs per item against 2.5 to 2.6 µs now (the claim's `INSERT` of 1,000 rows alone took
4.8 ms of server time, more than the whole chunk without the ledger). On this machine, at the
commit before the kept connection and the flags-only updates (218e8d9, load average 0.9,
2026-12-01 22:45 UTC), the same section gave 0.24x with no work, 0.74x at 20 µs and 0.91x at
100 µs (a ledger cost of 9.8 µs per item), and 0.31x, 0.82x and 0.95x (6.1 µs) right after, in
the same minutes. The raw psycopg path and the unanswered mid-chunk flush, against the commit
before them (e7a3f62), four runs each taking turns, 30 chunks per row (2026-12-02 02:33 UTC,
load average 1.0 to 1.3): with no work 0.31x to 0.41x before, 0.42x to 0.46x after; at 20 µs
0.87x to 0.92x before, 0.91x to 0.92x after; at 100 µs 0.97x before, 0.98x after. At load 2.2
to 3.2 (02:25 UTC) the same runs gave 0.30x to 0.37x before and 0.39x to 0.44x after with no
work, 0.85x to 0.86x and 0.87x to 0.90x at 20 µs.
The probe, the claim and the end not waited for (b753f5a), on this machine on 2026-12-02
between 10:58 and 11:45 UTC: with no work 0.51x at the commit before (fde93a5), 0.45x to 0.52x
in seven runs of this round's earlier steps (a lean path for the writes, the end settled after
the summary, 801 chunks in a rotating order; the floor of that time, whose claim was waited
for: 0.53x to 0.61x), then 0.56x, 0.57x and 0.60x with the probe, and 0.56x in a whole
`make bench`.

Measured with `python -m benchmarks.bench_batch ledger` on {machine()}, {when}, commit
{commit}, load average {load:.1f} (other jobs on the same 2 cores).
"""


# -- a chunk whose pool process is killed, with 50 chunks queued ---------------------------------

REDIS_URL = os.environ.get("TASKKIT_BENCH_TASKS_REDIS_URL", "redis://127.0.0.1:6379/14")
#: Shared by the parent and its worker subprocess (``celery -A benchmarks.bench_batch:requeue_app
#: worker``), so both build the same app.
RUN_VARIABLE = "TASKKIT_BENCH_REQUEUE_RUN"
RUN = os.environ.get(RUN_VARIABLE) or uuid.uuid4().hex[:10]
PREFIX = f"tk-bench-requeue-{RUN}"
QUEUE = f"{PREFIX}-q"
ROOT = Path(__file__).resolve().parent.parent
#: Chunks waiting while the two pool processes run one each.
QUEUED = 50
#: Seconds one chunk runs (its single item sleeps).
CHUNK_SECONDS = 0.5
#: Kills per contestant (the contestants take turns); each keeps its median.
KILLS = 5
#: Target (issue 15): the killed chunk runs again within 5 s, median.
REQUEUE_TARGET = 5.0
TIMEOUT = 120.0

requeue_app = create_app(
    "benchrequeue",
    settings=load_settings(broker_url=REDIS_URL),
    task_default_queue=QUEUE,
    broker_transport_options={"global_keyprefix": f"{PREFIX}:"},
    result_backend_transport_options={"global_keyprefix": f"{PREFIX}:"},
)
_events = redis.Redis.from_url(REDIS_URL)


def _nap(item: dict[str, Any]) -> None:
    """The item function: note that the chunk's body runs (past its lease), then sleep."""
    event = {"offset": item["id"], "pid": os.getpid(), "time": time.time()}
    _note("starts", item["batch"], event)
    time.sleep(float(item["pause"]))


class _CeleryRetryBatchTask(BatchTask):
    """A BatchTask with Celery's own worker request: its retry after a lost pool process is sent
    after ``default_retry_delay`` to the back of the queue (taskkit's behaviour before issue 15)."""

    Request = "celery.worker.request:Request"


@requeue_app.task(base=BatchTask, bind=True, shared=False, name="benchrequeue.taskkit")
def front_requeue(self: BatchTask, item: dict[str, Any]) -> None:
    _nap(item)


@requeue_app.task(base=_CeleryRetryBatchTask, bind=True, shared=False, name="benchrequeue.celery")
def celery_retry(self: BatchTask, item: dict[str, Any]) -> None:
    _nap(item)


#: The embedded broker's folder (``taskkit+sqlite`` queue, results, lease files), named after
#: the run: the parent and its worker subprocess build the same app.
EMBEDDED_HOME = Path(tempfile.gettempdir()) / PREFIX


@functools.cache
def _embedded() -> tuple[Any, Any, Any]:
    """The app on the embedded default broker under ``EMBEDDED_HOME`` and its two tasks (made on
    first use: importing this module for another section makes no folder)."""
    app = create_app(
        "benchrequeueembedded",
        settings=load_settings(home=EMBEDDED_HOME, broker_url="", result_backend="", lease_url=""),
        task_default_queue=QUEUE,
    )

    @app.task(base=BatchTask, bind=True, shared=False, name="benchrequeue.embedded.taskkit")
    def front(self: BatchTask, item: dict[str, Any]) -> None:
        _nap(item)

    @app.task(
        base=_CeleryRetryBatchTask, bind=True, shared=False, name="benchrequeue.embedded.celery"
    )
    def back(self: BatchTask, item: dict[str, Any]) -> None:
        _nap(item)

    return app, front, back


def __getattr__(name: str) -> Any:
    """``requeue_embedded_app``, for ``celery -A benchmarks.bench_batch:requeue_embedded_app``."""
    if name == "requeue_embedded_app":
        return _embedded()[0]
    raise AttributeError(name)


CELERY_LABEL = "Celery's retry (`retry_on_worker_lost`: 2 s countdown, back of the queue)"
TASKKIT_LABEL = "**taskkit** (`FrontRequeueRequest`: at once, front of the queue)"
#: (broker, contestant, task); each broker's contestants take turns on one worker.
REQUEUE_CONTESTANTS: list[tuple[str, str, Any]] = [
    ("Redis", CELERY_LABEL, celery_retry),
    ("Redis", TASKKIT_LABEL, front_requeue),
]


def _requeue_contestants() -> list[tuple[str, str, Any]]:
    _, front, back = _embedded()
    embedded = "embedded (`taskkit+sqlite`)"
    return [*REQUEUE_CONTESTANTS, (embedded, CELERY_LABEL, back), (embedded, TASKKIT_LABEL, front)]


def _note(kind: str, batch_id: Any, event: dict[str, Any]) -> None:
    if batch_id:
        key = f"{PREFIX}:{kind}:{batch_id}"
        _events.pipeline(transaction=False).rpush(key, json.dumps(event)).expire(
            key, 3600
        ).execute()


def _ours(sender: Any) -> bool:
    return str(getattr(sender, "name", "")).startswith("benchrequeue.")


@signals.task_postrun.connect(weak=False)
def _ended(sender: Any = None, kwargs: Any = None, **_: Any) -> None:
    if _ours(sender):
        kwargs = kwargs or {}
        _note("ends", kwargs.get("batch_id"), {"offset": kwargs.get("offset"), "time": time.time()})


@signals.task_retry.connect(weak=False)
def _retried(sender: Any = None, request: Any = None, **_: Any) -> None:
    """In the worker's main process: the retry of a chunk whose pool process died was sent."""
    if _ours(sender):
        kwargs = getattr(request, "kwargs", None) or {}
        _note("retries", kwargs.get("batch_id"), {"time": time.time()})


def _events_of(kind: str, batch_id: str) -> list[dict[str, Any]]:
    return [json.loads(raw) for raw in _events.lrange(f"{PREFIX}:{kind}:{batch_id}", 0, -1)]


def _until(
    condition: Callable[[], Any], what: str, worker: subprocess.Popen[bytes], log: IO[bytes]
) -> Any:
    deadline = time.monotonic() + TIMEOUT
    while not (found := condition()):
        if worker.poll() is not None:
            raise RuntimeError(
                f"the benchmark worker exited while waiting for {what}:\n{_tail(log)}"
            )
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}:\n{_tail(log)}")
        time.sleep(0.02)
    return found


def _tail(log: IO[bytes]) -> str:
    log.seek(0)
    return "\n".join(log.read().decode(errors="replace").splitlines()[-20:]) or "(no output)"


@contextmanager
def _requeue_worker(
    database_url: str, app: str = "requeue_app"
) -> Iterator[tuple[subprocess.Popen[bytes], IO[bytes]]]:
    """One ``celery worker`` (prefork, concurrency 2) of ``benchmarks.bench_batch:<app>`` on
    this run's queue; stopped after, and the run's Redis keys deleted."""
    try:
        _events.ping()
    except redis.exceptions.ConnectionError as exc:
        raise RuntimeError(
            f"bench_batch needs Redis at {REDIS_URL} ({exc}); start it, or point "
            "TASKKIT_BENCH_TASKS_REDIS_URL at another server."
        ) from exc
    env = {
        **os.environ,
        RUN_VARIABLE: RUN,
        "TASKKIT_DATABASE_URL": database_url,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    command = [
        sys.executable, "-m", "celery", "-A", f"benchmarks.bench_batch:{app}", "worker",
        "--pool=prefork", "--concurrency=2", "--without-gossip", "--without-mingle",
        "--without-heartbeat", "-Q", QUEUE, "-n", f"{PREFIX}-{app}@bench", "-l", "info",
    ]  # fmt: skip
    with tempfile.TemporaryFile() as log:
        worker = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        try:
            _until(lambda: b" ready." in (log.seek(0), log.read())[1], "the worker", worker, log)
            yield worker, log
        finally:
            if worker.poll() is None:
                worker.terminate()
                try:
                    worker.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(worker.pid, signal.SIGKILL)
                    worker.wait(timeout=5)
            with suppress(ProcessLookupError):
                os.killpg(worker.pid, signal.SIGKILL)
            keys = list(_events.scan_iter(match=f"{PREFIX}:*", count=1000))
            for start in range(0, len(keys), 1000):
                _events.delete(*keys[start : start + 1000])


def _kill_one(task: Any, worker: subprocess.Popen[bytes], log: IO[bytes]) -> tuple[float, float]:
    """Send ``QUEUED`` + 2 one-item chunks, SIGKILL the pool process of the first that starts:
    (seconds from the kill until the retry was sent, until the chunk runs again)."""
    batch_id = uuid.uuid4().hex
    items = [{"id": n, "pause": CHUNK_SECONDS, "batch": batch_id} for n in range(QUEUED + 2)]
    submit_batch(task, items, chunk_size=1, batch_id=batch_id)
    first = _until(lambda: _events_of("starts", batch_id), "a chunk to start", worker, log)[0]
    os.kill(first["pid"], signal.SIGKILL)
    killed = time.time()
    again = _until(
        lambda: [e for e in _events_of("starts", batch_id)[1:] if e["offset"] == first["offset"]],
        "the killed chunk to run again",
        worker,
        log,
    )[0]
    (retried, *_) = _events_of("retries", batch_id)
    # Drop what is still queued, and let the chunks that run end: the next kill starts idle.
    if task.app is requeue_app:
        for key in _events.scan_iter(match=f"{PREFIX}:{QUEUE}*"):
            _events.delete(key)
    else:  # the embedded broker: its ready rows (the running chunks' rows are held, they stay)
        with task.app.connection_for_write() as connection:
            connection.default_channel.queue_purge(QUEUE)
    _until(
        lambda: len(_events_of("ends", batch_id)) == len(_events_of("starts", batch_id)) - 1,
        "the running chunks to end",
        worker,
        log,
    )
    time.sleep(CHUNK_SECONDS)
    return retried["time"] - killed, again["time"] - killed


def requeue_measure(url: str) -> dict[tuple[str, str], list[tuple[float, float]]]:
    """The kills of every (broker, contestant): one worker per broker, its contestants taking
    turns."""
    contestants = _requeue_contestants()
    measured: dict[tuple[str, str], list[tuple[float, float]]] = {
        (broker, label): [] for broker, label, _ in contestants
    }
    try:
        for broker in dict.fromkeys(b for b, _, _ in contestants):
            turns = [(label, task) for b, label, task in contestants if b == broker]
            app = turns[0][1].app
            app.conf.taskkit_database_url = url
            name = "requeue_app" if app is requeue_app else "requeue_embedded_app"
            with _requeue_worker(url, name) as (worker, log):
                for number in range(1, KILLS + 1):
                    for label, task in turns:
                        sent, running = _kill_one(task, worker, log)
                        say(
                            f"  kill {number}/{KILLS}, {task.name}: retry sent after "
                            f"{sent:.2f} s, running again after {running:.2f} s"
                        )
                        measured[(broker, label)].append((sent, running))
    finally:
        shutil.rmtree(EMBEDDED_HOME, ignore_errors=True)
    return measured


REQUEUE_HEADERS = [
    "broker",
    "contestant",
    "kill -> retry sent, s (median)",
    "kill -> running again, s (median)",
    "min - max, s",
]


def requeue_section() -> str:
    from benchmarks._harness import machine

    say("A chunk whose pool process is killed, with 50 chunks queued (Redis, embedded broker)")
    with postgres_schema("taskkit_bench_requeue") as url:
        measured = requeue_measure(url)
    rows = []
    taskkit: dict[str, float] = {}
    for (broker, label), kills in measured.items():
        sent = statistics.median(k[0] for k in kills)
        running = [k[1] for k in kills]
        rows.append(
            [
                broker,
                label,
                f"{sent:.2f}",
                f"{statistics.median(running):.2f}",
                f"{min(running):.2f} - {max(running):.2f}",
            ]
        )
        if label == TASKKIT_LABEL:
            taskkit[broker] = statistics.median(running)
    verdicts = ", ".join(
        f"{broker} {median:.2f} s ({'met' if median < REQUEUE_TARGET else '**not met**'})"
        for broker, median in taskkit.items()
    )
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    commit = _commit_of(
        ["benchmarks/bench_batch.py", "taskkit/tasks/_requeue.py", "taskkit/broker/_transport.py"]
    )
    return f"""## A chunk whose pool process is killed, with {QUEUED} chunks queued

One `celery worker` subprocess (prefork, concurrency 2) per broker: on Redis (leases in Redis),
then on the embedded default broker (`taskkit+sqlite` under a temporary `TASKKIT_HOME`, lease
files, SQLite results); the ledger on PostgreSQL for both. A batch of {QUEUED + 2} one-item
chunks (`chunk_size=1`), each item sleeping
{CHUNK_SECONDS} s: two chunks run, {QUEUED} wait. The pool process running the first chunk is
SIGKILLed; measured are the seconds from the kill until the worker sent the chunk's retry
(Celery's `task_retry` signal, in the worker's main process) and until the chunk runs again
(its item function starts: past the chunk's lease and the ledger). Then the queue is emptied
and the next kill starts from an idle worker. {KILLS} kills per contestant, the two of a broker
taking turns; the same task body, only the worker's request class differs.

{table(REQUEUE_HEADERS, rows)}

Where Celery's time goes: the death is noticed and the retry sent within about 0.5 s (taskkit
checks the pool every 0.5 s), the lease of the dead process is taken over at once; the rest is
the queue: the retry waits its 2 s countdown at the back, behind every chunk that was waiting.
taskkit pushes the retry at the consuming end of the Redis list with no countdown
(`taskkit.tasks._requeue`). On the embedded broker the worker has no event loop: billiard's
threaded pool checks its processes every 0.8 s and fails the task of a dead one at the first
check more than `worker_lost_wait` (Celery's 10 s, 1 s in a `create_app` app) after it found
the death, in case a result sent before the death is still on its way: the retry is sent 1.6 to
2.4 s after the kill. taskkit then puts the copy in place of the held row, ahead of every
waiting row, in one transaction (`Channel._put_front`); Celery's retry waits its countdown and
the queue as on Redis.

Target: the killed chunk runs again within {REQUEUE_TARGET:g} s (median). Measured (taskkit):
{verdicts}.

Measured with `python -m benchmarks.bench_batch requeue` (this section alone) on {machine()},
{when}, commit {commit}, load average {os.getloadavg()[0]:.1f} (other jobs on the same 2 cores).
"""


# -- workers/batch.py: scoring a chunk, row at a time against one matrix ------------------------

#: Rows per chunk (submit_batch's default chunk size) and timed rounds (contestants take turns).
SCORE_ROWS = 1000
SCORE_ROUNDS = 7
#: Target (issue 18): a chunk scored as one matrix, at least 20x the rows/s of row at a time.
SCORE_TARGET = 20.0
SCORE_HEADERS = ["contestant", "µs per row (median)", "rows/s", "vs row at a time"]


def _score_row_at_a_time(run_id: int, model: Any, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """How workers/batch.py scored before issue 18 (commit 83d17ce,
    ``prediction_record``): each row checked, made a 1-row matrix and scored on its own."""
    import numpy as np

    from workers.batch import ID, feature_columns, row_features

    features = feature_columns(model)
    records = {}
    for row in rows:
        with suppress(ValueError):
            values = row_features(row, features)
            X = np.asarray([values], dtype=np.float64)
            confidence = float(np.max(model.predict_proba(X)[0]))
            records[str(row[ID])] = {
                "model_run_id": run_id,
                "item_key": str(row[ID]),
                "input_data": dict(zip(features, values, strict=True)),
                "prediction": model.predict(X)[0].item(),
                "confidence": confidence,
            }
    return records


def _score_checked_one_by_one(
    run_id: int, model: Any, rows: list[dict[str, Any]]
) -> dict[str, Any]:
    """One matrix, but each row checked by ``row_features`` in Python and each record built
    from NumPy scalars (workers/batch.py at commit d866ea3)."""
    import numpy as np

    from workers.batch import ID, feature_columns, row_features

    features = feature_columns(model)
    scorable, values = [], []
    for row in rows:
        with suppress(ValueError):
            values.append(row_features(row, features))
            scorable.append(row)
    X = np.asarray(values)
    predicted = model.predict(X)
    confidence = model.predict_proba(X).max(axis=1)
    return {
        str(row[ID]): {
            "model_run_id": run_id,
            "item_key": str(row[ID]),
            "input_data": dict(zip(features, x, strict=True)),
            "prediction": predicted[i].item(),
            "confidence": float(confidence[i]),
        }
        for i, (row, x) in enumerate(zip(scorable, values, strict=True))
    }


def _assert_same(records: dict[str, Any], others: dict[str, Any]) -> None:
    """The same records (confidences within rounding: a 1-row matrix sums in another order)."""
    assert records.keys() == others.keys()
    for key, record in records.items():
        other = others[key]
        assert {**record, "confidence": 0} == {**other, "confidence": 0}, key
        assert math.isclose(record["confidence"], other["confidence"], rel_tol=1e-9), key


class _Refusing:
    """The model, except that ``predict`` raises on a matrix holding a row whose ``f0`` is in
    ``refuse`` (a model that fails on some inputs)."""

    def __init__(self, model: Any, refuse: set[float]) -> None:
        self.model, self.refuse = model, refuse
        self.n_features_in_ = model.n_features_in_

    def predict(self, X: Any) -> Any:
        if self.refuse & set(X[:, 0].tolist()):
            raise ArithmeticError("refused")
        return self.model.predict(X)

    def predict_proba(self, X: Any) -> Any:
        return self.model.predict_proba(X)


def score_measure() -> tuple[dict[str, float], int]:
    """µs per row of each contestant, median of ``SCORE_ROUNDS`` rounds (each the best of
    timeit repeats); and the number of ``predict`` calls of the bad chunk."""
    import pandas as pd
    from sklearn.linear_model import SGDClassifier

    from workers.batch import dataframe_rows, score_rows
    from workers.training import EXAMPLE_DATASET, TARGET

    data = pd.read_csv(EXAMPLE_DATASET)
    features = [f"f{i}" for i in range(10)]
    model = SGDClassifier(loss="log_loss", random_state=0)  # what workers.training trains
    model.fit(data[features].to_numpy(), data[TARGET].to_numpy())
    frame = data[features].iloc[:SCORE_ROWS].copy()
    frame.insert(0, "id", [f"row-{i}" for i in range(SCORE_ROWS)])
    rows = json.loads(json.dumps(dataframe_rows(frame, 1)))  # as a worker receives them
    bad = json.loads(json.dumps(rows))
    for i in range(0, SCORE_ROWS, SCORE_ROWS // 10):  # 10 rows the checks refuse
        bad[i]["f3"] = None
    refuse = {bad[i]["f0"] for i in (123, 777)}  # 2 rows the model raises on
    refusing = _Refusing(model, refuse)
    calls = 0

    def counted(X: Any) -> Any:
        nonlocal calls
        calls += 1
        return _Refusing.predict(refusing, X)

    _assert_same(_score_row_at_a_time(1, model, rows), score_rows(1, model, rows))
    _assert_same(_score_checked_one_by_one(1, model, rows), score_rows(1, model, rows))
    refused: dict[str, Exception] = {}
    refusing.predict = counted  # type: ignore[method-assign]
    assert len(score_rows(1, refusing, bad, refused=refused)) == SCORE_ROWS - 12
    assert sorted(refused) == ["row-123", "row-777"]
    refusing.predict = lambda X: _Refusing.predict(refusing, X)  # type: ignore[method-assign]
    cases: dict[str, Callable[[], object]] = {
        "row at a time (before: 1-row matrix, `predict` + `predict_proba` per row)": (
            lambda: _score_row_at_a_time(1, model, rows)
        ),
        "one matrix, rows checked one by one in Python (before this change)": (
            lambda: _score_checked_one_by_one(1, model, rows)
        ),
        "**`score_rows`: checked into one matrix, one call** (now)": (
            lambda: score_rows(1, model, rows)
        ),
        "`score_rows`, 10 rows refused by the checks, 2 by the model (bisected)": (
            lambda: score_rows(1, refusing, bad, refused={})
        ),
    }
    times: dict[str, list[float]] = {name: [] for name in cases}
    for round_number in range(1, SCORE_ROUNDS + 1):
        say(f"  round {round_number}/{SCORE_ROUNDS}")
        for name, case in cases.items():
            times[name].append(per_call_ns(case, repeat=3) / SCORE_ROWS / 1000)
    return {name: statistics.median(values) for name, values in times.items()}, calls


def scoring_section() -> str:
    say("workers/batch.py scoring: row at a time against one matrix")
    logging.disable(logging.CRITICAL)
    try:
        measured, calls = score_measure()
    finally:
        logging.disable(logging.NOTSET)
    names = list(measured)
    old, new = measured[names[0]], measured[names[2]]
    rows = [
        [name, f"{us:,.2f}", f"{1e6 / us:,.0f}", f"{old / us:,.1f}x"]
        for name, us in measured.items()
    ]
    ratio = old / new
    verdict = "met" if ratio >= SCORE_TARGET else "**not met**"
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    from benchmarks._harness import machine

    return f"""## Batch prediction: scoring a chunk row at a time against one matrix

`workers/batch.py`'s scoring of one chunk of {SCORE_ROWS:,} rows (submit_batch's default chunk
size), in process: rows as a worker receives them (JSON-decoded dicts of 10 float features),
the model `workers.training` trains (`SGDClassifier(loss="log_loss")`, `predict` and
`predict_proba`), the records `flush_items` stores built for each row. No database: this is the
scoring alone. Each figure is the median of {SCORE_ROUNDS} rounds, the contestants taking turns,
each round the best of timeit repeats. All contestants produce the same records (checked).

{table(SCORE_HEADERS, rows)}

Row at a time, each row pays a whole `predict` and `predict_proba` call (scikit-learn's input
checks, a 1x10 matrix): that fixed cost is the time. One matrix pays it once per chunk; what is
left per row is Python: the row's checks and its record. `feature_matrix` checks a usual row by
the types of its values (plain `float`/`int`, in C) and all rows' finiteness at once with
`np.isfinite`; only the other rows (NumPy scalars, None, text, bool, missing columns) go through
`row_features` one by one, which names each bad column. When `predict` raises, the matrix is cut
in halves until the rows the model refuses stand alone: the bad chunk above took {calls}
`predict` calls for its 2 refused rows, each of which is dead-lettered with the model's own
error while the others are stored.

Target: one matrix at least {SCORE_TARGET:g}x the rows/s of row at a time. Measured:
{ratio:,.1f}x, target {verdict}.

Measured with `python -m benchmarks.bench_batch scoring` (this section alone; `make bench` runs
it too) on {machine()}, {when}, commit {_commit_of(["workers/batch.py", __file__])}.
"""


def _commit_of(paths: list[str]) -> str:
    """HEAD's short hash, "+uncommitted" when one of ``paths`` differs from it."""
    root = Path(__file__).resolve().parent.parent
    head = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        cwd=root,
        check=False,
    )
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--", *paths],
        capture_output=True,
        text=True,
        cwd=root,
        check=False,
    )
    if head.returncode:
        return "unknown"
    return head.stdout.strip() + ("+uncommitted" if dirty.stdout.strip() else "")


def run_scoring() -> None:
    """``python -m benchmarks.bench_batch scoring``: this section alone, replaced in
    docs/benchmarks.md."""
    from benchmarks._harness import replace_section

    replace_section(scoring_section())


def run_ledger() -> None:
    """``python -m benchmarks.bench_batch ledger``: the ledger section alone, replaced in
    docs/benchmarks.md."""
    from benchmarks._harness import replace_section

    replace_section(ledger_section())


def run_requeue() -> None:
    """``python -m benchmarks.bench_batch requeue``: the requeue section alone, replaced in
    docs/benchmarks.md."""
    from benchmarks._harness import replace_section

    replace_section(requeue_section())


def run() -> str:
    return "\n".join([overhead_section(), ledger_section(), requeue_section(), scoring_section()])


if __name__ == "__main__" and sys.argv[1:] == ["scoring"]:
    run_scoring()
if __name__ == "__main__" and sys.argv[1:] == ["ledger"]:
    run_ledger()
if __name__ == "__main__" and sys.argv[1:] == ["requeue"]:
    run_requeue()
