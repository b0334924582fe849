"""The Celery app the worker metrics test runs in a prefork worker subprocess (``tkm-<RUN>``).

Every task counts the calls of its body in Redis (``calls(name)``), so the test compares the
worker's ``/metrics`` with what the tasks did, not with what taskkit says it did.
"""

from __future__ import annotations

from typing import Any

from taskkit.tasks import BatchTask, ResilientTask, TrainingTask
from tests._support.apps import redis_test_app
from workers.training import run_training

kit = redis_test_app("tkm")
app, counter, key = kit.app, kit.counter, kit.key
QUEUE = kit.queue


def bump(name: str) -> int:
    n = int(counter.incr(key("calls", name)))
    counter.expire(key("calls", name), 3600)
    return n


def calls(name: str) -> int:
    return int(counter.get(key("calls", name)) or 0)


@app.task(base=ResilientTask, bind=True, shared=False, name=kit.name("inner"), max_retries=3)
def inner_flaky(self: ResilientTask, name: str, failures: int) -> int:
    """A ``ConnectionError`` (transient) the first ``failures`` calls: retried in process."""
    n = bump(name)
    if n <= failures:
        raise ConnectionError(f"call {n} of {name}: connection reset")
    return n


@app.task(base=ResilientTask, bind=True, shared=False, name=kit.name("outer"), max_retries=3)
def outer_flaky(self: ResilientTask, name: str, failures: int) -> int:
    """A ``KeyError`` (neither transient nor permanent) the first ``failures`` calls: the task
    is re-queued (an outer retry)."""
    n = bump(name)
    if n <= failures:
        raise KeyError(f"call {n} of {name}")
    return n


@app.task(base=ResilientTask, bind=True, shared=False, name=kit.name("broken"), max_retries=3)
def broken(self: ResilientTask, name: str) -> None:
    """A ``ValueError`` (permanent): a terminal failure and a dead letter."""
    bump(name)
    raise ValueError(f"{name}: no such record")


@app.task(
    base=BatchTask,
    bind=True,
    shared=False,
    name=kit.name("items"),
    item_delay=0.0,
    item_max_attempts=1,
    max_retries=3,
)
def items(self: BatchTask, item: dict[str, Any]) -> None:
    """An item with ``"bad": True`` fails (once: ``item_max_attempts=1``): a dead item."""
    bump(f"item-{item['nonce']}")
    if item.get("bad"):
        raise RuntimeError(f"item {item['id']} is bad")


@app.task(base=TrainingTask, bind=True, shared=False, name=kit.name("train"))
def train(self: TrainingTask, model_run_id: int, config: dict[str, Any]) -> dict[str, Any]:
    return run_training(self, config, on_epoch=lambda epoch: bump(f"epochs-{config['nonce']}"))
