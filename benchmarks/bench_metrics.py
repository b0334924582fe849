"""What Prometheus metrics cost: ``ResilientTask`` with metrics on against off, and the metrics
hooks in the recovery primitives.

Metrics "on" is what a worker with ``TASKKIT_METRICS_PORT`` does in each pool process:
prometheus_client's multiprocess mode (every value an mmap file in a directory) and
``taskkit.telemetry.metrics.install()`` subscribed to the event bus. "Off" is a process where
nothing is subscribed. Tasks run through the worker's execution path in this process (Celery's
tracer for a request as a worker builds it, as ``bench_tasks``' in-process column), results
ignored, so the task's own work is smallest and the metrics' share largest. Run alone with
``python -m benchmarks.bench_metrics``.
"""

from __future__ import annotations

import functools
import gc
import os
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
from typing import Any

from celery.app.trace import build_tracer
from celery.result import ResultSet
from prometheus_client import CollectorRegistry

from benchmarks._harness import per_call_ns, replace_section, say, table
from taskkit.config import load_settings
from taskkit.recovery import CircuitBreaker, events, retry
from taskkit.tasks import ResilientTask, create_app
from taskkit.telemetry import metrics

REDIS_URL = os.environ.get("TASKKIT_BENCH_TASKS_REDIS_URL", "redis://127.0.0.1:6379/14")
#: Shared by the parent and its worker subprocesses, so all build the same app.
RUN_VARIABLE = "TASKKIT_BENCH_METRICS_RUN"
RUN = os.environ.get(RUN_VARIABLE) or uuid.uuid4().hex[:10]
PREFIX = f"tk-bench-metrics-{RUN}"
WORKER = f"{PREFIX}@bench"
ROOT = Path(__file__).resolve().parent.parent
#: Alternating off/on rounds in process; each keeps its best (per_call_ns is best of 5).
ROUNDS = 5
#: The in-process task: chunks per arm, calls per chunk.
CHUNKS = 300
CHUNK_CALLS = 100
#: Tasks per timed batch through a worker, batches per worker (alternating), warm-up tasks.
TASKS = 300
WORKER_ROUNDS = 10
WARMUP = 200

app = create_app(
    "bench_metrics",
    settings=load_settings(broker_url=REDIS_URL),
    task_default_queue=f"{PREFIX}-q",
    broker_transport_options={"global_keyprefix": f"{PREFIX}:"},
)


@app.task(
    base=ResilientTask, bind=True, shared=False, ignore_result=True, name="bench_metrics.resilient"
)
def resilient(self: Any) -> None:
    return None


@app.task(base=ResilientTask, bind=True, shared=False, name="bench_metrics.resilient_stored")
def resilient_stored(self: Any) -> None:
    return None


def _traced_call() -> Callable[[], object]:
    task_id = f"{PREFIX}-in-process"
    message = app.amqp.as_task_v2(task_id, resilient.name, args=(), kwargs={}, ignore_result=True)
    args, kwargs, embed = message.body
    request = {
        **message.headers,
        "properties": message.properties,
        "reply_to": message.properties.get("reply_to"),
        "correlation_id": message.properties.get("correlation_id"),
        "hostname": WORKER,
        "delivery_info": {
            "exchange": "",
            "routing_key": "q",
            "priority": None,
            "redelivered": False,
        },
        "args": list(args),
        "kwargs": kwargs,
        "is_eager": False,
        **embed,
    }
    tracer = build_tracer(resilient.name, app.tasks[resilient.name], app=app, hostname=WORKER)
    return functools.partial(tracer, task_id, request["args"], request["kwargs"], request)


# -- through real workers -----------------------------------------------------------------------


@contextmanager
def _worker(name: str, env: dict[str, str], log_dir: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A prefork worker (concurrency 1) of this module's app on the queue ``name``, ready."""
    log = (log_dir / f"{name}.log").open("wb")
    command = [
        sys.executable, "-m", "celery", "-A", "benchmarks.bench_metrics", "worker",
        "--pool=prefork", "--concurrency=1", "--without-gossip", "--without-mingle",
        "--without-heartbeat", "-Q", f"{PREFIX}-{name}", "-n", f"{name}-{WORKER}", "-l", "info",
    ]  # fmt: skip
    worker = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        first = resilient_stored.apply_async(queue=f"{PREFIX}-{name}")
        first.get(timeout=60)
        yield worker
    finally:
        if worker.poll() is None:
            worker.terminate()
            try:
                worker.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, signal.SIGKILL)
        with suppress(ProcessLookupError):
            os.killpg(worker.pid, signal.SIGKILL)
        log.close()


