"""Batches of thousands of items through worker subprocesses, on real Redis and PostgreSQL.

What is promised (``taskkit.tasks._batch``, ``taskkit.deadletter._ledger``, ``taskkit.deadletter``):

- 10,000 items, 1% failing on every attempt and 5% failing once, sent as 10 chunks: the
  summary counts every item once; exactly the always-failing items are in ``failed_ids``, in
  the dead-letter store (with their payload and attempts) and ``dead`` in the ledger; every
  other item is ``done`` and wrote its side effect exactly once.
- SIGKILL of the whole worker (main and pool processes) three times, and of one pool process
  once, at random moments while chunks run: the batch still completes on fresh workers, every
  item ends ``done`` or dead-lettered, the dead letters are exactly the always-failing items
  (no chunk ran out of retries: ``max_retries=8``), the side-effect table has every done item
  once, and an item runs again only if its worker died between running it and the next
  ledger flush: at most ``ledger_flush_every + batch_size`` items per interrupted chunk.
- Replay after the fix: the dead letters of a batch go back into the task, all succeed, the
  store has no waiting letter left for the task, the letters are ``replayed`` with the replay's
  task id, and the side effects are complete.

Kill moments are random; the seed is printed so a failure can be replayed. Worker logs are
printed when a test fails.
"""

from __future__ import annotations

import itertools
import os
import random
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, text

from taskkit.db.models import BatchItem
from taskkit.db.session import get_engine
from taskkit.deadletter import BatchProgress, DeadLetterStore, batch_progress
from taskkit.tasks import replay_dead_letters, submit_batch
from tests._support.workers import WorkerProcess, wait_for
from tests.batch import apps

CONCURRENCY = 2


@pytest.fixture
def workers(request: pytest.FixtureRequest) -> Iterator[list[WorkerProcess]]:
    started: list[WorkerProcess] = []
    yield started
    for worker in started:
        worker.stop()
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        for worker in started:
            print(f"\n----- {worker.log_path} (last 120 lines, cut at 400 characters) -----")
            print("\n".join(line[:400] for line in worker.log().splitlines()[-120:]))


def start(workers: list[WorkerProcess], name: str, log_dir: Path) -> WorkerProcess:
    worker = WorkerProcess(
        name, log_dir, app="tests.batch.apps", queue=apps.QUEUE, concurrency=CONCURRENCY
    )
    workers.append(worker)
    worker.wait_ready()
    return worker


def new_trial(count: int, pause: float | None = None) -> tuple[str, list[dict[str, Any]]]:
    """A nonce whose 1% items are broken, and ``count`` items of it."""
    nonce = uuid.uuid4().hex[:16]
    apps.set_broken(nonce)
    extra = {"pause": pause} if pause else {}
    return nonce, [{"id": n, "nonce": nonce, **extra} for n in range(count)]


def always_failing(count: int) -> list[int]:
    return [n for n in range(count) if apps.always_failing(n)]


def effect_rows(url: str, nonce: str) -> tuple[int, set[int]]:
    """Rows of the side-effect table for the trial, and the distinct items among them."""
    with get_engine(url).connect() as connection:
        rows = [
            int(item)
            for (item,) in connection.execute(
                text("SELECT item FROM batch_effects WHERE nonce = :nonce"), {"nonce": nonce}
            )
        ]
    return len(rows), set(rows)


def ledger_keys(url: str, batch_id: str, status: str) -> set[int]:
    with get_engine(url).connect() as connection:
        return {
            int(k)
            for k in connection.scalars(
                select(BatchItem.item_key).where(
                    BatchItem.batch_id == batch_id, BatchItem.status == status
                )
            )
        }


def progress(url: str, batch_id: str) -> BatchProgress:
    return batch_progress(batch_id, url)


def assert_dead_letters(store: DeadLetterStore, batch_id: str, items: list[dict[str, Any]]) -> None:
    """The batch's waiting letters are exactly the always-failing items, failed 3 times each
    with the item's own error (never a worker loss), carrying the item as their payload."""
    letters = store.list(batch_id=batch_id)
    assert sorted(int(str(letter.item_key)) for letter in letters) == always_failing(len(items))
    for letter in letters:
        assert letter.task_name == apps.flaky_items.name
        assert letter.error_type == "RuntimeError", letter.error_message
        assert letter.attempts == 3  # item_max_attempts=3
        assert letter.payload == items[int(str(letter.item_key))]


# -- 1. a big batch, no faults but the items' own ---------------------------------------------


