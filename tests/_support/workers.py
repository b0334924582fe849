"""Celery workers for the tests: in this process (``in_process_worker``) or as subprocesses
(``WorkerProcess``, so a test can SIGKILL a pool process or a whole worker)."""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

REPO = pathlib.Path(__file__).resolve().parents[2]


@contextmanager
def in_process_worker(app: Any) -> Iterator[Any]:
    """Celery's in-process test worker (solo pool, a thread of this process) consuming the
    app's default queue; stopped when the block ends."""
    from celery.contrib.testing.worker import start_worker

    with start_worker(
        app,
        pool="solo",
        concurrency=1,
        perform_ping_check=False,
        loglevel="WARNING",
        shutdown_timeout=30,
    ) as running:
        yield running


def wait_for(
    condition: Callable[[], object], timeout: float, what: str, step: float = 0.05
) -> float:
    """Poll until ``condition()`` is true; return the seconds it took, or fail naming ``what``."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(step)
    return time.monotonic() - start


class WorkerProcess:
    """``celery -A <app> worker`` in its own process group, logging to a file."""

    def __init__(
        self,
        name: str,
        log_dir: pathlib.Path,
        *,
        app: str = "tests.tasks.apps",
        queue: str | None = None,
        pool: str = "prefork",
        concurrency: int = 1,
        env: dict[str, str] | None = None,
        prefix: Sequence[str] = (),
        hostname: str | None = None,
    ) -> None:
        """``prefix``: a command the worker runs under (``ip netns exec <ns>``, which execs, so
        the PID is still the worker's); ``hostname``: Celery's ``--hostname`` (``<name>@%h``)."""
        self.name = name
        self.log_path = log_dir / f"worker-{name}.log"
        command = [
            *prefix,
            sys.executable,
            "-m",
            "celery",
            "-A",
            app,
            "worker",
            "--pool",
            pool,
            "--concurrency",
            str(concurrency),
            "--hostname",
            hostname or f"{name}@%h",
            "--loglevel",
            "INFO",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
        ]
        if queue:
            command += ["--queues", queue]
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            command,
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 60) -> None:
        def ready() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"worker {self.name} exited:\n{self.log()[-3000:]}")
            return " ready." in self.log()

        wait_for(ready, timeout, f"worker {self.name} to be ready", step=0.1)

    def children(self) -> set[int]:
        found = set()
        for entry in pathlib.Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    stat = (entry / "stat").read_text()
                except OSError:
                    continue
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
                if ppid == self.pid:
                    found.add(int(entry.name))
        return found

    def kill(self) -> None:
        """SIGKILL the whole worker: main process and pool processes, no warm shutdown."""
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()
        else:
            try:
                os.killpg(self.pid, signal.SIGKILL)  # orphaned pool processes, if any
            except ProcessLookupError:
                pass
        self._log.close()