def _batch(queue: str, count: int) -> float:
    started = time.perf_counter()
    sent = [resilient_stored.apply_async(queue=queue) for _ in range(count)]
    ResultSet(sent).get(timeout=120)
    elapsed = time.perf_counter() - started
    for result in sent:
        result.forget()
    return count / elapsed


def through_workers() -> dict[bool, list[float]]:
    """Tasks per second of a worker with metrics off and one with metrics on (both running,
    batches alternating), per batch."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("TASKKIT_METRICS_")}
    base[RUN_VARIABLE] = RUN
    base["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    rates: dict[bool, list[float]] = {False: [], True: []}
    with tempfile.TemporaryDirectory(prefix="taskkit-bench-metrics-") as directory:
        root = Path(directory)
        on_env = {
            **base,
            "TASKKIT_METRICS_PORT": "0",
            "TASKKIT_METRICS_DIR": str(root / "metrics"),
        }
        with _worker("off", base, root), _worker("on", on_env, root):
            queues = {False: f"{PREFIX}-off", True: f"{PREFIX}-on"}
            if "taskkit: metrics on" not in (root / "on.log").read_text():
                raise RuntimeError("the metrics worker serves no /metrics: is it on?")
            for on in (False, True):
                _batch(queues[on], WARMUP)
            for round_number in range(1, WORKER_ROUNDS + 1):
                say(f"  workers: round {round_number}/{WORKER_ROUNDS}")
                order = (False, True) if round_number % 2 else (True, False)
                for on in order:
                    rates[on].append(_batch(queues[on], TASKS))
    return rates


def target(x: int) -> int:
    return x


def _primitives() -> dict[str, Callable[[], object]]:
    retried = retry(max_attempts=3, delay=0, exceptions=(ConnectionError,))(target)
    breaker = CircuitBreaker(failure_threshold=5, recovery_timeout=60, name="bench")
    guarded = breaker(target)
    return {
        "`@retry` call that succeeds": lambda: retried(1),
        "`CircuitBreaker` call that succeeds": lambda: guarded(1),
    }


def _nothing(event: object) -> None:
    return None


def _interleaved(call: Callable[[], object]) -> dict[str, list[float]]:
    """Nanoseconds per call of ``call`` in ``CHUNKS`` chunks of ``CHUNK_CALLS`` calls per arm, the
    arms (off, a subscriber that does nothing, the metrics subscriber) taking turns, so load
    from elsewhere on the machine falls on all three alike."""
    handler = metrics.Metrics(CollectorRegistry())
    handler.start_flusher(metrics.FLUSH_SECONDS)  # as in a pool process
    arms: dict[str, Callable[[Any], object] | None] = {
        "off": None,
        "noop": _nothing,
        "on": handler.handle,
    }
    times: dict[str, list[float]] = {arm: [] for arm in arms}
    for _ in range(200):
        call()
    gc.disable()
    try:
        for chunk in range(CHUNKS):
            for arm in list(arms) if chunk % 2 else list(arms)[::-1]:
                subscriber = arms[arm]
                unsubscribe = events.subscribe(subscriber) if subscriber is not None else None
                start = time.perf_counter_ns()
                for _ in range(CHUNK_CALLS):
                    call()
                times[arm].append((time.perf_counter_ns() - start) / CHUNK_CALLS)
                if unsubscribe is not None:
                    unsubscribe()
    finally:
        gc.enable()
        handler.stop_flusher()
    return times


def _measure(calls: dict[str, Callable[[], object]], on: bool) -> dict[str, float]:
    if on:
        metrics.install()
    else:
        metrics.uninstall()
    try:
        return {name: per_call_ns(call, repeat=5) for name, call in calls.items()}
    finally:
        metrics.uninstall()


def run() -> str:
    started = time.perf_counter()
    rates = through_workers()
    with tempfile.TemporaryDirectory(prefix="taskkit-bench-metrics-") as directory:
        metrics.prepare_multiprocess_dir(Path(directory))
        calls = {"task": _traced_call()}
        one_event = events.RetryScheduled("bench.fn", 1, 3, 0.0, None)
        best: dict[tuple[str, bool], float] = {}
        for round_number in range(1, ROUNDS + 1):
            say(f"  primitives: round {round_number}/{ROUNDS}")
            for on in (False, True) if round_number % 2 else (True, False):
                for name, ns in _measure(_primitives(), on).items():
                    best[name, on] = min(best.get((name, on), float("inf")), ns)
        say("  task in process: interleaved chunks")
        chunks = _interleaved(calls["task"])
        handler = metrics.install()
        event_ns = per_call_ns(lambda: handler.handle(one_event))
        attempt = events.TaskAttemptEnded(resilient.name, "id", "outer", 1, "success")
        attempt_ns = per_call_ns(lambda: handler.handle(attempt))
        metrics.uninstall()
    say(f"  bench_metrics took {time.perf_counter() - started:.0f} s")

    task_off, noop, task_on = (min(chunks[arm]) for arm in ("off", "noop", "on"))
    throughput = task_off / task_on
    ratios = [off / on for off, on in zip(chunks["off"], chunks["on"], strict=True)]
    off_rate, on_rate = statistics.median(rates[False]), statistics.median(rates[True])
    paired = [on / off for off, on in zip(rates[False], rates[True], strict=True)]
    rows = [
        [
            "ResilientTask through a prefork worker (Redis, results stored), tasks/s",
            f"{off_rate:,.0f}",
            f"{on_rate:,.0f}",
            f"{min(rates[False]):,.0f} - {max(rates[False]):,.0f} off, "
            f"{min(rates[True]):,.0f} - {max(rates[True]):,.0f} on",
            f"**{on_rate / off_rate:.2f}x** (per round: median {statistics.median(paired):.2f}, "
            f"{min(paired):.2f} - {max(paired):.2f})",
            ">= 0.95x",
            "yes" if on_rate / off_rate >= 0.95 else "**no**",
        ],
        [
            "ResilientTask through the worker's path in process (results ignored), us/task",
            f"{task_off / 1000:,.1f}",
            f"{task_on / 1000:,.1f}",
            f"{1e9 / task_off:,.0f} -> {1e9 / task_on:,.0f} tasks/s",
            f"**{throughput:.2f}x** (per chunk pair: median {statistics.median(ratios):.2f})",
            ">= 0.95x",
            "yes" if throughput >= 0.95 else "**no**",
        ],
    ]
    rows.append(
        [
            "the same, events emitted to a subscriber that does nothing, us/task",
            f"{task_off / 1000:,.1f}",
            f"{noop / 1000:,.1f}",
            f"{(noop - task_off) / 1000:+,.1f} us of the {(task_on - task_off) / 1000:+,.1f} us",
            f"{task_off / noop:.2f}x",
            "-",
            "-",
        ]
    )
    for name in _primitives():
        off_ns, on_ns = best[name, False], best[name, True]
        rows.append(
            [
                f"{name}, us/call",
                f"{off_ns / 1000:,.3f}",
                f"{on_ns / 1000:,.3f}",
                f"{(on_ns - off_ns):+,.0f} ns per call",
                "-",
                "< 1 us",
                "yes" if on_ns - off_ns < 1000 else "**no**",
            ]
        )
    main_table = table(
        ["measured", "off", "on", "range or difference", "on vs off", "target", "met"],
        rows,
    )
    return f"""## Metrics: `ResilientTask` and the recovery primitives with metrics on and off

