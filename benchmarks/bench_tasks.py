"""Task throughput on a Redis broker: a trivial ``ResilientTask`` against a plain Celery task.

One app, one worker (a ``celery worker`` subprocess: prefork, concurrency 1, as in
production), one Redis broker and result backend; the tasks differ only in their base class.
The worker subprocess imports this module as its Celery app
(``celery -A benchmarks.bench_tasks worker``); the parent passes the run's queue and key prefix
through ``TASKKIT_BENCH_TASKS_RUN``, so both build the same app. Redis is required: without it
this section fails.
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import redis
from celery.exceptions import TimeoutError as CeleryTimeoutError
from celery.result import ResultSet

from benchmarks._harness import say, table
from taskkit.config import Settings
from taskkit.tasks import ResilientTask, create_app

REDIS_URL = os.environ.get("TASKKIT_BENCH_TASKS_REDIS_URL", "redis://127.0.0.1:6379/14")
#: Shared by the parent and its worker subprocess, so both build the same app.
RUN_VARIABLE = "TASKKIT_BENCH_TASKS_RUN"
RUN = os.environ.get(RUN_VARIABLE) or uuid.uuid4().hex[:10]
PREFIX = f"tk-bench-{RUN}"
QUEUE = f"{PREFIX}-q"
WORKER = f"{PREFIX}@bench"
ROOT = Path(__file__).resolve().parent.parent

#: Tasks per timed batch.
TASKS = 2000
#: Timed batches per task; the tasks take turns (ABBA order) and each keeps its median.
ROUNDS = 5
#: Tasks of each kind run before timing (imports, connections, caches of the worker).
WARMUP = 200
#: Seconds to wait for one batch (or the worker to start) before giving up.
TIMEOUT = 60.0

app = create_app(
    "bench",
    settings=Settings(broker_url=REDIS_URL),
    task_default_queue=QUEUE,
    broker_transport_options={"global_keyprefix": f"{PREFIX}:"},
)


# -- the contestants: identical trivial bodies --------------------------------------------------


@app.task(bind=True, shared=False)
def plain(self: Any) -> None:
    return None


@app.task(base=ResilientTask, bind=True, shared=False)
def resilient(self: Any) -> None:
    return None


@app.task(bind=True, shared=False, ignore_result=True)
def plain_ignored(self: Any) -> None:
    return None


@app.task(base=ResilientTask, bind=True, shared=False, ignore_result=True)
def resilient_ignored(self: Any) -> None:
    return None


#: (configuration, [(label, task, task that stores a result: the batch's last one)])
CONFIGURATIONS: list[tuple[str, list[tuple[str, Any, Any]]]] = [
    (
        "results stored",
        [("plain Celery task", plain, plain), ("**ResilientTask**", resilient, resilient)],
    ),
    (
        "results ignored",
        [
            ("plain Celery task", plain_ignored, plain),
            ("**ResilientTask**", resilient_ignored, resilient),
        ],
    ),
]


# -- the worker ---------------------------------------------------------------------------------


def _output(log: IO[bytes]) -> str:
    log.seek(0)
    lines = log.read().decode(errors="replace").strip().splitlines()
    return "\n".join(lines[-20:]) or "(no output)"


def _wait(results: Callable[[], Any], worker: subprocess.Popen[bytes], log: IO[bytes]) -> None:
    """Wait for ``results()`` in short steps, failing at once if the worker died."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        if worker.poll() is not None:
            raise RuntimeError(
                f"the benchmark worker exited with {worker.returncode}:\n{_output(log)}"
            )
        try:
            results()
            return
        except CeleryTimeoutError:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"the benchmark worker did not finish in {TIMEOUT:g} s:\n{_output(log)}"
                ) from None