def test_ten_thousand_items_with_failing_items_one_worker(
    env: dict[str, str], workers: list[WorkerProcess], tmp_path: Path
) -> None:
    url = env["TASKKIT_DATABASE_URL"]
    count = 10_000
    nonce, items = new_trial(count)
    start(workers, "big", tmp_path)

    began = time.monotonic()
    submission = submit_batch(apps.flaky_items, items, chunk_size=1000)
    summary = submission.get(timeout=90)
    took = time.monotonic() - began
    print(f"\n10,000 items in 10 chunks on 1 worker x {CONCURRENCY}: {took:.1f} s")

    dead = always_failing(count)
    assert len(dead) == 100
    assert summary["total"] == count
    assert summary["successful"] + summary["failed"] == count
    assert summary["failed"] == len(dead)
    assert sorted(summary["failed_ids"]) == dead
    assert summary["batch_id"] == submission.batch_id
    assert summary["skipped"] == 0

    assert progress(url, submission.batch_id) == BatchProgress(
        submission.batch_id, count, count - len(dead), len(dead), 0
    )
    assert ledger_keys(url, submission.batch_id, "dead") == set(dead)
    store = DeadLetterStore(url)
    assert_dead_letters(store, submission.batch_id, items)
    assert store.depth() == {apps.flaky_items.name: len(dead)}

    rows, distinct = effect_rows(url, nonce)
    assert rows == len(distinct) == count - len(dead)
    assert distinct == set(range(count)) - set(dead)

    # Without a kill nothing runs twice: 1 execution, 2 for the 5% that fail once, 3 for the
    # always-failing ones (each side effect exactly once).
    executions = apps.runs(nonce)
    expected = {
        n: 3 if apps.always_failing(n) else 2 if apps.failing_once(n) else 1 for n in range(count)
    }
    assert executions == expected
    assert apps.effects(nonce) == dict.fromkeys(distinct, 1)


# -- 2. SIGKILL mid-batch -------------------------------------------------------------------


KILL_ITEMS = 6000
KILL_CHUNK = 500
#: Seconds each item sleeps in the kill test, so that a chunk runs for a few seconds.
KILL_PAUSE = 0.004
#: Items done before the first kill, and between two kills, at least.
KILL_SPACING = 100


def in_flight(batch_id: str, pids: set[int]) -> dict[int, dict[str, Any]]:
    """The chunk deliveries running now in these processes: ``{pid: start event}``."""
    last: dict[int, dict[str, Any]] = {}
    for event in apps.chunk_events(batch_id):
        last[event["pid"]] = event
    return {pid: event for pid, event in last.items() if pid in pids and event["event"] == "start"}


def deliveries(
    batch_id: str, killed: dict[tuple[str, int, float], float]
) -> tuple[dict[int, list[tuple[float, float]]], list[tuple[str, int, float]]]:
    """``({offset: [(start, end), ...]}, open)``: each chunk's deliveries that ran (a copy
    dropped because the chunk was running elsewhere is left out), a killed one ending at its
    kill; and the starts with neither an end nor a kill."""
    spans: dict[int, list[tuple[float, float]]] = {}
    running: dict[int, dict[str, Any]] = {}
    for event in apps.chunk_events(batch_id):
        if event["event"] == "start":
            running[event["pid"]] = event
            continue
        began = running.pop(event["pid"], None)
        if began is not None and event["state"] != "IGNORED":
            spans.setdefault(began["offset"], []).append((began["time"], event["time"]))
    still: list[tuple[str, int, float]] = []
    for pid, began in running.items():
        name = (began["task_id"], pid, began["time"])
        if name in killed:
            spans.setdefault(began["offset"], []).append((began["time"], killed[name]))
        else:
            still.append(name)
    return {o: sorted(r) for o, r in spans.items()}, still


