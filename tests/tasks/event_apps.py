"""The Celery app whose worker subprocesses report every ``taskkit.recovery.events`` event.

Built by ``tests._support.apps.redis_test_app`` (a prefix, queue and task names of this test
session's own). A worker started on this module subscribes, at ``worker_init`` (before the
prefork pool forks, so every pool process inherits it), a subscriber that pushes each event as
JSON (its class name under ``"type"``, then its fields) onto one Redis list: the tests read the
exact sequence the worker's sources emitted.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import redis
from celery import signals

from taskkit.recovery import events
from taskkit.tasks import BatchTask, ResilientTask, TrainingTask
from tests._support.apps import KEY_TTL, redis_test_app
from tests.conftest import REDIS_URL

# Tasks here are not shared (shared=False) and their names are their own: Celery copies a
# shared task into every app of the process, under that app's prefix, where a task of the same
# name would replace another app's.

kit = redis_test_app("tkev", lease_ttl=3.0)
app, counter, key = kit.app, kit.counter, kit.key
PREFIX, QUEUE = kit.prefix, kit.queue

#: The Redis list the worker's events go to.
EVENTS = key("events")

_clients: dict[int, redis.Redis] = {}


def _client() -> redis.Redis:
    """A client per process (a forked pool process must not share its parent's socket)."""
    pid = os.getpid()
    if pid not in _clients:
        _clients[pid] = redis.Redis.from_url(REDIS_URL)
    return _clients[pid]


def record(event: events.Event) -> None:
    """Push ``event`` onto ``EVENTS`` (exceptions as their class name)."""
    fields = {f.name: getattr(event, f.name) for f in dataclasses.fields(event)}
    for name, value in fields.items():
        if isinstance(value, BaseException):
            fields[name] = type(value).__name__
    line = json.dumps({"type": type(event).__name__, **fields}, default=str)
    _client().pipeline(transaction=False).rpush(EVENTS, line).expire(EVENTS, KEY_TTL).execute()


@signals.worker_init.connect(weak=False)
def _subscribe(sender: Any = None, **_: Any) -> None:
    if getattr(sender, "app", None) is app:  # not another app's in-process test worker
        events.subscribe(record)


def recorded() -> list[dict[str, Any]]:
    """The events the workers pushed so far, in order."""
    return [json.loads(raw) for raw in counter.lrange(EVENTS, 0, -1)]


def clear() -> None:
    counter.delete(EVENTS)


ERRORS = {"ConnectionError": ConnectionError, "ValueError": ValueError, "KeyError": KeyError}


@app.task(base=ResilientTask, bind=True, shared=False, max_retries=3)
def ev_flaky(self: ResilientTask, name: str, failures: int, error: str = "ConnectionError") -> int:
    """Fail the first ``failures`` runs with ``error``, then return the number of runs."""
    n = int(counter.incr(key("runs", name)))
    counter.expire(key("runs", name), KEY_TTL)
    if n <= failures:
        raise ERRORS[error](f"run {n} of {name} fails")
    return n


@app.task(base=ResilientTask, bind=True, shared=False, lease_key="name", max_retries=2)
def ev_leased(self: ResilientTask, name: str) -> int:
    """Hold the lease of ``name`` for one call; return the lease's fencing token."""
    assert self.lease is not None
    return self.lease.token


@app.task(base=BatchTask, bind=True, shared=False, item_max_attempts=1)
def ev_items(self: BatchTask, item: int) -> None:
    """An item that is a multiple of 3 (but not 0) is invalid: dead-lettered at once."""
    if item and item % 3 == 0:
        raise ValueError(f"item {item} is invalid")


@app.task(base=TrainingTask, bind=True, shared=False, checkpoint_every=1, max_retries=3)
def ev_train(self: TrainingTask, model_run_id: int, config: dict[str, Any]) -> dict[str, Any]:
    """Count ``config["epochs"]`` epochs, checkpointing each; fail once (a ``KeyError``, which
    is re-queued) before reporting epoch ``config["fail_at"]``."""
    with self.training(total_epochs=config["epochs"]) as run:
        state = run.restore() or {"w": 0}
        for epoch in run.epochs():
            state = {"w": state["w"] + 1}
            if epoch == config.get("fail_at") and counter.set(
                key("failed", config["nonce"]), 1, nx=True, ex=KEY_TTL
            ):
                raise KeyError(f"injected failure at epoch {epoch}")
            run.report(epoch, {"score": float(epoch)}, state)
        return run.complete(state)
