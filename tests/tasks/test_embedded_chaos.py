"""Nothing is lost on the embedded default when the whole worker is SIGKILLed (issue 15).

Everything runs as a user's laptop would: ``TASKKIT_HOME`` in a temporary folder and no broker,
result backend or database URL, so the broker, the results and the database are SQLite files
under it (the database migrated first, as ``taskkit db upgrade`` does). The visibility timeout
is the minimum (5 s), so a dead worker's messages come back quickly; leases are short.

1. 200 ``ResilientTask``s and a 2,000-item batch on one prefork worker (concurrency 2), killed
   (main process and pool processes: the whole process group) three times at random moments
   while tasks run, and restarted each time. Promised: every task completes (SUCCESS, side
   effect present); a task or chunk runs again only if an execution of it was interrupted by a
   kill, at most ``concurrency`` per kill; every batch item is ``done`` or ``dead`` exactly once
   in the ledger, the dead ones are exactly the failing items, each with one dead letter; the
   broker holds no message of the task queue afterwards.

   "Interrupted by a kill" is checked against what was running when the kill came: just before
   each kill the test reads, in one snapshot of the execution log, the tasks and chunks running
   in the worker's pool processes and the log's last row id. A task or chunk that runs again
   after that kill must be in that list, or have started after the snapshot (its start row is
   newer: the few milliseconds between the read and the SIGKILL), or have ended at most
   ``ACK_WINDOW`` s before the kill: its body had returned but its result was not stored yet, so
   the redelivered message finds no ``SUCCESS`` and runs (at-least-once; a result stored before
   the kill makes the copy skip without running). A task that finished earlier and runs again
   after a kill fails the test.

   Side effects: taskkit does not write a task's side effect once, the task does. A task killed
   after it wrote its effect runs again and tries again; the effect table has no unique key, and
   what keeps the second row out is the task's own atomic check-then-insert (``record_effect``
   in ``chaosapp``: the idempotent write docs/batch.md asks of an item function). So the test
   counts every write attempt as well (``attempts``: landed or kept out by the check), makes the
   first kill come while a task that has written its effect is still running (so it re-runs
   and writes again; without the check its effect is in the table twice), and asserts: every
   task's and item's effect is in the table exactly once (a write that got past the check would
   be a second row), a task killed after its write that ran again tried a second write and was
   kept out, no key was attempted more often than it ran, attempts >= landed writes.
2. A training run whose message the worker holds but has not started (``queued``, waiting for
   its countdown) when the whole worker is killed: it completes after the restart.

The kill moments are random; the seed is printed so that a failure can be replayed. Worker logs
are printed when a test fails. What the tasks did is read from ``chaos.db`` (see
``tests/tasks/chaosapp.py``).
"""

from __future__ import annotations

import itertools
import os
import random
import sqlite3
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from taskkit.config import get_settings, reset_settings
from taskkit.db.migrate import upgrade
from taskkit.db.models import BatchItem, ModelRun
from taskkit.db.session import dispose_engines, get_engine, session_scope
from taskkit.deadletter import DeadLetterStore, batch_progress
from taskkit.tasks import submit_batch, submit_run
from tests._support.workers import WorkerProcess, wait_for

