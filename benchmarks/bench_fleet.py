"""Fleet-wide rate limit against Celery's own ``rate_limit``: 4 worker processes, 600/min.

``python -m benchmarks.bench_fleet`` runs this section alone. Four ``celery worker``
subprocesses (prefork, concurrency 1 each) consume one queue holding more work than a minute
can take; each task body records its start time in Redis. The rate is counted over a 60 s window
that starts 5 s after the first body (workers warm). Celery's ``rate_limit="600/m"`` holds per
worker, so four workers run about four times that; ``fleet_rate_limit="600/m"`` holds for the
fleet.

Two hosts when this machine can make them (root and ``ip netns``): the workers run as 2 hosts x
2 processes, each host a Linux network namespace reaching a redis-server of this run (broker and
limiter) over its own veth link, as ``tests/fleet_hosts`` builds them (``tests/_support/netns.py``:
``Hosts``, ``RedisOnLinks``, ``NamespacedWorker``). Elsewhere the four workers run on this host,
against ``TASKKIT_BENCH_FLEET_REDIS_URL``, and the section says why.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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
#: Simulated hosts (network namespaces) the workers are spread over, when namespaces can be made.
HOSTS = 2
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


#: The simulated host a worker runs on ("" on this host).
HOST = os.environ.get("TASKKIT_BENCH_FLEET_HOST", "")


def _record(kind: str) -> None:
    _client.rpush(f"{PREFIX}:starts:{kind}", f"{time.time()!r}|{HOST}")


@app.task(
    base=ResilientTask, bind=True, shared=False, name="bench_fleet.fleet", fleet_rate_limit=RATE
)
def fleet_limited(self: Any) -> None:
    _record("fleet")


@app.task(base=ResilientTask, bind=True, shared=False, name="bench_fleet.celery", rate_limit=RATE)
def celery_limited(self: Any) -> None:
    _record("celery")


class _Worker:
    """A started worker: its log, and how to stop it."""

    def __init__(self, log: Path, stop: Callable[[], None]) -> None:
        self.log = log
        self.stop = stop


def _worker_env(redis_url: str, host: str = "") -> dict[str, str]:
    return {
        RUN_VARIABLE: RUN,
        "TASKKIT_BENCH_FLEET_REDIS_URL": redis_url,
        "TASKKIT_BENCH_FLEET_HOST": host,
    }


def _start_workers(log_dir: Path) -> list[_Worker]:
    """The workers on this host, against ``REDIS_URL``."""
    env = {
        **os.environ,
        **_worker_env(REDIS_URL),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    workers = []
    for i in range(WORKERS):
        command = [
            sys.executable, "-m", "celery", "-A", "benchmarks.bench_fleet", "worker",
            "--pool=prefork", "--concurrency=1", "--without-gossip", "--without-mingle",
            "--without-heartbeat", "-Q", QUEUE, "-n", f"{PREFIX}-{i}@bench", "-l", "info",
        ]  # fmt: skip
        path = log_dir / f"worker-{i}.log"
        log = path.open("wb")
        process = subprocess.Popen(
            command,
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        workers.append(_Worker(path, lambda process=process: _stop(process)))
    time.sleep(8)  # the workers start (their first task would wait otherwise)
    return workers


def namespaces_unavailable() -> str | None:
    """Why the workers cannot run on simulated hosts here, or None."""
    try:
        from tests._support.netns import unavailable
    except ImportError as exc:  # run outside the repository's checkout
        return f"tests/_support/netns.py cannot be imported ({exc})"
    if os.geteuid() != 0:
        return "network namespaces need root"
    return unavailable()


@contextmanager
def two_hosts(log_dir: Path) -> Iterator[tuple[str, list[_Worker]]]:
    """``HOSTS`` namespaces, a redis-server on their links, ``WORKERS // HOSTS`` workers in each;
    yields the server's URL on 127.0.0.1 (for this process) and the workers."""
    from tests._support.netns import Hosts, NamespacedWorker, RedisOnLinks

    hosts = Hosts.create(HOSTS)
    stops: list[Callable[[], None]] = [hosts.destroy]
    try:
        server = RedisOnLinks(hosts.root_ips(), log_dir)
        stops.append(server.stop)
        started: list[NamespacedWorker] = []
        for host in hosts.hosts:
            for i in range(WORKERS // HOSTS):
                worker = NamespacedWorker(
                    host,
                    f"{PREFIX}-{host.label}{i}",
                    log_dir,
                    app="benchmarks.bench_fleet",
                    queue=QUEUE,
                    env=_worker_env(server.url(host.root_ip), host.label),
                )
                stops.append(worker.stop)
                started.append(worker)
        for worker in started:
            worker.wait_ready(timeout=90)
        yield server.url(), [_Worker(w.log_path, w.stop) for w in started]
    finally:
        for stop in reversed(stops):
            try:
                stop()
            except Exception as exc:  # the rest is still cleaned up
                say(f"bench_fleet: cleanup step failed: {exc}")


def _use_redis(url: str) -> None:
    """Send the tasks and read the starts through ``url`` (the workers' Redis) from here on."""
    global _client
    app.conf.broker_url = url
    _client = redis.Redis.from_url(url)


def _stop(worker: subprocess.Popen[bytes]) -> None:
    if worker.poll() is None:
        worker.terminate()
    try:
        worker.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait(timeout=10)


def _measure(kind: str, task: Any, count: int) -> tuple[float, dict[str, int]]:
    """Calls per minute in the window, and the window's calls by host."""
    key = f"{PREFIX}:starts:{kind}"
    for _ in range(count):
        task.delay()
    deadline = time.monotonic() + WARM + WINDOW + 120
    while time.monotonic() < deadline:
        first = _client.lindex(key, 0)
        if first is not None and time.time() > float(first.split(b"|")[0]) + WARM + WINDOW + 2:
            break
        time.sleep(1)
    starts = []
    for value in _client.lrange(key, 0, -1):
        when, _, host = value.decode().partition("|")
        starts.append((float(when), host))
    if not starts:
        raise RuntimeError(f"bench_fleet: no {kind} task ran")
    begin = starts[0][0] + WARM
    inside = [host for when, host in starts if begin <= when < begin + WINDOW]
    hosts = {host: inside.count(host) for host in sorted(set(inside))}
    return len(inside) * 60.0 / WINDOW, hosts


Measured = tuple[float, dict[str, int], float, dict[str, int], int]


def _run_on(workers: list[_Worker]) -> Measured:
    """The two windows, side by side on the same workers: fleet, then Celery; each rate with
    its calls by host, and the fleet run's re-queued deliveries."""
    fleet, fleet_hosts = _measure("fleet", fleet_limited, 900)
    _client.delete(f"{PREFIX}:{QUEUE}")  # what the window did not need
    celery, celery_hosts = _measure("celery", celery_limited, 3200)
    requeues = sum(
        worker.log.read_text(errors="replace").count("over its fleet rate limit")
        for worker in workers
    )
    return fleet, fleet_hosts, celery, celery_hosts, requeues


def run() -> str:
    why_not = namespaces_unavailable()
    if why_not is not None:
        say(f"bench_fleet: the workers run on one host: {why_not}")
    say("bench_fleet: fleet_rate_limit vs Celery rate_limit, 600/m")
    with tempfile.TemporaryDirectory() as tmp:
        if why_not is None:
            with two_hosts(Path(tmp)) as (url, workers):
                _use_redis(url)
                measured = _run_on(workers)
            setting = (
                f"{WORKERS} `celery worker` processes on {HOSTS} hosts ({WORKERS // HOSTS} "
                "each), each host a Linux network namespace (`ip netns`) that reaches a "
                "redis-server of this run (broker and limiter) over its own veth link, as "
                "`tests/fleet_hosts` builds them"
            )
        else:
            workers = _start_workers(Path(tmp))
            try:
                measured = _run_on(workers)
            finally:
                for worker in workers:
                    worker.stop()
                keys = list(_client.scan_iter(match=f"{PREFIX}*", count=1000))
                keys += list(_client.scan_iter(match=f"taskkit:fleet:*{PREFIX}*", count=1000))
                keys += list(_client.scan_iter(match="taskkit:fleet:*bench_fleet.*", count=1000))
                if keys:
                    _client.delete(*keys)
            setting = (
                f"{WORKERS} `celery worker` processes on this one host (not {HOSTS} simulated "
                f"hosts: {why_not}), against `{REDIS_URL}`"
            )
    return report(setting, measured)


def report(setting: str, measured: Measured) -> str:
    fleet, fleet_hosts, celery, celery_hosts, requeues = measured

    def by_host(hosts: dict[str, int]) -> str:
        return ", ".join(f"{host or 'here'} {count}" for host, count in hosts.items())

    rows = [
        [
            label,
            f"{rate:.0f}",
            f"{rate / PER_MINUTE:.3f}x",
            f"{(rate - PER_MINUTE) / PER_MINUTE:+.1%}",
            by_host(hosts),
        ]
        for label, rate, hosts in (
            ('`fleet_rate_limit="600/m"`', fleet, fleet_hosts),
            ('Celery `rate_limit="600/m"`', celery, celery_hosts),
        )
    ]
    return f"""## Fleet rate limit (issue 19)

`python -m benchmarks.bench_fleet`: {setting}.

The workers (prefork, concurrency 1) consume one queue holding more tasks than a minute takes;
each body records its start and its host; calls are counted over a {WINDOW:g} s window starting
{WARM:g} s after the first body; the fleet limit first, then Celery's, on the same workers.
Target: the fleet limit within 5% of 600/min; Celery's per-worker limit about {WORKERS}x that.
The fleet run re-queued {requeues} deliveries (the limiter's booked waits), none counted as a
retry. Machine: {machine()}; commit {commit()}.

{table(["limit", "calls/min", "of 600/min", "error", "calls in the window by host"], rows)}
"""


if __name__ == "__main__":
    replace_section(run())
