"""The app the broker tests run in real worker subprocesses: the embedded default broker.

Everything lives under ``TASKKIT_HOME`` (the test's own folder): the ``queue.db`` broker, the
results file, and ``done/<task id>`` files that record each run of ``record`` (a side effect a
test can count). ``hold`` runs until the test creates ``release`` in home, so a test can kill a
worker while the task is in flight.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from taskkit.tasks import create_app

HOME = Path(os.environ.get("TASKKIT_HOME", "."))

app = create_app("brokertest", task_ignore_result=True)


@app.task(bind=True)
def record(self: Any, name: str) -> None:
    """Append one line per run to ``done/<name>``."""
    done = HOME / "done"
    done.mkdir(exist_ok=True)
    with (done / name).open("a") as f:
        f.write(f"{os.getpid()}\n")


@app.task(bind=True)
def hold(self: Any, name: str) -> None:
    """Mark ``started/<name>`` and wait for ``release`` (at most 60 s), then record ``name``."""
    started = HOME / "started"
    started.mkdir(exist_ok=True)
    with (started / name).open("a") as f:
        f.write(f"{os.getpid()}\n")
    deadline = time.monotonic() + 60
    while not (HOME / "release").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    record(name)