APP = "tests.tasks.chaosapp"
CONCURRENCY = 2
KILLS = 3
#: Seconds before a kill within which an execution that ended may still run again: its result
#: was not stored yet (see the module docstring).
ACK_WINDOW = 1.0
TASKS = 200
ITEMS = 2000
CHUNK = 250
#: Seconds without any progress after which the wait for completion gives up: longer than a
#: restart plus the visibility timeout, so only a lost message can stall the work that long.
STALL = 25.0


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The embedded default under a temporary ``TASKKIT_HOME``, for this process and its
    workers: no other ``TASKKIT_*`` variable, visibility timeout 5 s, lease ttl 3 s."""
    home = tmp_path_factory.mktemp("embedded-chaos")
    with pytest.MonkeyPatch.context() as patch:
        for name in list(os.environ):
            if name.startswith("TASKKIT_") and name != "TASKKIT_TEST_RUN":
                patch.delenv(name)
        patch.setenv("TASKKIT_HOME", str(home))
        patch.setenv("TASKKIT_VISIBILITY_TIMEOUT", "5")
        patch.setenv("TASKKIT_LEASE_TTL", "3")
        reset_settings()
        upgrade()
        from tests.tasks import chaosapp

        chaosapp.connect()  # the log's tables exist before any worker or reader needs them
        try:
            yield home
        finally:
            chaosapp.disconnect()
            dispose_engines()
            reset_settings()
    reset_settings()


@pytest.fixture
def workers(home: Path) -> Iterator[list[WorkerProcess]]:
    started: list[WorkerProcess] = []
    try:
        yield started
    finally:
        for worker in started:
            worker.stop()


@contextmanager
def logs_on_failure(workers: list[WorkerProcess]) -> Iterator[None]:
    try:
        yield
    except BaseException:
        for worker in workers:
            print(f"\n----- {worker.log_path} (last 80 lines, cut at 300 characters) -----")
            print("\n".join(line[:300] for line in worker.log().splitlines()[-80:]))
        raise


def start(
    workers: list[WorkerProcess], name: str, home: Path, queue: str | None = None
) -> WorkerProcess:
    worker = WorkerProcess(name, home, app=APP, queue=queue, concurrency=CONCURRENCY)
    workers.append(worker)
    worker.wait_ready()
    return worker


# -- reading what happened --------------------------------------------------------------------


def chaos_log(query: str, *args: Any) -> list[tuple[Any, ...]]:
    from tests.tasks import chaosapp

    return chaosapp.connect().execute(query, args).fetchall()


def effect_counts(kind: str) -> Counter[str]:
    rows = chaos_log("SELECT key, count(*) FROM effects WHERE kind = ? GROUP BY key", kind)
    return Counter(dict(rows))


def attempt_counts(kind: str) -> tuple[Counter[str], Counter[str]]:
    """Effect writes attempted per key: those that landed, those the task's check kept out."""
    landed: Counter[str] = Counter()
    kept_out: Counter[str] = Counter()
    for key, was_landed, n in chaos_log(
        "SELECT key, landed, count(*) FROM attempts WHERE kind = ? GROUP BY key, landed", kind
    ):
        (landed if was_landed else kept_out)[key] += n
    return landed, kept_out


@dataclass
class Execution:
    start_id: int
    started: float
    ended: float | None = None


def executions(kinds: tuple[str, ...]) -> dict[tuple[str, str], list[Execution]]:
    """Every execution, per (kind, key), in order: its start row and when it ended, if it did."""
    found: dict[tuple[str, str], list[Execution]] = defaultdict(list)
    marks = ",".join("?" * len(kinds))
    for row_id, kind, key, event, at in chaos_log(
        f"SELECT id, kind, key, event, at FROM executions WHERE event IN ('start', 'end') "
        f"AND kind IN ({marks}) ORDER BY id",
        *kinds,
    ):
        if event == "start":
            found[(kind, key)].append(Execution(row_id, at))
        elif found[(kind, key)]:
            found[(kind, key)][-1].ended = at
    return found


def starts(kinds: tuple[str, ...]) -> dict[tuple[str, str], list[float]]:
    """Start times of every execution, per (kind, key), in order."""
    return {name: [run.started for run in runs] for name, runs in executions(kinds).items()}


@dataclass
class Kill:
    """What the test read just before a kill, and when the kill was done."""

    running: list[tuple[str, str]]
    last_id: int  # the execution log's last row in the same snapshot
    written: list[str]  # the running tasks that had written their effect already
    at: float = 0.0


