"""Embedded broker throughput: taskkit's SQLite transport against kombu's SQLAlchemy and
filesystem transports, side by side.

One plain Celery app (no taskkit task class; late acks, prefetch 1, JSON, results ignored, no
result backend: the broker is all that differs), one ``celery worker`` subprocess (prefork,
concurrency 2) per batch. The worker subprocess imports this module as its app
(``celery -A benchmarks.bench_broker worker``); the parent names the contestant and the batch's
folder through ``TASKKIT_BENCH_BROKER`` and ``TASKKIT_BENCH_BROKER_DIR``, so both build the same
app. Each task appends one byte to ``done`` in that folder; a batch ends when the file holds one
byte per task.
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import suppress
from pathlib import Path
from typing import IO, Any

from celery import Celery

import taskkit.broker  # registers taskkit+sqlite://
from benchmarks._harness import replace_section, say, table

ROOT = Path(__file__).resolve().parent.parent
CONTESTANT_VARIABLE = "TASKKIT_BENCH_BROKER"
FOLDER_VARIABLE = "TASKKIT_BENCH_BROKER_DIR"
POLL_VARIABLE = "TASKKIT_BENCH_BROKER_POLL"
QUEUE = "bench-broker"

#: Tasks per timed batch.
TASKS = 1000
#: Timed batches per contestant; the contestants take turns (ABC, CBA, ...), each on a fresh
#: broker file and worker, and each keeps its median.
ROUNDS = 3
#: Untimed tasks first in each batch's worker (imports, connections, pool processes).
WARMUP = 50
#: Seconds to wait for a batch before giving up.
TIMEOUT = 180.0


def broker_url(contestant: str, folder: Path) -> tuple[str, dict[str, Any]]:
    """The broker URL and transport options of a contestant, its files under ``folder``."""
    if contestant == "taskkit":
        return f"{taskkit.broker.SCHEME}+sqlite:///{folder / 'queue.db'}", {
            "visibility_timeout": 30
        }
    if contestant == "sqla":
        return f"sqla+sqlite:///{folder / 'broker.db'}", {}
    if contestant == "filesystem":
        messages = folder / "messages"
        messages.mkdir(parents=True, exist_ok=True)
        return "filesystem://", {
            "data_folder_in": str(messages),
            "data_folder_out": str(messages),
            # kombu's default is ./control: the bench must not write into the working directory
            "control_folder": str(folder / "control"),
        }
    raise ValueError(f"unknown contestant {contestant!r}")


#: (key, label, contestant, polling interval or None for the transport's default)
CONTESTANTS: list[tuple[str, str, str, float | None]] = [
    ("taskkit", "**taskkit+sqlite** (taskkit.broker, default polling)", "taskkit", None),
    ("sqla", "sqla+sqlite (kombu SQLAlchemy, default polling 1 s)", "sqla", None),
    ("filesystem", "filesystem (kombu, default polling 1 s)", "filesystem", None),
    ("filesystem-fast", "filesystem (kombu, polling_interval=0.01)", "filesystem", 0.01),
]
#: The consumer-only view leaves out the slow default filesystem (nothing new, a minute long).
PREFILLED = ["taskkit", "sqla", "filesystem-fast"]

FOLDER = Path(os.environ.get(FOLDER_VARIABLE) or tempfile.gettempdir())
_url, _options = broker_url(os.environ.get(CONTESTANT_VARIABLE) or "taskkit", FOLDER)
if os.environ.get(POLL_VARIABLE):
    _options["polling_interval"] = float(os.environ[POLL_VARIABLE])
app = Celery("bench_broker", broker=_url)
app.conf.update(
    broker_transport_options=_options,
    task_default_queue=QUEUE,
    task_serializer="json",
    accept_content=["json"],
    task_acks_late=True,
    worker_prefetch_multiplier=1,
    task_ignore_result=True,
    broker_connection_retry_on_startup=True,
)


@app.task(shared=False, name="benchmarks.bench_broker.tick")
def tick() -> None:
    fd = os.open(FOLDER / "done", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, b".")
    finally:
        os.close(fd)


def _done(folder: Path) -> int:
    try:
        return (folder / "done").stat().st_size
    except FileNotFoundError:
        return 0


def _output(log: IO[bytes]) -> str:
    log.seek(0)
    lines = log.read().decode(errors="replace").strip().splitlines()
    return "\n".join(lines[-20:]) or "(no output)"


def _wait_done(folder: Path, count: int, worker: subprocess.Popen[bytes], log: IO[bytes]) -> None:
    deadline = time.monotonic() + TIMEOUT
    while _done(folder) < count:
        if worker.poll() is not None:
            raise RuntimeError(f"the benchmark worker exited:\n{_output(log)}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the batch did not finish in {TIMEOUT:g} s:\n{_output(log)}")
        time.sleep(0.005)


def _stop(worker: subprocess.Popen[bytes]) -> None:
    if worker.poll() is None:
        worker.terminate()
        try:
            worker.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait(timeout=5)
    with suppress(ProcessLookupError):
        os.killpg(worker.pid, signal.SIGKILL)


def batch(
    contestant: str, *, prefilled: bool = False, poll: float | None = None
) -> tuple[float, float]:
    """One timed batch on a fresh broker and worker: (tasks/s, publishes/s)."""
    with tempfile.TemporaryDirectory(prefix="tk-bench-broker-") as tmp:
        folder = Path(tmp)
        url, options = broker_url(contestant, folder)
        if poll is not None:
            options["polling_interval"] = poll
        client = Celery("bench_broker", broker=url)
        client.conf.update(broker_transport_options=options, task_default_queue=QUEUE)
        send = client.signature(tick.name).delay
        env = {
            **os.environ,
            CONTESTANT_VARIABLE: contestant,
            POLL_VARIABLE: "" if poll is None else str(poll),
            FOLDER_VARIABLE: str(folder),
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        }
        command = [
            sys.executable, "-m", "celery", "-A", "benchmarks.bench_broker", "worker",
            "--pool=prefork", "--concurrency=2", "--without-gossip", "--without-mingle",
            "--without-heartbeat", "-Q", QUEUE, "-n", f"bench-{contestant}@%h", "-l", "warning",
        ]  # fmt: skip
        if prefilled:
            started = time.perf_counter()
            for _ in range(WARMUP + TASKS):
                send()
            published = time.perf_counter() - started
        with tempfile.TemporaryFile() as log:
            worker = subprocess.Popen(
                command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
            try:
                if not prefilled:
                    for _ in range(WARMUP):
                        send()
                _wait_done(folder, WARMUP, worker, log)
                started = time.perf_counter()
                if not prefilled:
                    for _ in range(TASKS):
                        send()
                    published = time.perf_counter() - started
                _wait_done(folder, WARMUP + TASKS, worker, log)
                elapsed = time.perf_counter() - started
            finally:
                _stop(worker)
                client.close()
    return TASKS / elapsed, TASKS / published


def measure() -> tuple[dict[str, list[float]], dict[str, list[float]], dict[str, float]]:
    """tasks/s per round (live), publishes/s per round (live), tasks/s (prefilled)."""
    rates: dict[str, list[float]] = {}
    publishes: dict[str, list[float]] = {}
    for round_number in range(1, ROUNDS + 1):
        order = CONTESTANTS if round_number % 2 else CONTESTANTS[::-1]
        for key, _, contestant, poll in order:
            say(f"  live, round {round_number}/{ROUNDS}: {key}")
            rate, publish_rate = batch(contestant, poll=poll)
            rates.setdefault(key, []).append(rate)
            publishes.setdefault(key, []).append(publish_rate)
    prefilled: dict[str, float] = {}
    for key, _, contestant, poll in CONTESTANTS:
        if key in PREFILLED:
            say(f"  prefilled: {key}")
            prefilled[key] = batch(contestant, poll=poll, prefilled=True)[0]
    return rates, publishes, prefilled


def run() -> str:
    started = time.perf_counter()
    rates, publishes, prefilled = measure()
    say(f"  bench_broker took {time.perf_counter() - started:.0f} s")
    median = {key: statistics.median(values) for key, values in rates.items()}
    rows = [
        [
            label,
            f"{median[key]:,.0f}",
            f"{min(rates[key]):,.0f} - {max(rates[key]):,.0f}",
            f"{median[key] / median['sqla']:.2f}x",
            f"{statistics.median(publishes[key]):,.0f}",
            f"{prefilled[key]:,.0f} ({prefilled[key] / prefilled['sqla']:.2f}x)"
            if key in prefilled
            else "-",
        ]
        for key, label, _, _ in CONTESTANTS
    ]
    main_table = table(
        [
            "broker",
            "median tasks/s",
            "range over rounds",
            "vs sqla+sqlite",
            "publishes/s (client, while the worker runs)",
            "tasks/s, queue filled first (vs sqla)",
        ],
        rows,
    )
    live = median["taskkit"] / median["sqla"]
    full = prefilled["taskkit"] / prefilled["sqla"]
    target = table(
        ["ratio (tasks/s over tasks/s)", "measured", "target", "met"],
        [
            [
                "taskkit+sqlite / sqla+sqlite, published while running",
                f"**{live:.2f}x**",
                ">= 3x",
                "yes" if live >= 3 else "**no**",
            ],
            [
                "taskkit+sqlite / sqla+sqlite, queue filled first",
                f"**{full:.2f}x**",
                ">= 3x",
                "yes" if full >= 3 else "**no**",
            ],
        ],
    )
    return f"""## Embedded broker throughput: `taskkit+sqlite` against kombu's SQLite transports

