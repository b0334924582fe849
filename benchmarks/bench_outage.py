"""Seconds until a submit gives up when the broker or the result backend is down.

A redis-server of the benchmark's own (a port in 6391-6399) is the result backend or the broker,
then killed (the port refuses) or stopped with SIGSTOP (the port accepts, nothing answers);
``submit_run`` must raise ``BrokerUnavailable`` (target: under 2 s). Beside it, the same
``apply_async`` on a plain Celery app with Celery's defaults and the backend killed: what a
submit cost before (one run: it takes ~20 s).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import statistics
import subprocess
import tempfile
import time
from typing import Any

import redis
from celery import Celery

from benchmarks._harness import table
from taskkit.config import Settings
from taskkit.db.migrate import upgrade
from taskkit.db.session import dispose_engines, get_engine
from taskkit.errors import BrokerUnavailable
from taskkit.tasks import ResilientTask, create_app
from taskkit.tasks._runs import submit_run
from taskkit.tasks._submit import check_reachable

RUNS = 5
SHARED_REDIS = os.environ.get("TASKKIT_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


class _Server:
    def __init__(self) -> None:
        for port in range(6391, 6400):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
            break
        else:
            raise RuntimeError("no free port in 6391-6399")
        self.port = port
        self.url = f"redis://127.0.0.1:{port}/0"
        binary = shutil.which("redis-server") or "redis-server"
        self.process = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
             "no", "--daemonize", "no"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        client = redis.Redis(port=port, socket_connect_timeout=0.2)
        for _ in range(200):
            try:
                client.ping()
                break
            except redis.exceptions.ConnectionError:
                time.sleep(0.05)
        client.close()

    def stop(self, how: str) -> None:
        if how == "hung":
            os.kill(self.process.pid, signal.SIGSTOP)
        else:
            self.kill()

    def kill(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGCONT)
            self.process.kill()
            self.process.wait(10)


def _seconds_until_refused(down: str, how: str, database_url: str) -> float:
    server = _Server()
    try:
        broker = server.url if down == "broker" else SHARED_REDIS
        backend = server.url if down == "result backend" else SHARED_REDIS
        app = create_app(
            "bench-outage",
            settings=Settings(broker_url=broker, result_backend=backend),
            task_default_queue="bench-outage-q",
            taskkit_database_url=database_url,
        )

        @app.task(base=ResilientTask, bind=True, name="bench-outage.train")
        def train(self: Any, model_run_id: int, config: dict[str, Any]) -> None:
            """Never runs."""

        server.stop(how)
        began = time.perf_counter()
        try:
            submit_run(train, {}, database_url=database_url)
        except BrokerUnavailable:
            return time.perf_counter() - began
        raise AssertionError(f"submit_run did not raise with the {down} {how}")
    finally:
        server.kill()


def _celery_defaults_seconds() -> float:
    server = _Server()
    try:
        app = Celery("bench-plain", broker=SHARED_REDIS, backend=server.url)
        app.conf.task_default_queue = "bench-outage-q"

        @app.task(name="bench-outage.plain")
        def plain() -> None:
            """Never runs."""

        server.stop("killed")
        began = time.perf_counter()
        try:
            plain.apply_async()
        except Exception:  # Celery's RuntimeError after its reconnect loop
            return time.perf_counter() - began
        raise AssertionError("apply_async did not raise")
    finally:
        server.kill()


def _check_ms_when_up() -> float:
    """What the check costs every submit when both services answer (the shared Redis)."""
    app = create_app(
        "bench-up", settings=Settings(broker_url=SHARED_REDIS, result_backend=SHARED_REDIS)
    )
    check_reachable(app)
    times = []
    for _ in range(50):
        began = time.perf_counter()
        check_reachable(app)
        times.append((time.perf_counter() - began) * 1000)
    return statistics.median(times)


def run() -> str:
    with tempfile.TemporaryDirectory() as home:
        database_url = f"sqlite:///{home}/bench.db"
        upgrade(get_engine(database_url))
        rows = []
        for down in ("result backend", "broker"):
            for how in ("killed", "hung"):
                times = [_seconds_until_refused(down, how, database_url) for _ in range(RUNS)]
                rows.append(
                    [f"`submit_run`, {down} {how}", f"{statistics.median(times):.2f} s",
                     f"{max(times):.2f} s"]
                )  # fmt: skip
        baseline = _celery_defaults_seconds()
        rows.append(["Celery's defaults, backend killed (1 run)", f"{baseline:.2f} s", "-"])
        check = _check_ms_when_up()
        dispose_engines()
    redis.Redis.from_url(SHARED_REDIS).delete("bench-outage-q")
    return f"""## Outages: seconds until a submit gives up

Median and worst of {RUNS} runs each (`benchmarks/bench_outage.py`): a redis-server of the
benchmark's own is the result backend or the broker, then killed (the port refuses) or stopped
with SIGSTOP (the port accepts, nothing answers), and `submit_run` raises `BrokerUnavailable`
with no run row made. Target: under 2 s. The last row is Celery's own reconnect loop on a plain
app, what `submit_run` waited before (and then left a failed run).

{table(["case", "median", "worst"], rows)}

The check costs every submit {check:.1f} ms (median of 50, both services up on this host's
Redis): a connection to the broker and a `PING` to the result backend.
"""


if __name__ == "__main__":
    print(run())
