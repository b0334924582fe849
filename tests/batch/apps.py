"""The Celery app and batch task the batch worker tests run, in process and in subprocesses.

Built by ``tests._support.apps.redis_test_app``: a real Redis broker and result backend, with a
queue, key prefix and task names of this test session's own (``TASKKIT_TEST_RUN`` is shared
with worker subprocesses), a short visibility timeout (``TASKKIT_TEST_VISIBILITY``) and a short
lease. ``flaky_items`` is a ``BatchTask`` over items
``{"id": n, "nonce": trial}`` (the nonce travels with the item, so a replayed dead letter still
knows its trial). What an item does is deterministic:

- ``n % 100 == 0`` (1%): always raises ``RuntimeError`` while the trial's ``broken`` flag is set
  in Redis (``set_broken``), what a bug waiting for a fix looks like;
- ``n % 20 == 7`` (5%, never the same items): raises ``ConnectionError`` on its first execution
  only;
- otherwise (and on success): sleeps ``item["pause"]`` seconds if given (the kill tests make
  chunks slow enough to be killed mid-way), then writes its side effect, an idempotent upsert
  into ``batch_effects(nonce, item)`` in PostgreSQL (``ON CONFLICT DO NOTHING``).

Every execution is counted in Redis per item (``runs``), and so is every side-effect write
(``effects``): the tests know which items ran more than once. A worker-side signal records
when each chunk delivery starts and ends, in which process (``chunk_events``), so the tests
can tell which chunks a kill interrupted and when they ran again.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from celery import signals
from sqlalchemy import text

from taskkit.db.session import get_engine
from taskkit.tasks import BatchTask
from tests._support.apps import redis_test_app

EFFECTS_DDL = (
    "CREATE TABLE IF NOT EXISTS batch_effects ("
    "nonce text NOT NULL, item integer NOT NULL, PRIMARY KEY (nonce, item))"
)
_EFFECT = text(
    "INSERT INTO batch_effects (nonce, item) VALUES (:nonce, :item) ON CONFLICT DO NOTHING"
)

kit = redis_test_app("tkb", lease_ttl=3.0)
app, PREFIX, QUEUE, counter, key = kit.app, kit.prefix, kit.queue, kit.counter, kit.key


# -- what the tests control and read ---------------------------------------------------------


def set_broken(nonce: str, broken: bool = True) -> None:
    """Make the trial's 1% items fail on every execution (or stop doing so: "the fix")."""
    if broken:
        counter.set(key("broken", nonce), 1, ex=3600)
    else:
        counter.delete(key("broken", nonce))


def always_failing(number: int) -> bool:
    return number % 100 == 0


def failing_once(number: int) -> bool:
    return number % 20 == 7


def runs(nonce: str) -> dict[int, int]:
    """Executions per item number (every call of the item function)."""
    return {int(k): int(v) for k, v in counter.hgetall(key("runs", nonce)).items()}


def effects(nonce: str) -> dict[int, int]:
    """Side-effect writes per item number (executions that got past the failures)."""
    return {int(k): int(v) for k, v in counter.hgetall(key("effects", nonce)).items()}


def chunk_events(batch_id: str) -> list[dict[str, Any]]:
    """Starts and ends of the batch's chunk deliveries, in order, as the workers saw them."""
    return [json.loads(raw) for raw in counter.lrange(key("chunks", batch_id), 0, -1)]


# -- the task ---------------------------------------------------------------------------------


@app.task(
    base=BatchTask,
    bind=True,
    shared=False,
    name=kit.name("flaky_items"),
    item_delay=0.02,
    item_max_delay=0.1,
    item_max_attempts=3,
    ledger_flush_every=100,
    max_retries=8,
)
def flaky_items(self: BatchTask, item: dict[str, Any]) -> None:
    nonce, number = str(item["nonce"]), int(item["id"])
    executions, broken = (
        counter.pipeline(transaction=False)
        .hincrby(key("runs", nonce), str(number), 1)
        .exists(key("broken", nonce))
        .execute()
    )
    if always_failing(number) and broken:
        raise RuntimeError(f"item {number}: the model is broken")
    if failing_once(number) and executions == 1:
        raise ConnectionError(f"item {number}: connection reset (first execution)")
    pause = item.get("pause")
    if pause:
        time.sleep(float(pause))
    with get_engine(self.app.conf.get("taskkit_database_url")).begin() as connection:
        connection.execute(_EFFECT, {"nonce": nonce, "item": number})
    counter.hincrby(key("effects", nonce), str(number), 1)


# -- where chunks ran -------------------------------------------------------------------------


def _batch_of(kwargs: Any) -> str | None:
    batch_id = (kwargs or {}).get("batch_id")
    return str(batch_id) if batch_id else None


def _note(batch_id: str, event: dict[str, Any]) -> None:
    counter.pipeline(transaction=False).rpush(key("chunks", batch_id), json.dumps(event)).expire(
        key("chunks", batch_id), 3600
    ).execute()


@signals.task_prerun.connect(weak=False)
def _chunk_started(
    sender: Any = None, task_id: str | None = None, kwargs: Any = None, **_: Any
) -> None:
    batch_id = _batch_of(kwargs)
    if batch_id is None or sender is None or not kit.owns(sender):
        return
    request = sender.request
    _note(
        batch_id,
        {
            "event": "start",
            "task_id": task_id,
            "offset": int(kwargs.get("offset") or 0),
            "pid": os.getpid(),
            "time": time.time(),
            "retries": int(request.retries or 0),
            "redelivered": bool(
                request.get("redelivered") or (request.delivery_info or {}).get("redelivered")
            ),
        },
    )


@signals.task_postrun.connect(weak=False)
def _chunk_ended(
    sender: Any = None,
    task_id: str | None = None,
    kwargs: Any = None,
    state: str | None = None,
    **_: Any,
) -> None:
    batch_id = _batch_of(kwargs)
    if batch_id is None or not kit.owns(sender):
        return
    _note(
        batch_id,
        {
            "event": "end",
            "task_id": task_id,
            "offset": int(kwargs.get("offset") or 0),
            "pid": os.getpid(),
            "time": time.time(),
            "state": state,
        },
    )
