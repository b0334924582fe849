"""The circuit breakers: GET /breakers, POST /breakers/{name}/reset.

Decisions:

- The service knows three kinds of breaker: those registered on the app (``register``), those
  other modules list through ``SOURCES`` (functions of the app returning breakers: the
  predictor's, ``http:<host>``, and every per-host breaker of the process's
  ``taskkit.http`` clients), and, when the service has a
  Redis (``shared_redis_url``: ``TASKKIT_LEASE_URL``, which defaults to a Redis broker or
  result backend), every breaker shared there by any process (``RedisCircuitStorage``'s keys,
  ``taskkit:circuit:{name}``). A shared breaker known only from Redis is read through a
  breaker of that name on the same storage: its state and failures are the fleet's, its
  threshold and timeout are not known here (``null``).
- Listing is sorted by name; reading writes nothing (a breaker's ``state`` has no side effect).
- ``reset`` closes the breaker and forgets its failures, for every process when it is shared.
  An unknown name is a 404 that lists the known ones.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Request
from pydantic import BaseModel, Field

from taskkit.api._auth import require_token
from taskkit.config import Settings
from taskkit.recovery import CircuitBreaker, RedisCircuitStorage

__all__ = [
    "SOURCES",
    "BreakerOut",
    "BreakersOut",
    "known_breakers",
    "register",
    "router",
    "shared_redis_url",
]

router = APIRouter(tags=["breakers"])

#: Functions of the app that return more breakers the service knows (name -> breaker).
SOURCES: list[Callable[[Any], dict[str, CircuitBreaker]]] = []

#: The key prefix ``RedisCircuitStorage`` uses by default.
SHARED_PREFIX = "taskkit:circuit:"
#: Shared breakers listed at most (a fleet's Redis is scanned, not read whole).
MAX_SHARED = 1000


class BreakerOut(BaseModel):
    """One breaker: its state and counts."""

    name: str
    state: Literal["closed", "open", "half_open"]
    failure_count: int = Field(description="Consecutive failures counted while closed.")
    failure_threshold: int | None = Field(
        description="Failures that open it (null: shared, configured in another process)."
    )
    recovery_timeout: float | None = Field(
        description="Seconds it stays open before a probe (null: as failure_threshold)."
    )
    retry_after: float = Field(description="Seconds until an open breaker admits a probe.")
    shared: bool = Field(
        description="Whether its state is in Redis, shared by a fleet (a shared breaker that "
        "never failed has no state there yet)."
    )


class BreakersOut(BaseModel):
    """Every breaker the service knows, by name."""

    breakers: list[BreakerOut]


def shared_redis_url(settings: Settings) -> str | None:
    """The Redis where the service's breakers are shared: ``TASKKIT_LEASE_URL`` when it is a
    Redis URL (its default is a Redis broker or result backend), else None (breakers local).

    Example::

        shared_redis_url(Settings(broker_url="redis://127.0.0.1:6379/0"))
        # 'redis://127.0.0.1:6379/0'
    """
    url = settings.lease_url
    return url if url.split("://", 1)[0] in {"redis", "rediss"} else None


def register(app: Any, breaker: CircuitBreaker) -> None:
    """Make ``breaker`` known to the service's ``/breakers`` and ``/health``.

    Example::

        register(request.app, client.breaker)
    """
    _registry(app)[breaker.name] = breaker


def known_breakers(app: Any) -> dict[str, CircuitBreaker]:
    """Every breaker the service knows (see the module's decisions), by name.

    Example::

        states = {name: b.state for name, b in known_breakers(request.app).items()}
    """
    return {name: known.breaker for name, known in _known(app).items()}


class _Known:
    __slots__ = ("breaker", "configured", "shared")

    def __init__(self, breaker: CircuitBreaker, configured: bool, shared: bool) -> None:
        self.breaker, self.configured, self.shared = breaker, configured, shared

    def out(self) -> BreakerOut:
        breaker = self.breaker
        return BreakerOut(
            name=breaker.name,
            state=breaker.state.value,
            failure_count=breaker.failure_count,
            failure_threshold=breaker.failure_threshold if self.configured else None,
            recovery_timeout=breaker.recovery_timeout if self.configured else None,
            retry_after=round(breaker.remaining, 3),
            shared=self.shared,
        )


def _known(app: Any) -> dict[str, _Known]:
    found: dict[str, _Known] = {}
    shared: set[str] = set()
    url = shared_redis_url(app.state.settings)
    if url is not None:
        storage = _storage(url)
        readers = _shared_readers(app)
        for name in _shared_names(storage):
            if name not in readers:
                readers[name] = CircuitBreaker(name=name, storage=storage)
            found[name] = _Known(readers[name], configured=False, shared=True)
            shared.add(name)
    configured = dict(_registry(app))
    for source in SOURCES:
        configured.update(source(app))
    if url is not None and configured:
        shared |= _stored(_storage(url), [n for n in configured if n not in shared])
    for name, breaker in configured.items():
        found[name] = _Known(breaker, configured=True, shared=name in shared)
    return dict(sorted(found.items()))


@router.get("/breakers", response_model=BreakersOut)
def list_breakers(request: Request) -> BreakersOut:
    """Every breaker the service knows: state, failure count, threshold, seconds left."""
    return BreakersOut(breakers=[known.out() for known in _known(request.app).values()])


@router.post(
    "/breakers/{name:path}/reset",
    response_model=BreakerOut,
    dependencies=[Depends(require_token)],
    responses={404: {"description": "No breaker has this name"}},
)
def reset_breaker(name: str, request: Request) -> BreakerOut:
    """Close a breaker and forget its failures (in every process, when shared in Redis)."""
    breakers = _known(request.app)
    known = breakers.get(name)
    if known is None:
        listed = ", ".join(breakers) or "none"
        raise HTTPException(404, f"no circuit breaker named {name!r} (known: {listed})")
    known.breaker.reset()
    return known.out()


def _registry(app: Any) -> dict[str, CircuitBreaker]:
    if not hasattr(app.state, "breakers"):
        app.state.breakers = {}
    registry: dict[str, CircuitBreaker] = app.state.breakers
    return registry


def _shared_readers(app: Any) -> dict[str, CircuitBreaker]:
    if not hasattr(app.state, "shared_breakers"):
        app.state.shared_breakers = {}
    readers: dict[str, CircuitBreaker] = app.state.shared_breakers
    return readers


@functools.cache
def _storage(url: str) -> RedisCircuitStorage:
    import redis  # noqa: PLC0415 - only with a shared Redis

    client = redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1)
    return RedisCircuitStorage(client, prefix=SHARED_PREFIX)


def _stored(storage: RedisCircuitStorage, names: list[str]) -> set[str]:
    """Which of these breakers have a state in Redis (one round trip)."""
    if not names:
        return set()
    try:
        pipeline = storage.link.client.pipeline(transaction=False)
        for name in names:
            pipeline.exists(storage.keys(name)[0])
        return {name for name, found in zip(names, pipeline.execute(), strict=True) if found}
    except Exception:  # redis's errors: as in _shared_names
        return set()


def _shared_names(storage: RedisCircuitStorage) -> list[str]:
    """Names of the breakers shared in Redis; none when Redis does not answer (the breakers
    then run on their local state, and ``/health/ready`` says Redis is down)."""
    client = storage.link.client
    names: list[str] = []
    try:
        for raw in client.scan_iter(match=SHARED_PREFIX + "{*}", count=500):
            key = raw.decode() if isinstance(raw, bytes) else str(raw)
            names.append(key[len(SHARED_PREFIX) + 1 : -1])
            if len(names) >= MAX_SHARED:
                break
    except Exception:  # redis's errors: an unreachable Redis lists nothing shared
        return []
    return names