The broker is the only difference: one plain Celery app (no taskkit task class; late acks,
prefetch 1, JSON, `task_ignore_result=True` and no result backend, so no result writes),
served by one `celery worker` subprocess (prefork, concurrency 2, no gossip/mingle/heartbeat)
on a fresh broker file or folder per batch. A batch publishes {TASKS:,} trivial tasks with
`delay()` from this process, after {WARMUP} untimed ones, while the worker runs; tasks/s is
{TASKS:,} over the time from the first publish until the last task has run (each task appends
one byte to a file), publishing included. The contestants take turns ({ROUNDS} rounds, in
alternating order); the table gives the median and the range. The last column is one batch
with all {WARMUP + TASKS:,} tasks published before the worker starts, timed from the end of the
warm-up tasks: the consumer alone. kombu's SQLAlchemy transport passes its transport options
to `create_engine`, so its polling interval cannot be changed; the filesystem transport is
shown with its default and with a 10 ms poll. Target (issue 15): taskkit's transport at least
3x kombu's SQLAlchemy transport.

{main_table}

{target}
"""


def main() -> None:
    """``python -m benchmarks.bench_broker`` (``make bench-broker``): run this section alone
    and replace it in docs/benchmarks.md (added at the end when missing)."""
    replace_section(run())


if __name__ == "__main__":
    main()
