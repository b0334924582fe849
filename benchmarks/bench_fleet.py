"""Fleet-wide rate limit against Celery's own ``rate_limit``: 4 worker processes, 600/min.

``python -m benchmarks.bench_fleet`` runs this section alone. Four ``celery worker``
subprocesses (prefork, concurrency 1 each) consume one queue holding more work than a minute
can take; each task body records its start time in Redis. The rate is counted over a 60 s window
that starts 5 s after the first body (workers warm). Celery's ``rate_limit="600/m"`` holds per
worker, so four workers run about four times that; ``fleet_rate_limit="600/m"`` holds for the
fleet.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import redis

from benchmarks._harness import commit, machine, replace_section, say, table
from taskkit.config import load_settings
from taskkit.tasks import ResilientTask, create_app

REDIS_URL = os.environ.get("TASKKIT_BENCH_FLEET_REDIS_URL", "redis://127.0.0.1:6379/13")
RUN_VARIABLE = "TASKKIT_BENCH_FLEET_RUN"
RUN = os.environ.get(RUN_VARIABLE) or uuid.uuid4().hex[:10]
PREFIX = f"tk-fleet-{RUN}"
QUEUE = f"{PREFIX}-q"
ROOT = Path(__file__).resolve().parent.parent
WORKERS = 4
RATE = "600/m"
PER_MINUTE = 600
WARM = 5.0
WINDOW = 60.0

app = create_app(
    "bench-fleet",
    settings=load_settings(broker_url=REDIS_URL),
    task_default_queue=QUEUE,
    broker_transport_options={"global_keyprefix": f"{PREFIX}:"},
    task_ignore_result=True,
)
_client = redis.Redis.from_url(REDIS_URL)


def _record(kind: str) -> None:
    _client.rpush(f"{PREFIX}:starts:{kind}", repr(time.time()))


@app.task(
    base=ResilientTask, bind=True, shared=False, name="bench_fleet.fleet", fleet_rate_limit=RATE
)
def fleet_limited(self: Any) -> None:
    _record("fleet")


@app.task(base=ResilientTask, bind=True, shared=False, name="bench_fleet.celery", rate_limit=RATE)
def celery_limited(self: Any) -> None:
    _record("celery")


def _start_workers(log_dir: Path) -> list[subprocess.Popen[bytes]]:
    env = {
        **os.environ,
        RUN_VARIABLE: RUN,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    workers = []
    for i in range(WORKERS):
        command = [
            sys.executable, "-m", "celery", "-A", "benchmarks.bench_fleet", "worker",
            "--pool=prefork", "--concurrency=1", "--without-gossip", "--without-mingle",
            "--without-heartbeat", "-Q", QUEUE, "-n", f"{PREFIX}-{i}@bench", "-l", "info",
        ]  # fmt: skip
        log = (log_dir / f"worker-{i}.log").open("wb")
        workers.append(
            subprocess.Popen(
                command,
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
    return workers


def _stop(workers: list[subprocess.Popen[bytes]]) -> None:
    for worker in workers:
        if worker.poll() is None:
            worker.terminate()
    for worker in workers:
        try:
            worker.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait(timeout=10)


def _measure(kind: str, task: Any, count: int) -> tuple[float, int]:
    """Calls per minute in the window, and the requeues the workers logged."""
    key = f"{PREFIX}:starts:{kind}"
    for _ in range(count):
        task.delay()
    deadline = time.monotonic() + WARM + WINDOW + 120
    while time.monotonic() < deadline:
        first = _client.lindex(key, 0)
        if first is not None and time.time() > float(first) + WARM + WINDOW + 2:
            break
        time.sleep(1)
    starts = [float(s) for s in _client.lrange(key, 0, -1)]
    if not starts:
        raise RuntimeError(f"bench_fleet: no {kind} task ran")
    begin = starts[0] + WARM
    inside = [s for s in starts if begin <= s < begin + WINDOW]
    return len(inside) * 60.0 / WINDOW, len(starts)


def run() -> str:
    say("bench_fleet: 4 workers, fleet_rate_limit vs Celery rate_limit, 600/m")
    with tempfile.TemporaryDirectory() as tmp:
        workers = _start_workers(Path(tmp))
        try:
            time.sleep(8)  # the workers start (their first task would wait otherwise)
            fleet, fleet_ran = _measure("fleet", fleet_limited, 900)
            _client.delete(f"{PREFIX}:{QUEUE}")  # what the window did not need
            celery, celery_ran = _measure("celery", celery_limited, 3200)
            requeues = sum(
                (Path(tmp) / f"worker-{i}.log")
                .read_text(errors="replace")
                .count("over its fleet rate limit")
                for i in range(WORKERS)
            )
        finally:
            _stop(workers)
            keys = list(_client.scan_iter(match=f"{PREFIX}*", count=1000))
            keys += list(_client.scan_iter(match=f"taskkit:fleet:*{PREFIX}*", count=1000))
            keys += list(_client.scan_iter(match="taskkit:fleet:*bench_fleet.*", count=1000))
            if keys:
                _client.delete(*keys)
    rows = [
        [
            '`fleet_rate_limit="600/m"`',
            f"{fleet:.0f}",
            f"{fleet / PER_MINUTE:.3f}x",
            f"{(fleet - PER_MINUTE) / PER_MINUTE:+.1%}",
        ],
        [
            'Celery `rate_limit="600/m"`',
            f"{celery:.0f}",
            f"{celery / PER_MINUTE:.3f}x",
            f"{(celery - PER_MINUTE) / PER_MINUTE:+.1%}",
        ],
    ]
    section = f"""## Fleet rate limit (issue 19)

`python -m benchmarks.bench_fleet`: {WORKERS} `celery worker` processes (prefork, concurrency 1)
on one queue with more tasks than a minute takes; each body records its start; calls counted over
a {WINDOW:g} s window starting {WARM:g} s after the first body. Target: the fleet limit within 5%
of 600/min; Celery's per-worker limit about {WORKERS}x that. The fleet run re-queued {requeues}
deliveries (the limiter's booked waits), none counted as a retry.
Machine: {machine()}; commit {commit()}.

{table(["limit", "calls/min", "of 600/min", "error"], rows)}
"""
    del fleet_ran, celery_ran
    return section


if __name__ == "__main__":
    replace_section(run())