"On" is what a worker with `TASKKIT_METRICS_PORT` does in each pool process: prometheus_client
in multiprocess mode (each value an mmap file) and `taskkit.telemetry.metrics` subscribed to
the event bus; "off" has no subscriber, so no event is even built. The task is a trivial
`ResilientTask` (`return None`). First through real workers: two `celery worker` subprocesses
(prefork, concurrency 1) on the local Redis, one with `TASKKIT_METRICS_PORT` set and one
without, both running; batches of {TASKS} tasks (`apply_async`, then every result) alternate
between them, {WORKER_ROUNDS} each after a warm-up. Then through Celery's tracer in this process
(the worker's execution path without the broker, as in the task throughput section, results
ignored): the smallest task, so the largest share for the events and metrics. On, each task
builds and emits two events (one inner and one outer attempt; the task's own code, which runs
only when someone is subscribed) and the subscriber counts them in memory (a pool process
adds them to the mmap files every `FLUSH_SECONDS`); the row after it shows how much of the
difference is the events alone, with a subscriber that does nothing. The primitives emit only
on the unhappy path, so a call that succeeds pays nothing either way; the table shows the
measured difference (best of {ROUNDS} alternating rounds, each best of 5 timeit repeats; noise
can make it negative). In process the three arms (off, a subscriber that does nothing, metrics)
take turns in {CHUNKS} chunks of {CHUNK_CALLS} tasks each; the table shows each arm's fastest
chunk (the least disturbed by the rest of the machine) and the median of the chunk pairs'
ratios.

{main_table}

One event delivered to the metrics subscriber (a counter increment in an mmap file), for the
unhappy path: a `RetryScheduled` {event_ns / 1000:,.1f} us, a `TaskAttemptEnded`
{attempt_ns / 1000:,.1f} us.
"""


def main() -> None:
    """``python -m benchmarks.bench_metrics``: run this section alone and replace it in
    docs/benchmarks.md (added at the end when missing)."""
    replace_section(run())


if __name__ == "__main__":
    main()