def test_sigkill_of_workers_and_a_pool_process_mid_batch(
    env: dict[str, str], workers: list[WorkerProcess], tmp_path: Path
) -> None:
    url = env["TASKKIT_DATABASE_URL"]
    seed = random.randrange(10**6)
    print(f"\nkill test seed {seed}")
    rng = random.Random(seed)
    nonce, items = new_trial(KILL_ITEMS, pause=KILL_PAUSE)
    plan = ["worker", "worker", "worker", "pool"]
    rng.shuffle(plan)

    worker = start(workers, "w0", tmp_path)
    began = time.monotonic()
    submission = submit_batch(apps.flaky_items, items, chunk_size=KILL_CHUNK)
    batch_id = submission.batch_id

    kills: list[dict[str, Any]] = []
    number = 0
    while plan:  # a kill that found no chunk running (it ended just then) is done again
        number += 1
        assert number <= 2 * 4, "the kills keep missing the running chunks"
        kind = plan[0]
        floor = progress(url, batch_id).done
        wait_for(
            lambda f=floor, w=worker: (
                progress(url, batch_id).done >= f + KILL_SPACING
                and len(in_flight(batch_id, w.children())) > 0
            ),
            60,
            f"chunks running before kill {number}",
        )
        time.sleep(rng.uniform(0.0, 1.2))  # anywhere inside the chunks
        busy = in_flight(batch_id, worker.children())
        at = progress(url, batch_id)
        assert at.finished < at.total * 0.8, (
            f"kill {number}: the batch is almost done ({at}); it is too fast for this test"
        )
        if kind == "pool":
            if not busy:
                continue
            victims = {rng.choice(sorted(busy))}
            os.kill(next(iter(victims)), signal.SIGKILL)
        else:
            victims = worker.children()
            worker.kill()
        moment = time.time()
        hit = list(in_flight(batch_id, victims).values())  # the dead processes' last chunks
        kills.append({"kind": kind, "time": moment, "hit": hit, "finished": at.finished})
        if hit:
            plan.pop(0)
        print(
            f"kill {number}: {kind} at {at.finished}/{at.total} items finished, "
            f"chunks at offsets {sorted(e['offset'] for e in hit)} interrupted"
        )
        if kind == "worker":
            worker = start(workers, f"w{number}", tmp_path)

    wait_for(
        lambda: progress(url, batch_id).finished == KILL_ITEMS,
        90,
        "every item done or dead-lettered",
        step=0.25,
    )
    took = time.monotonic() - began
    summary = submission.get(timeout=30)

    # Every chunk delivery ended or was killed, and two deliveries of a chunk never overlapped
    # (the chunk's lease): a killed one ends at its kill.
    killed = {(e["task_id"], e["pid"], e["time"]): k["time"] for k in kills for e in k["hit"]}
    wait_for(
        lambda: not deliveries(batch_id, killed)[1],
        10,
        "the last chunks' end events",
    )
    spans, _ = deliveries(batch_id, killed)
    for offset, runs in spans.items():
        for (_, end), (begin, _) in itertools.pairwise(runs):
            assert begin >= end, f"two deliveries of the chunk at {offset} ran at once"
    print(
        f"{sum(map(len, spans.values()))} chunk deliveries for {len(spans)} chunks: "
        + ", ".join(f"{o}: {len(r)}" for o, r in sorted(spans.items()) if len(r) > 1)
    )

    # Where the kills landed, and how long until each interrupted chunk ran again.
    landed = [kill for kill in kills if kill["hit"]]
    assert [k["kind"] for k in landed].count("worker") == 3
    assert [k["kind"] for k in landed].count("pool") == 1
    events = apps.chunk_events(batch_id)
    recoveries: dict[str, list[float]] = {"worker": [], "pool": []}
    for kill in landed:
        waited = []
        for hit in kill["hit"]:
            restarts = [
                e["time"]
                for e in events
                if e["event"] == "start"
                and e["offset"] == hit["offset"]
                and e["time"] > kill["time"]
            ]
            assert restarts, f"chunk at offset {hit['offset']} never ran again after its kill"
            waited.append(min(restarts) - kill["time"])
        recoveries[kill["kind"]].extend(waited)
        print(
            f"{kill['kind']} kill: chunk(s) at {[h['offset'] for h in kill['hit']]} running "
            f"again after {', '.join(f'{w:.1f} s' for w in waited)}"
        )
    interrupted = sum(len(kill["hit"]) for kill in landed)

    # Every item is done or dead-lettered; the dead ones are exactly the always-failing ones:
    # no chunk ran out of its retries (8) over 4 kills, so none was dead-lettered as a whole.
    dead = always_failing(KILL_ITEMS)
    assert progress(url, batch_id) == BatchProgress(
        batch_id, KILL_ITEMS, KILL_ITEMS - len(dead), len(dead), 0
    )
    assert ledger_keys(url, batch_id, "dead") == set(dead)
    store = DeadLetterStore(url)
    assert_dead_letters(store, batch_id, items)
    assert summary["total"] == KILL_ITEMS
    assert summary["successful"] == KILL_ITEMS - len(dead)
    assert {chunk.state for chunk in submission.result.results} == {"SUCCESS"}
    assert sorted(summary["failed_ids"]) == dead

    # The side effect of every done item, once (the upsert absorbs the re-executions).
    done = ledger_keys(url, batch_id, "done")
    assert done == set(range(KILL_ITEMS)) - set(dead)
    rows, distinct = effect_rows(url, nonce)
    assert rows == len(distinct)
    assert distinct == done

    # Re-executions: only the items run since their chunk's last ledger flush (at most
    # ledger_flush_every + batch_size of them) per interrupted chunk, plus the always-failing
    # items of the chunk that had not been dead-lettered yet (letters are written at its end).
    effects = apps.effects(nonce)
    rewritten = {n: c - 1 for n, c in effects.items() if c > 1}
    extra_runs = sum(apps.runs(nonce).values()) - sum(
        3 if apps.always_failing(n) else 2 if apps.failing_once(n) else 1 for n in range(KILL_ITEMS)
    )
    per_chunk = apps.flaky_items.ledger_flush_every + apps.flaky_items.batch_size
    print(
        f"{KILL_ITEMS} items, {len(landed)} kills, {interrupted} chunk deliveries interrupted: "
        f"done in {took:.1f} s; {len(rewritten)} items wrote their side effect again "
        f"({sum(rewritten.values()) / len(landed):.0f} per kill, "
        f"{sum(rewritten.values()) / interrupted:.0f} per interrupted chunk, bound {per_chunk}); "
        f"{extra_runs} executions beyond an uninterrupted run's; whole-worker kill to chunk "
        f"running again {min(recoveries['worker']):.1f}-{max(recoveries['worker']):.1f} s, "
        f"pool-process kill {recoveries['pool'][0]:.1f} s; summary skipped {summary['skipped']}"
    )
    assert sum(rewritten.values()) <= interrupted * per_chunk, f"seed {seed}"
    failing_per_chunk = 3 * len(always_failing(KILL_CHUNK))
    assert extra_runs <= interrupted * (per_chunk + failing_per_chunk), f"seed {seed}"


