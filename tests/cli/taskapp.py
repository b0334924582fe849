"""The app of ``taskkit tasks show``'s tests, run by a real worker subprocess.

``crawl`` fails its first call with a ``ConnectionError`` (one inner retry),
reports progress 3 of 10, then waits (bounded) until the test sets its ``go`` key, and
finishes; ``broken`` fails for good. Names, queue and keys are under this session's prefix.
"""

from __future__ import annotations

import time
from typing import Any

from taskkit.tasks import ResilientTask
from tests._support.apps import redis_test_app

kit = redis_test_app("tkcli-task", lease_ttl=6.0)
app = kit.app


def go_key(key: str) -> str:
    return kit.key("go", key)


@app.task(base=ResilientTask, bind=True, lease_key="key", inner_max_attempts=3, max_retries=2)
def crawl(self: ResilientTask, key: str, steps: int = 10) -> dict[str, Any]:
    calls = kit.counter.incr(kit.key("calls", self.request.id))
    kit.counter.expire(kit.key("calls", self.request.id), 600)
    if calls == 1:
        raise ConnectionError("the crawler's first connection was reset")
    self.progress(3, steps, "crawling", pages=3, errors=0.5)
    deadline = time.monotonic() + 60
    while not kit.counter.exists(go_key(key)) and time.monotonic() < deadline:
        time.sleep(0.05)
    self.progress(steps, steps, "done", pages=steps)
    return {"pages": steps, "url": "https://crawler:hunter2@example.com/x"}


@app.task(base=ResilientTask, bind=True, inner_max_attempts=2, max_retries=3)
def requeued(self: ResilientTask, key: str) -> str:
    """Fails both in-process attempts of its first delivery (re-queued by the outer layer),
    then reports progress and waits for its ``go`` key."""
    if self.request.retries == 0:
        raise ConnectionError("the first delivery's connections were all reset")
    self.progress(1, 2, "second delivery")
    deadline = time.monotonic() + 60
    while not kit.counter.exists(go_key(key)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return key


@app.task(base=ResilientTask, bind=True)
def broken(self: ResilientTask, path: str) -> None:
    raise ValueError(f"cannot parse {path}")


#: An app whose result backend never answers (nothing listens on port 1), with a password.
down = redis_test_app("tkcli-task-down", result_backend="redis://:s3cret@127.0.0.1:1/0").app
