"""The Celery app and tasks the task tests run, in process and in worker subprocesses.

Built by ``tests._support.apps.redis_test_app``: a real Redis broker, and a queue, a key prefix,
task names and counters of this test session's own, so sessions never see each other's
messages or leases. The tasks count what they do in Redis: the tests trust those counts, not
logs.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

from taskkit.tasks import ResilientTask
from tests._support.apps import redis_test_app

kit = redis_test_app("tk", worker_send_task_events=True)
app, counter, key = kit.app, kit.counter, kit.key
PREFIX, QUEUE, deliveries = kit.prefix, kit.queue, kit.deliveries


def bump(name: str) -> int:
    return int(counter.incr(key("runs", name)))


def runs(name: str) -> int:
    return int(counter.get(key("runs", name)) or 0)


def retries_seen(name: str) -> list[int]:
    return [int(r) for r in counter.lrange(key("retries", name), 0, -1)]


def _note(task: Any, name: str) -> int:
    counter.rpush(key("retries", name), task.request.retries)
    return bump(name)


ERRORS = {"ConnectionError": ConnectionError, "ValueError": ValueError, "KeyError": KeyError}


@app.task(base=ResilientTask, bind=True, max_retries=3)
def flaky(self: ResilientTask, name: str, failures: int, error: str = "ConnectionError") -> int:
    """Fail the first ``failures`` runs with ``error``, then return the number of runs."""
    n = _note(self, name)
    if n <= failures:
        raise ERRORS[error](f"run {n} of {name} fails")
    return n


@app.task(base=ResilientTask, bind=True, max_retries=3)
def seed_style(self: ResilientTask, name: str) -> str:
    """The seed's explicit ``raise self.retry(exc=..., countdown=...)``."""
    n = _note(self, name)
    try:
        if n == 1:
            raise RuntimeError("first run fails")
        return "ok"
    except RuntimeError as exc:
        raise self.retry(exc=exc, countdown=0.1) from None


@app.task(base=ResilientTask, bind=True, lease_key="name", max_retries=5)
def long_job(self: ResilientTask, name: str, seconds: float) -> int:
    """Run for ``seconds`` with progress; count starts and completions in Redis."""
    n = bump(name)
    counter.rpush(key("pids", name), os.getpid())
    counter.set(key("token", name, n), self.lease.token if self.lease else -1)
    started = time.monotonic()
    steps = max(1, int(seconds / 0.25))
    for step in range(steps):
        time.sleep(seconds / steps)
        self.progress(step + 1, steps, "working")
    counter.incr(key("done", name))
    counter.set(key("elapsed", name), time.monotonic() - started)
    return n


@app.task(base=ResilientTask, bind=True, max_retries=2)
def kills_its_process(self: ResilientTask, name: str, kills: int) -> int:
    """SIGKILL the process running it on its first ``kills`` runs (a poison task when high)."""
    n = _note(self, name)
    if n <= kills:
        os.kill(os.getpid(), signal.SIGKILL)
    return n


@app.task(
    base=ResilientTask, bind=True, progress_run_arg="model_run_id", progress_flush_timeout=1.0
)
def epochs(self: ResilientTask, model_run_id: int, n: int, pause: float = 0.0) -> int:
    """An epoch loop that reports progress with a metric after each epoch."""
    for i in range(n):
        time.sleep(pause)
        self.progress(i + 1, n, f"epoch {i + 1}", loss=round(1 / (i + 1), 4))
    return n


@app.task(base=ResilientTask, bind=True)
def count_progress(self: ResilientTask, n: int) -> int:
    """Report progress ``n`` times (no database)."""
    for i in range(n):
        self.progress(i + 1, n)
    return n


@app.task(base=ResilientTask, bind=True)
def quick(self: ResilientTask, name: str) -> int:
    return bump(name)


@app.task(bind=True)
def plain(self: Any) -> None:
    """A plain Celery task (the benchmark's baseline)."""


@app.task(base=ResilientTask, bind=True)
def resilient(self: ResilientTask) -> None:
    """The same trivial body as ``plain``, as a ResilientTask."""