# -- 3. replay after the fix ----------------------------------------------------------------


def test_replay_of_a_batchs_dead_letters_after_the_fix(
    env: dict[str, str], workers: list[WorkerProcess], tmp_path: Path
) -> None:
    url = env["TASKKIT_DATABASE_URL"]
    count = 1000
    nonce, items = new_trial(count)
    start(workers, "replay", tmp_path)
    submission = submit_batch(apps.flaky_items, items, chunk_size=250)
    summary = submission.get(timeout=60)
    dead = always_failing(count)
    assert sorted(summary["failed_ids"]) == dead
    store = DeadLetterStore(url)
    waiting = store.list(batch_id=submission.batch_id)
    assert len(waiting) == len(dead)
    assert store.depth() == {apps.flaky_items.name: len(dead)}

    apps.set_broken(nonce, False)  # the fix
    began = time.monotonic()
    replay = replay_dead_letters(store=store, batch_id=submission.batch_id, app=apps.app)

    assert sorted(replay.letter_ids) == sorted(letter.id for letter in waiting)
    (sent,) = replay.sent
    assert sent.task_name == apps.flaky_items.name
    assert str(sent.batch_id).startswith("replay-")
    outcome = apps.app.AsyncResult(sent.task_id).get(timeout=30)
    print(f"\nreplay of {len(dead)} dead letters: {time.monotonic() - began:.2f} s")
    assert outcome == {
        "total": len(dead),
        "successful": len(dead),
        "failed": 0,
        "failed_ids": [],
        "batch_id": sent.batch_id,
        "skipped": 0,
    }

    assert store.depth().get(apps.flaky_items.name, 0) == 0
    assert store.list(batch_id=submission.batch_id) == []
    letters = store.list(batch_id=submission.batch_id, status=None)
    assert sorted(int(str(letter.item_key)) for letter in letters) == dead
    for letter in letters:
        assert letter.status == "replayed"
        assert letter.replay_task_id == sent.task_id
        assert letter.replayed_into == apps.flaky_items.name
        assert letter.replays == 1
    assert store.list(batch_id=sent.batch_id, status=None) == []  # nothing failed again
    assert progress(url, sent.batch_id) == BatchProgress(sent.batch_id, None, len(dead), 0, 0)

    rows, distinct = effect_rows(url, nonce)
    assert rows == count
    assert distinct == set(range(count))
    executions = apps.runs(nonce)
    assert all(executions[n] == 4 for n in dead)  # 3 before the fix, 1 in the replay
