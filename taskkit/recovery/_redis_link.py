"""A Redis connection as the shared-state primitives use it: short timeouts, outage tracking."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

from taskkit.errors import ConfigurationError

if TYPE_CHECKING:
    from redis import Redis

__all__ = ["OnUnavailable", "RedisLink"]

logger = logging.getLogger("taskkit.recovery")

OnUnavailable = Literal["local", "reject"]

#: Socket timeouts of a client that taskkit creates from a URL: a Redis that does not answer
#: must cost a protected call half a second at most, and then only once per retry interval.
SOCKET_TIMEOUT = 0.5


class RedisLink:
    """One Redis client and what taskkit knows about its health.

    After a connection error the link is *down* for ``retry_interval`` seconds: callers use
    their local fallback without touching the network, so an outage costs one timeout per
    interval, not one per call. The first error of an outage is logged as a warning, and the
    recovery as info.
    """

    def __init__(
        self,
        client: Redis | str,
        *,
        what: str,
        on_unavailable: OnUnavailable = "local",
        retry_interval: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if on_unavailable not in ("local", "reject"):
            raise ConfigurationError(
                f"on_unavailable must be 'local' or 'reject', got {on_unavailable!r}"
            )
        if not retry_interval > 0:
            raise ConfigurationError(f"retry_interval must be > 0 seconds, got {retry_interval!r}")
        import redis  # noqa: PLC0415 - deferred: importing taskkit.recovery stays cheap

        if isinstance(client, str):
            client = redis.Redis.from_url(
                client,
                socket_timeout=SOCKET_TIMEOUT,
                socket_connect_timeout=SOCKET_TIMEOUT,
                health_check_interval=30,
            )
        elif not isinstance(client, redis.Redis):
            raise ConfigurationError(
                f"expected a redis.Redis client or a redis:// URL, got {client!r}"
            )
        self.client: Redis = client
        self.what = what
        self.on_unavailable = on_unavailable
        self.retry_interval = retry_interval
        self.errors: tuple[type[Exception], ...] = (
            redis.exceptions.ConnectionError,
            redis.exceptions.TimeoutError,
            redis.exceptions.ReadOnlyError,
        )
        self._clock = clock
        self._down_until: float | None = None

    def register(self, lua: str) -> Callable[..., Any]:
        """A Lua script callable as ``script(keys=[...], args=[...])``: one EVALSHA round trip."""
        return self.client.register_script(lua)

    @property
    def up(self) -> bool:
        """False while an outage is being sat out."""
        down_until = self._down_until
        return down_until is None or self._clock() >= down_until

    def seconds_until_retry(self) -> float:
        if self._down_until is None:
            return 0.0
        return max(0.0, self._down_until - self._clock())

    def failed(self, error: BaseException) -> None:
        if self._down_until is None:
            logger.warning(
                "taskkit: Redis unreachable for %s (%s: %s); %s for %gs before trying again",
                self.what,
                type(error).__name__,
                error,
                "using local state" if self.on_unavailable == "local" else "rejecting calls",
                self.retry_interval,
            )
        self._down_until = self._clock() + self.retry_interval

    def succeeded(self) -> None:
        if self._down_until is not None:
            self._down_until = None
            logger.info("taskkit: Redis reachable again for %s", self.what)


def text(value: object) -> str:
    """A Redis reply element as ``str``."""
    if isinstance(value, bytes):
        return value.decode()
    return str(value)