def in_flight(worker: WorkerProcess) -> Kill:
    """Tasks and chunks running now in the worker's pool processes, and the execution log's
    last row id, read in one snapshot."""
    from tests.tasks import chaosapp

    connection = chaosapp.connect()
    connection.execute("BEGIN")
    try:
        rows = connection.execute(
            "SELECT kind, key, event, pid FROM executions e WHERE kind IN ('task', 'chunk') "
            "AND id = (SELECT max(id) FROM executions WHERE kind = e.kind AND key = e.key)"
        ).fetchall()
        (last_id,) = connection.execute("SELECT coalesce(max(id), 0) FROM executions").fetchone()
        attempted = {
            key for (key,) in connection.execute("SELECT key FROM attempts WHERE kind = 'task'")
        }
    finally:
        connection.execute("COMMIT")
    pids = worker.children()  # after the read: every process seen running in it is listed
    running = [(kind, key) for kind, key, event, pid in rows if event == "start" and pid in pids]
    written = [key for kind, key in running if kind == "task" and key in attempted]
    return Kill(running, last_id, written)


def broker_rows() -> dict[str, int]:
    """Messages the broker file still holds, per queue (the pidbox and event queues aside)."""
    url = get_settings().broker_url
    scheme, _, rest = url.partition("://")
    path = "/" + rest.lstrip("/")  # scheme:///abs/path or scheme:////abs/path
    if scheme == "taskkit+sqlite":
        query = (
            "SELECT queue, count(*) FROM messages WHERE queue NOT LIKE '%pidbox%' "
            "AND queue NOT LIKE 'celeryev%' GROUP BY queue"
        )
    elif scheme == "sqla+sqlite":  # kombu's transport: acknowledged messages stay as rows
        query = (
            "SELECT q.name, count(*) FROM kombu_message m JOIN kombu_queue q "
            "ON m.queue_id = q.id WHERE q.name NOT LIKE '%pidbox%' "
            "AND q.name NOT LIKE 'celeryev%' GROUP BY q.name"
        )
    else:
        raise AssertionError(f"not the embedded broker: {scheme}://")
    with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)) as connection:
        return dict(connection.execute(query).fetchall())


def ledger(batch_id: str) -> dict[str, list[str]]:
    """Statuses of the batch's items in the ledger: ``{key: [status, ...]}``."""
    found: dict[str, list[str]] = defaultdict(list)
    with get_engine().connect() as connection:
        for key, status in connection.execute(
            select(BatchItem.item_key, BatchItem.status).where(BatchItem.batch_id == batch_id)
        ):
            found[key].append(status)
    return found


def run_status(run_id: int) -> str:
    with session_scope() as db:
        run = db.get(ModelRun, run_id)
        return run.status if run is not None else "missing"


def wait_while_progressing(done: Any, progress: Any, what: str, limit: float = 150) -> bool:
    """Poll until ``done()``; give up after ``STALL`` s without a change of ``progress()``, or
    ``limit`` s in all. Returns whether it got done (the caller says what is missing)."""
    began = last_change = time.monotonic()
    last = None
    while not done():
        now = time.monotonic()
        current = progress()
        if current != last:
            last, last_change = current, now
        elif now - last_change > STALL or now - began > limit:
            print(f"gave up waiting for {what}: stuck at {current}")
            return False
        time.sleep(0.2)
    return True


# -- 1. tasks and a batch, three kills --------------------------------------------------------


def kill_points(rng: random.Random) -> list[int]:
    """Progress marks (tasks done + batch items done / 10; 398 in all) to kill at, spaced. The
    first falls among the 100 tasks sent before the batch (they run first)."""
    first = rng.randint(20, 80)
    second = first + rng.randint(40, 120)
    return [first, second, second + rng.randint(40, 120)]


