"""Idempotent submission: one task id per idempotency key within a window, for any task.

Decision: the key is claimed in Redis with ``SET NX EX window`` *before* the message is sent,
holding the new task id; a second submit with the same key (from any process or host) within
the window gets that id back and sends nothing. If the send fails, the claim is deleted (only
if it still holds this submit's id) so the caller can try again; a concurrent submit that read
the id in between gets an id whose message was never sent (it can resubmit after the error).
The Redis is the app's lease store (``taskkit_lease_backend``, ``taskkit_lease_url``) or its
Redis broker.
"""

from __future__ import annotations

import uuid
from typing import Any

import redis
from celery.result import AsyncResult

from taskkit.errors import ConfigurationError

__all__ = ["IDEMPOTENCY_WINDOW", "submit"]

#: Seconds an idempotency key keeps its task id by default (a day).
IDEMPOTENCY_WINDOW = 86_400

_PREFIX = "taskkit:idempotency:"
_clients: dict[str, redis.Redis] = {}

# Delete the claim only if it still holds this submit's id.
_RELEASE = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end"


def submit(
    task: Any,
    *args: Any,
    idempotency_key: str | None = None,
    window: float = IDEMPOTENCY_WINDOW,
    **kwargs: Any,
) -> AsyncResult:  # type: ignore[type-arg]
    """Send ``task(*args, **kwargs)``; with ``idempotency_key``, at most once per ``window``
    seconds: the same key returns the same task id (an ``AsyncResult`` for it) and sends
    nothing.

    Example::

        first = submit(charge, "acme", 100, idempotency_key="order-42")
        again = submit(charge, "acme", 100, idempotency_key="order-42")
        assert again.id == first.id
    """
    if idempotency_key is None:
        return task.apply_async(args, kwargs)  # type: ignore[no-any-return]
    if not idempotency_key or not window > 0:
        raise ConfigurationError("idempotency_key must be a non-empty string and window > 0")
    client = _client(task.app)
    key = f"{_PREFIX}{task.name}:{idempotency_key}"
    task_id = str(uuid.uuid4())
    if not client.set(key, task_id, nx=True, px=max(1, int(window * 1000))):
        existing = client.get(key)
        if existing is not None:
            value = existing.decode() if isinstance(existing, bytes) else str(existing)
            return AsyncResult(value, app=task.app)
        # expired between the two calls: claim again
        client.set(key, task_id, px=max(1, int(window * 1000)))
    try:
        return task.apply_async(args, kwargs, task_id=task_id)  # type: ignore[no-any-return]
    except BaseException:
        client.eval(_RELEASE, 1, key, task_id)
        raise


def _client(app: Any) -> redis.Redis:
    conf = app.conf
    url = str(
        conf.get("taskkit_lease_backend") or conf.get("taskkit_lease_url") or conf.broker_url or ""
    )
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigurationError("idempotent submission needs Redis (taskkit_lease_backend)")
    client = _clients.get(url)
    if client is None:
        client = _clients[url] = redis.Redis.from_url(
            url, socket_timeout=5, socket_connect_timeout=5
        )
    return client
