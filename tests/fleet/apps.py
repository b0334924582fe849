"""The Celery app and tasks the fleet tests run in worker subprocesses; they count in Redis."""

from __future__ import annotations

import os
import time
from typing import Any

from taskkit.tasks import ResilientTask
from tests._support.apps import KEY_TTL, redis_test_app

# TASKKIT_TEST_FLEET_REDIS: the Redis the limits live in (a test stops it); default the broker's.
_limits = os.environ.get("TASKKIT_TEST_FLEET_REDIS")
kit = redis_test_app("fleet", **({"taskkit_lease_backend": _limits} if _limits else {}))
app, counter, key = kit.app, kit.counter, kit.key


def _note(task: Any, name: str) -> None:
    counter.pipeline(transaction=False).rpush(key("retries", name), task.request.retries).expire(
        key("retries", name), KEY_TTL
    ).execute()


@app.task(base=ResilientTask, bind=True, fleet_rate_limit="20/s")
def rated(self: Any, n: int) -> int:
    _note(self, "rated")
    return n


@app.task(base=ResilientTask, bind=True, fleet_concurrency=2)
def slotted(self: Any, seconds: float) -> str:
    """Counts the bodies running now across every worker, and the most ever seen."""
    running = int(counter.incr(key("running")))
    counter.expire(key("running"), KEY_TTL)
    script = "local m = tonumber(redis.call('GET', KEYS[1]) or '0') "
    script += "if tonumber(ARGV[1]) > m then redis.call('SET', KEYS[1], ARGV[1], 'EX', 3600) end"
    counter.eval(script, 1, key("max_running"), running)
    try:
        time.sleep(seconds)
    finally:
        counter.decr(key("running"))
    _note(self, "slotted")
    return "done"


@app.task(base=ResilientTask, bind=True, fleet_concurrency=1, fleet_key="tenant")
def hog(self: Any, tenant: str, seconds: float) -> str:
    counter.set(key("hog_started", tenant), 1, ex=KEY_TTL)
    time.sleep(seconds)
    return "done"
