"""The Redis test-app builder every test folder uses (``tests/{tasks,training,batch}/apps.py``).

A test app lives under a prefix of its own, ``<kind>-<RUN>``: ``RUN`` is this pytest session's
nonce, shared with its worker subprocesses through ``TASKKIT_TEST_RUN``. The prefix is on the
queue, on every broker and result key (``global_keyprefix``), on the task names (so on the lease
and fence keys, ``taskkit:lease:<task name>:...``) and on the counters the tests keep. Broker
redelivery counts (``taskkit:redeliveries:<task id>``) carry no name, so the app records the ids
of the tasks it starts. ``delete_own_keys`` deletes exactly these keys: never another session's.
"""

from __future__ import annotations

import functools
import os
import uuid
from dataclasses import dataclass, field
from typing import Any

import redis
from celery import Celery, signals

from taskkit.config import Settings
from taskkit.tasks import create_app
from tests.conftest import REDIS_URL

#: This session's nonce (worker subprocesses inherit it and build the same names).
RUN = os.environ.setdefault("TASKKIT_TEST_RUN", uuid.uuid4().hex[:10])

#: Seconds the keys the tasks count with live, should a session die before its cleanup.
KEY_TTL = 3600


@dataclass(eq=False)
class RedisTestApp:
    """A Celery app of one test folder and the Redis names of this session that belong to it."""

    app: Celery
    prefix: str
    counter: redis.Redis = field(repr=False)

    @property
    def queue(self) -> str:
        return f"{self.prefix}-q"

    def key(self, *parts: object) -> str:
        """A counter key of this app and session: ``<prefix>:<part>:<part>...``."""
        return ":".join([self.prefix, *map(str, parts)])

    def name(self, task: str) -> str:
        """The name of a task of this app (its lease keys carry it)."""
        return f"{self.prefix}.{task}"

    def owns(self, task: Any) -> bool:
        return str(getattr(task, "name", "")).startswith(self.prefix + ".")

    def deliveries(self, task_id: str) -> int:
        """How many times a worker started this task id (before any taskkit check)."""
        return int(self.counter.get(self.key("deliveries", task_id)) or 0)

    def _started(self, sender: Any = None, task_id: str | None = None, **_: Any) -> None:
        if not self.owns(sender):
            return
        self.counter.pipeline(transaction=False).incr(self.key("deliveries", task_id)).expire(
            self.key("deliveries", task_id), KEY_TTL
        ).sadd(self.key("task_ids"), str(task_id)).expire(self.key("task_ids"), KEY_TTL).execute()

    def delete_own_keys(self) -> int:
        """Delete this session's keys of the app (see the module docstring); returns how many."""
        client = self.counter
        task_ids = [raw.decode() for raw in client.smembers(self.key("task_ids"))]
        keys = [
            *client.scan_iter(f"{self.prefix}*", count=1000),
            *client.scan_iter(f"taskkit:*:{self.prefix}.*", count=1000),
            *(f"taskkit:redeliveries:{task_id}" for task_id in task_ids),
        ]
        deleted = 0
        for start in range(0, len(keys), 1000):
            deleted += int(client.delete(*keys[start : start + 1000]))
        return deleted


#: The test apps this process built (the session's cleanup visits each).
BUILT: list[RedisTestApp] = []


def redis_test_app(kind: str, *, lease_ttl: float = 6.0, **config: Any) -> RedisTestApp:
    """The Celery app of a test folder: the real Redis broker and result backend, short retry
    waits, and this session's prefix ``<kind>-<RUN>`` on every name (``config`` adds to or
    overrides the Celery settings). ``TASKKIT_TEST_VISIBILITY`` and ``TASKKIT_TEST_LEASE_TTL``
    let a test shorten the visibility timeout and the lease for its worker subprocesses.

    Example::

        kit = redis_test_app("tk", worker_send_task_events=True)

        @kit.app.task(base=ResilientTask, bind=True)
        def ping(self):                      # named f"{kit.prefix}.ping"
            ...
    """
    prefix = f"{kind}-{RUN}"
    settings = Settings(
        broker_url=REDIS_URL,
        visibility_timeout=float(os.environ.get("TASKKIT_TEST_VISIBILITY", "30")),
        lease_ttl=float(os.environ.get("TASKKIT_TEST_LEASE_TTL", str(lease_ttl))),
        progress_interval=0.0,
    )
    options: dict[str, Any] = {
        "task_default_queue": f"{prefix}-q",
        "broker_transport_options": {"global_keyprefix": f"{prefix}:"},
        "result_backend_transport_options": {
            "global_keyprefix": f"{prefix}:",
            "retry_policy": {"timeout": 30.0},
        },
        "result_expires": KEY_TTL,
        "taskkit_outer_delay": 0.05,
        "taskkit_outer_max_delay": 0.2,
        "taskkit_inner_delay": 0.01,
        "taskkit_inner_max_delay": 0.02,
    }
    app = create_app(kind, settings=settings, **{**options, **config})
    kit = RedisTestApp(app, prefix, redis.Redis.from_url(REDIS_URL))

    def under_prefix(name: str, module: str) -> str:
        return kit.name(name)

    # Tasks declared without a name get one under the prefix, like those that pass kit.name().
    app.gen_task_name = under_prefix  # type: ignore[method-assign]
    # Celery copies a shared task (its default) into every app of the process, under that
    # app's prefix: two test folders each declaring a `flaky` task then meet under one name,
    # and whichever app finalizes first decides which function runs. A test app's tasks are
    # its own.
    app.task = functools.partial(app.task, shared=False)  # type: ignore[method-assign]
    signals.task_prerun.connect(kit._started, weak=False)
    BUILT.append(kit)
    return kit


def delete_own_keys() -> None:
    """Delete this session's keys of every test app it built."""
    for kit in BUILT:
        kit.delete_own_keys()