@pytest.mark.timeout(300)
def test_nothing_is_lost_when_the_whole_worker_is_killed_three_times(
    home: Path, workers: list[WorkerProcess]
) -> None:
    from tests.tasks import chaosapp

    seed = random.randrange(10**6)
    rng = random.Random(seed)
    print(f"\nembedded chaos: seed {seed}, broker {get_settings().broker_url.split(':')[0]}")
    item_ids = list(range(ITEMS))
    dead_ids = {n for n in item_ids if n % chaosapp.DEAD_EVERY == 0}

    def progress() -> int:
        return effect_counts("task").total() + effect_counts("item").total() // 10

    with logs_on_failure(workers):
        worker = start(workers, "w0", home)
        task_ids = [chaosapp.work.delay(n).id for n in range(TASKS // 2)]
        submission = submit_batch(chaosapp.items, [{"id": n} for n in item_ids], chunk_size=CHUNK)
        task_ids += [chaosapp.work.delay(n).id for n in range(TASKS // 2, TASKS)]
        chunk_ids = [result.id for result in submission.result.results]
        batch_id = submission.batch_id

        # The first kill waits for a task that has written its side effect and is still running,
        # so that a re-run tries to write it again; the others for anything running.
        kills: list[Kill] = []
        for number, mark in enumerate(kill_points(rng), 1):

            def ready(kill: Kill, first: bool = number == 1) -> bool:
                return bool(kill.written if first else kill.running)

            assert wait_while_progressing(
                lambda m=mark, w=worker: progress() >= m and ready(in_flight(w)),
                progress,
                f"progress {mark} with work in flight, to kill the worker",
            ), f"no progress towards kill {number} (at {mark}) for {STALL:g} s"
            time.sleep(rng.uniform(0, 0.1))  # anywhere inside the running tasks
            sampled: list[Kill] = []
            wait_for(
                lambda w=worker, s=sampled: s.append(in_flight(w)) or ready(s[-1]),
                30,
                f"work in flight for kill {number}",
            )
            kill = sampled[-1]
            worker.kill()
            kill.at = time.time()  # after the whole group is gone: nothing of it starts later
            kills.append(kill)
            print(
                f"kill {number} at progress {progress()}: in flight {kill.running}, "
                f"effect written by {kill.written}"
            )
            worker = start(workers, f"w{number}", home)

        def finished() -> bool:
            return (
                len(effect_counts("task")) >= TASKS
                and batch_progress(batch_id).finished >= ITEMS
                and not broker_rows()
            )

        def state() -> tuple[int, int, dict[str, int]]:
            return (len(effect_counts("task")), batch_progress(batch_id).finished, broker_rows())

        wait_while_progressing(finished, state, "every task, every item and an empty queue")
        worker.stop()  # nothing may run after the accounting below

        # Every task completed: side effect present, result SUCCESS.
        effects = effect_counts("task")
        lost = [task_id for task_id in task_ids if task_id not in effects]
        assert not lost, f"{len(lost)} of {TASKS} tasks were lost (never completed): {lost}"
        states = {task_id: chaosapp.app.AsyncResult(task_id).state for task_id in task_ids}
        failed = {task_id: s for task_id, s in states.items() if s != "SUCCESS"}
        assert not failed, f"tasks that did not end SUCCESS: {failed}"
        # Once each in a table without a unique key: only the task's own check keeps a re-run's
        # second write out, and every write is counted, landed or kept out.
        twice = {key: n for key, n in effects.items() if n != 1}
        assert not twice, f"side effects recorded more than once (task id: times): {twice}"
        assert set(effects) == set(task_ids), f"unknown task ids: {set(effects) - set(task_ids)}"
        landed, kept_out = attempt_counts("task")
        assert landed == effects, f"landed writes {landed} differ from the effect rows {effects}"
        attempted = landed + kept_out
        assert attempted.total() >= landed.total() == TASKS
        task_runs = {key: len(times) for (_, key), times in starts(("task",)).items()}
        over = {
            k: (n, task_runs.get(k, 0)) for k, n in attempted.items() if n > task_runs.get(k, 0)
        }
        assert not over, f"more effect writes than executions (task id: writes, runs): {over}"
        # A task killed after its write that ran again tried to write again, and was kept out:
        # its first write (seen before the kill) and its last, completed, execution's.
        retried = [key for kill in kills for key in kill.written if task_runs[key] > 1]
        not_tried = {key: (attempted[key], kept_out[key]) for key in retried if kept_out[key] < 1}
        assert not not_tried, f"re-runs of written tasks that wrote no second time: {not_tried}"
        print(
            f"task effect writes: {attempted.total()} attempted, {landed.total()} landed, "
            f"{kept_out.total()} kept out by the task's own check; killed after their write and "
            f"run again: {len(retried)}"
        )

        # A task or chunk ran again only when a kill interrupted its previous execution: it was
        # running when the kill came (see the module docstring for the window).
        reruns: Counter[int] = Counter()
        how: Counter[str] = Counter()
        unexplained = []
        not_running = []
        for (kind, key), runs in executions(("task", "chunk")).items():
            for before, after in itertools.pairwise(runs):
                between = [
                    i for i, kill in enumerate(kills) if before.started < kill.at < after.started
                ]
                if not between:
                    unexplained.append((kind, key))
                    continue
                kill = kills[between[0]]
                reruns[between[0]] += 1
                if (kind, key) in kill.running:
                    how["in flight at the read"] += 1
                elif before.start_id > kill.last_id:
                    how["started after the read"] += 1
                elif before.ended is not None and before.ended > kill.at - ACK_WINDOW:
                    how[f"ended less than {ACK_WINDOW:g} s before the kill"] += 1
                else:
                    ended = "never" if before.ended is None else f"{kill.at - before.ended:.2f} s"
                    not_running.append((kind, key, between[0] + 1, f"ended before it: {ended}"))
        assert not unexplained, f"ran again with no kill in between: {unexplained}"
        print(f"re-runs per kill: {dict(reruns)} (at most {CONCURRENCY} each); {dict(how)}")
        assert not not_running, (
            "ran again after a kill that did not interrupt it (kind, key, kill, end): "
            f"{not_running}"
        )
        assert all(n <= CONCURRENCY for n in reruns.values()), reruns
        assert reruns.total() <= CONCURRENCY * KILLS

        # Every item is done or dead exactly once; dead = the failing items, one letter each.
        statuses = ledger(batch_id)
        missing = sorted(set(map(str, item_ids)) - set(statuses), key=int)
        assert not missing, f"{len(missing)} batch items missing from the ledger: {missing[:50]}"
        repeated = {key: s for key, s in statuses.items() if len(s) != 1}
        assert not repeated, f"batch items in the ledger more than once: {repeated}"
        wrong = {
            key: s[0]
            for key, s in statuses.items()
            if s[0] != ("dead" if int(key) in dead_ids else "done")
        }
        assert not wrong, f"batch items with the wrong end status (key: status): {wrong}"
        letters = Counter(
            letter.item_key for letter in DeadLetterStore().list(batch_id=batch_id, status=None)
        )
        assert letters == Counter(str(n) for n in dead_ids), (
            f"dead letters (item key: letters) differ from the failing items: {letters}"
        )
        item_effects = effect_counts("item")
        expected = Counter(str(n) for n in item_ids if n not in dead_ids)
        assert item_effects == expected, (
            f"item side effects not exactly once: missing {sorted(expected - item_effects)[:50]}, "
            f"extra {sorted(item_effects - expected)[:50]}"
        )
        item_landed, item_kept_out = attempt_counts("item")
        assert item_landed == item_effects
        item_attempted = item_landed + item_kept_out
        assert item_attempted.total() >= item_landed.total()
        # An item runs again only in a chunk that ran again. An interrupted delivery repeats at
        # most what it did since its last ledger write (done items are written every round of
        # batch_size once ledger_flush_every are waiting), and its dead items, which are written
        # when the chunk ends.
        chunk_starts = starts(("chunk",))
        rerun_chunks = {
            index
            for index, chunk in enumerate(chunk_ids)
            if len(chunk_starts[("chunk", chunk)]) > 1
        }
        interrupted = sum(len(chunk_starts[("chunk", chunk)]) - 1 for chunk in chunk_ids)
        item_runs = Counter({key: len(times) for (_, key), times in starts(("item",)).items()})
        over = {k: (n, item_runs[k]) for k, n in item_attempted.items() if n > item_runs[k]}
        assert not over, f"more item effect writes than executions (key: writes, runs): {over}"
        print(
            f"item effect writes: {item_attempted.total()} attempted, {item_landed.total()} "
            f"landed, {item_kept_out.total()} kept out by the item's own check"
        )
        again = {key: n for key, n in item_runs.items() if n > 1}
        stray = sorted(key for key in again if int(key) // CHUNK not in rerun_chunks)
        assert not stray, f"items that ran again outside a re-run chunk: {stray}"
        per_delivery = (
            chaosapp.items.ledger_flush_every
            + chaosapp.items.batch_size
            + CHUNK // chaosapp.DEAD_EVERY
            + 1
        )
        item_reruns = sum(n - 1 for n in again.values())
        print(f"item re-runs: {item_reruns} in {interrupted} interrupted chunk deliveries")
        assert item_reruns <= interrupted * per_delivery, (
            f"{item_reruns} item re-runs for {interrupted} interrupted chunk deliveries "
            f"(at most {per_delivery} each)"
        )
        summary = submission.get(timeout=30)
        assert summary["total"] == ITEMS
        assert sorted(summary["failed_ids"]) == sorted(dead_ids)

        # The broker keeps no message of the task queue (acknowledged = deleted).
        assert broker_rows() == {}, f"messages left in the broker: {broker_rows()}"


# -- 2. a training run reserved but not started -----------------------------------------------

#: Seconds the run waits before it starts: the worker holds its message meanwhile.
COUNTDOWN = 5
#: A queue of this test's own: what the first test left (when it failed) does not delay it.
TRAINING_QUEUE = "chaos-training"
TRAINING = {"epochs": 3, "seed": 3}


@pytest.mark.timeout(180)
def test_a_queued_training_run_whose_worker_was_killed_completes_after_the_restart(
    home: Path, workers: list[WorkerProcess]
) -> None:
    from tests.tasks import chaosapp

    with logs_on_failure(workers):
        worker = start(workers, "t0", home, TRAINING_QUEUE)
        sent = time.time()
        run_id, task_id = submit_run(
            chaosapp.train,
            TRAINING,
            name="queued-at-kill",
            countdown=COUNTDOWN,
            queue=TRAINING_QUEUE,
        )
        wait_for(
            lambda: f"[{task_id}] received" in worker.log(), 30, "the worker to hold the message"
        )
        assert run_status(run_id) == "queued"
        worker.kill()
        assert time.time() < sent + COUNTDOWN, "the countdown ended before the kill: too slow"
        assert not chaos_log(
            "SELECT 1 FROM executions WHERE kind = 'epoch' AND key = ?", str(run_id)
        )

        start(workers, "t1", home, TRAINING_QUEUE)
        ended = wait_while_progressing(
            lambda: run_status(run_id) in ("completed", "failed"),
            lambda: run_status(run_id),
            "the run to end",
            limit=60,
        )
        assert ended, (
            f"training run {run_id} (task {task_id}) is still {run_status(run_id)!r} after the "
            "restart: its message was lost with the killed worker"
        )
        assert run_status(run_id) == "completed"
        epochs = [int(e) for (e,) in chaos_log(
            "SELECT event FROM executions WHERE kind = 'epoch' AND key = ? ORDER BY id", str(run_id)
        )]  # fmt: skip
        assert epochs == list(range(TRAINING["epochs"]))
        wait_for(lambda: TRAINING_QUEUE not in broker_rows(), 15, "the training queue to be empty")
