"""Example tasks: the smallest useful ResilientTasks, and the ones the README demonstrates."""

from __future__ import annotations

import time

from taskkit.tasks import ResilientTask
from workers.app import app


@app.task(base=ResilientTask, bind=True)
def add(self: ResilientTask, x: float, y: float) -> float:
    """Add two numbers (a smoke test for a worker)."""
    return x + y


@app.task(base=ResilientTask, bind=True)
def count_to(self: ResilientTask, n: int, delay: float = 0.1) -> int:
    """Count to ``n``, reporting progress at each step (watch it with ``AsyncResult.info``)."""
    for i in range(1, n + 1):
        time.sleep(delay)
        self.progress(i, n, f"counted {i}")
    return n