@contextmanager
def running_worker() -> Iterator[tuple[subprocess.Popen[bytes], IO[bytes]]]:
    """A ``celery worker`` for this run's queue, ready; stopped (and its keys deleted) after."""
    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.ping()
    except redis.exceptions.ConnectionError as exc:
        raise RuntimeError(
            f"bench_tasks needs Redis at {REDIS_URL} ({exc}); start it, or point "
            "TASKKIT_BENCH_TASKS_REDIS_URL at another server."
        ) from exc
    env = {
        **os.environ,
        RUN_VARIABLE: RUN,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    command = [
        sys.executable, "-m", "celery", "-A", "benchmarks.bench_tasks", "worker",
        "--pool=prefork", "--concurrency=1", "--without-gossip", "--without-mingle",
        "--without-heartbeat", "-Q", QUEUE, "-n", WORKER, "-l", "warning",
    ]  # fmt: skip
    with tempfile.TemporaryFile() as log:
        worker = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        try:
            say(f"  worker {worker.pid} starting")
            # The first round trip also proves the worker consumes this run's queue.
            first = plain.delay()
            _wait(lambda: first.get(timeout=0.5), worker, log)
            first.forget()
            yield worker, log
        finally:
            _stop(worker)
            _delete_keys(client)
            client.close()


def _stop(worker: subprocess.Popen[bytes]) -> None:
    """Warm shutdown (SIGTERM), then SIGKILL of the worker's process group if it hangs."""
    if worker.poll() is None:
        worker.terminate()
        try:
            worker.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait(timeout=5)
    # A pool process left behind by a killed worker shares its process group.
    try:
        os.killpg(worker.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _delete_keys(client: redis.Redis) -> None:
    keys = list(client.scan_iter(match=f"{PREFIX}:*", count=1000))
    for start in range(0, len(keys), 1000):
        client.delete(*keys[start : start + 1000])


def _forget(client: redis.Redis, task_ids: list[str]) -> None:
    keys = [app.backend.get_key_for_task(task_id) for task_id in task_ids]
    for start in range(0, len(keys), 1000):
        client.delete(*keys[start : start + 1000])


# -- measuring ----------------------------------------------------------------------------------


def _batch(
    task: Any, last: Any, worker: subprocess.Popen[bytes], log: IO[bytes], client: redis.Redis
) -> float:
    """Publish ``TASKS`` tasks and wait for all of them; seconds from first publish to last
    result. Results ignored: the batch ends with one ``last`` task that stores a result, and
    the single worker process runs the queue in order, so its result comes after all others."""
    started = time.perf_counter()
    sent = [task.delay() for _ in range(TASKS - 1)] + [last.delay()]
    if task is last:
        results = ResultSet(sent)
        _wait(lambda: results.get(timeout=0.5), worker, log)
    else:
        _wait(lambda: sent[-1].get(timeout=0.5), worker, log)
    elapsed = time.perf_counter() - started
    _forget(client, [result.id for result in sent])
    return elapsed


def measure() -> dict[tuple[str, str], list[float]]:
    """Tasks per second of every (configuration, contestant), one value per round."""
    rates: dict[tuple[str, str], list[float]] = {}
    client = redis.Redis.from_url(REDIS_URL)
    try:
        with running_worker() as (worker, log):
            for configuration, contestants in CONFIGURATIONS:
                say(f"  {configuration}: warm-up")
                for _, task, last in contestants:
                    sent = [task.delay() for _ in range(WARMUP - 1)] + [last.delay()]
                    _wait(lambda sent=sent: sent[-1].get(timeout=0.5), worker, log)
                    _forget(client, [result.id for result in sent])
                for round_number in range(1, ROUNDS + 1):
                    say(f"  {configuration}: round {round_number}/{ROUNDS}")
                    order = contestants if round_number % 2 else contestants[::-1]
                    for label, task, last in order:
                        seconds = _batch(task, last, worker, log, client)
                        rates.setdefault((configuration, label), []).append(TASKS / seconds)
    finally:
        client.close()
    return rates


def run() -> str:
    started = time.perf_counter()
    rates = measure()
    took = time.perf_counter() - started
    say(f"  bench_tasks took {took:.0f} s")
    median = {key: statistics.median(values) for key, values in rates.items()}
    rows = []
    ratio_rows = []
    for configuration, contestants in CONFIGURATIONS:
        base = median[configuration, contestants[0][0]]
        for label, _, _ in contestants:
            values = rates[configuration, label]
            rows.append(
                [
                    configuration,
                    label,
                    f"{median[configuration, label]:,.0f}",
                    f"{min(values):,.0f} - {max(values):,.0f}",
                    f"{median[configuration, label] / base:.2f}x",
                ]
            )
        value = median[configuration, contestants[1][0]] / base
        ratio_rows.append(
            [
                f"ResilientTask / plain, {configuration}",
                f"**{value:.2f}**",
                ">= 0.95",
                "yes" if value >= 0.95 else "**no**",
            ]
        )
    main_table = table(
        ["results", "task", "median tasks/s", "range over rounds", "vs plain"], rows
    )
    ratio_table = table(["ratio (tasks/s over tasks/s)", "measured", "target", "met"], ratio_rows)
    return f"""## Task throughput: `ResilientTask` against a plain Celery task

{main_table}

{ratio_table}

TODO
"""
