"""Fleet-wide limits: a rate limit (GCRA) and a concurrency limit shared through Redis.

Celery's ``rate_limit`` is per worker process; these limits hold for every process that names
the same limit, on any host. Each decision is one Lua script (one round trip, atomic).

Decisions:

- Rate: GCRA (the generic cell rate algorithm). One key holds the *theoretical arrival time*;
  a call is admitted when ``now >= tat - tau`` (``tau`` = ``(burst - 1)`` emission intervals),
  else it is told exactly how long to wait. Time is Redis server time (one clock for the whole
  fleet) unless a ``clock`` is injected (tests pass a fake one).
- Concurrency: a sorted set of holders scored by their expiry. A holder that dies stops
  heartbeating and its slot is freed once ``ttl`` has passed (expired members are removed by
  the next acquire). A denied acquire is told to wait until the earliest expiry, capped.
- Redis unreachable: denied (fail closed) with ``retry_interval`` as the wait, unless
  ``fail_open=True`` (then admitted). One warning per outage (``RedisLink``).

Example::

    limit = FleetRateLimit("redis://127.0.0.1:6379/0", "geocoder", "600/m")
    decision = limit.acquire()
    if not decision.allowed:
        print("retry in", decision.wait)
"""

from __future__ import annotations

import contextlib
import re
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from taskkit.errors import ConfigurationError
from taskkit.recovery._redis_link import RedisLink, text

if TYPE_CHECKING:
    from redis import Redis

__all__ = ["FleetConcurrency", "FleetDecision", "FleetRateLimit", "FleetSlot", "parse_rate"]

# KEYS[1]: the tat key. ARGV: emission interval (s), tau (s), now ('' = Redis TIME), longest
# reservation (s). Reply: {1 admitted / 2 a later slot reserved / 0 denied, wait as a string}.
# Times within a microsecond (Redis TIME's resolution) count as equal.
_GCRA = """
local now
if ARGV[3] == '' then
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
else
  now = tonumber(ARGV[3])
end
local interval = tonumber(ARGV[1])
local tau = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now then tat = now end
local allow_at = tat - tau
if now + 0.000001 < allow_at then
  local wait = allow_at - now
  if wait <= tonumber(ARGV[4]) then
    local booked = tat + interval
    local booked_ms = math.ceil((booked - now) * 1000) + 1000
    redis.call('SET', KEYS[1], string.format('%.17g', booked), 'PX', booked_ms)
    return {2, string.format('%.17g', wait)}
  end
  return {0, string.format('%.17g', wait)}
end
local new_tat = tat + interval
local ttl_ms = math.ceil((new_tat - now) * 1000) + 1000
redis.call('SET', KEYS[1], string.format('%.17g', new_tat), 'PX', ttl_ms)
return {1, '0'}
"""

# KEYS[1]: the holders' sorted set. ARGV: limit, ttl (s), holder id, now ('' = Redis TIME),
# longest wait (s). Reply: {admitted 1/0, wait seconds as a string}.
_ACQUIRE = """
local now
if ARGV[4] == '' then
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
else
  now = tonumber(ARGV[4])
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[1]) then
  local expires = now + tonumber(ARGV[2])
  redis.call('ZADD', KEYS[1], string.format('%.17g', expires), ARGV[3])
  redis.call('PEXPIRE', KEYS[1], math.ceil(tonumber(ARGV[2]) * 1000) + 1000)
  return {1, '0'}
end
local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
local wait = math.min(tonumber(first[2]) - now, tonumber(ARGV[5]))
return {0, string.format('%.17g', wait)}
"""

# KEYS[1]: the holders. ARGV: ttl, holder id, now ('' = Redis TIME). Reply: 1 if still held.
_RENEW = """
local now
if ARGV[3] == '' then
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
else
  now = tonumber(ARGV[3])
end
local score = redis.call('ZSCORE', KEYS[1], ARGV[2])
if not score or tonumber(score) <= now then
  redis.call('ZREM', KEYS[1], ARGV[2])
  return 0
end
redis.call('ZADD', KEYS[1], string.format('%.17g', now + tonumber(ARGV[1])), ARGV[2])
redis.call('PEXPIRE', KEYS[1], math.ceil(tonumber(ARGV[1]) * 1000) + 1000)
return 1
"""

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(\d*)\s*([smhd])\s*$")


def parse_rate(rate: str | float) -> float:
    """Calls per second of a rate written like Celery's: ``"100/m"``, ``"10/s"``, ``"5/h"``
    (also ``"10/5m"``); a number is calls per second.

    Example::

        assert parse_rate("600/m") == 10.0
    """
    if isinstance(rate, int | float) and not isinstance(rate, bool):
        if rate <= 0:
            raise ConfigurationError(f"a rate must be > 0, got {rate!r}")
        return float(rate)
    match = _RATE.match(str(rate))
    if match is None:
        raise ConfigurationError(f"a rate is written like '100/m' (s, m, h or d), got {rate!r}")
    count, every, unit = float(match[1]), float(match[2] or 1), _UNITS[match[3]]
    if count <= 0 or every <= 0:
        raise ConfigurationError(f"a rate must be > 0, got {rate!r}")
    return count / (every * unit)


@dataclass(frozen=True)
class FleetDecision:
    """Whether a call may go now and, if not, ``wait`` seconds before asking again (or, when
    ``reserved``, before running without asking); ``unavailable`` when Redis could not be asked
    (the decision is then the fail-open/closed one)."""

    allowed: bool
    wait: float = 0.0
    unavailable: bool = False
    reserved: bool = False


class FleetRateLimit:
    """At most ``rate`` calls (``"100/m"``) for the whole fleet, per ``key`` if given.

    ``burst``: calls admitted back to back after a quiet spell (1: evenly spaced).

    Example::

        limit = FleetRateLimit("redis://127.0.0.1:6379/0", "crm-api", "100/m")
        if limit.acquire(key="customer-42").allowed:
            ...
    """

    def __init__(
        self,
        client: Redis | str,
        name: str,
        rate: str | float,
        *,
        burst: int = 1,
        fail_open: bool = False,
        retry_interval: float = 1.0,
        clock: Callable[[], float] | None = None,
        prefix: str = "taskkit:fleet:rate:",
    ) -> None:
        if not (isinstance(burst, int) and burst >= 1):
            raise ConfigurationError(f"burst must be an integer >= 1, got {burst!r}")
        self.per_second = parse_rate(rate)
        self.interval = 1.0 / self.per_second
        self.tau = (burst - 1) * self.interval
        self.name = name
        self.fail_open = fail_open
        self.prefix = f"{prefix}{{{name}}}"
        self.link = RedisLink(
            client,
            what=f"fleet rate limit {name!r}",
            on_unavailable="local" if fail_open else "reject",
            retry_interval=retry_interval,
        )
        self._clock = clock
        self._script = self.link.register(_GCRA)

    def acquire(self, key: str = "", *, reserve: float = 0.0) -> FleetDecision:
        """Admit one call now (and count it), or say how long to wait.

        ``reserve``: when the wait is at most this many seconds, book the call's slot now
        (``reserved``): the caller must run it after ``wait`` without asking again. Waiting
        callers then line up instead of all asking again at the next slot (a herd)."""
        if self.link.up:
            now = "" if self._clock is None else repr(self._clock())
            try:
                admitted, wait = self._script(
                    keys=[f"{self.prefix}:{key}"], args=[self.interval, self.tau, now, reserve]
                )
            except self.link.errors as exc:
                self.link.failed(exc)
            else:
                self.link.succeeded()
                code = int(admitted)
                return FleetDecision(code == 1, max(0.0, float(text(wait))), reserved=code == 2)
        return _unavailable(self.fail_open, self.link)


class FleetSlot:
    """A held concurrency slot: heartbeat it while the work runs, release it after."""

    def __init__(self, limit: FleetConcurrency, key: str, holder: str) -> None:
        self.limit = limit
        self.key = key
        self.holder = holder
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def renew(self) -> bool:
        """Push the slot's expiry ``ttl`` ahead; False if it had expired (freed)."""
        return self.limit._renew(self)

    def start_heartbeat(self) -> None:
        """Renew every third of ``ttl`` on a daemon thread until ``release``."""
        self._thread = threading.Thread(
            target=self._beat, name=f"taskkit-fleet-{self.limit.name}", daemon=True
        )
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.limit.ttl / 3):
            try:
                self.renew()
            except Exception:
                continue

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=1.0)
        with contextlib.suppress(*self.limit.link.errors):  # else freed by expiry after ttl
            self.limit.link.client.zrem(self.key, self.holder)


class FleetConcurrency:
    """At most ``limit`` calls running at once across the fleet, per ``key`` if given; a
    holder that dies frees its slot ``ttl`` seconds after its last heartbeat.

    Example::

        limit = FleetConcurrency("redis://127.0.0.1:6379/0", "gpu", 2, ttl=15)
        slot, decision = limit.acquire()
        if slot is not None:
            slot.start_heartbeat()
            try:
                ...
            finally:
                slot.release()
    """

    def __init__(
        self,
        client: Redis | str,
        name: str,
        limit: int,
        *,
        ttl: float = 15.0,
        max_wait: float = 5.0,
        fail_open: bool = False,
        retry_interval: float = 1.0,
        clock: Callable[[], float] | None = None,
        prefix: str = "taskkit:fleet:slots:",
    ) -> None:
        if not (isinstance(limit, int) and limit >= 1):
            raise ConfigurationError(f"limit must be an integer >= 1, got {limit!r}")
        if not ttl > 0:
            raise ConfigurationError(f"ttl must be > 0 seconds, got {ttl!r}")
        self.name = name
        self.limit = limit
        self.ttl = float(ttl)
        self.max_wait = float(max_wait)
        self.fail_open = fail_open
        self.prefix = f"{prefix}{{{name}}}"
        self.link = RedisLink(
            client,
            what=f"fleet concurrency {name!r}",
            on_unavailable="local" if fail_open else "reject",
            retry_interval=retry_interval,
        )
        self._clock = clock
        self._acquire = self.link.register(_ACQUIRE)
        self._renew_script = self.link.register(_RENEW)

    def _now(self) -> str:
        return "" if self._clock is None else repr(self._clock())

    def acquire(self, key: str = "") -> tuple[FleetSlot | None, FleetDecision]:
        """A slot (None when denied or, failing open, when Redis is unreachable) and the
        decision."""
        if self.link.up:
            holder = uuid.uuid4().hex
            redis_key = f"{self.prefix}:{key}"
            try:
                admitted, wait = self._acquire(
                    keys=[redis_key],
                    args=[self.limit, self.ttl, holder, self._now(), self.max_wait],
                )
            except self.link.errors as exc:
                self.link.failed(exc)
            else:
                self.link.succeeded()
                if int(admitted) == 1:
                    return FleetSlot(self, redis_key, holder), FleetDecision(True)
                return None, FleetDecision(False, max(0.0, float(text(wait))))
        return None, _unavailable(self.fail_open, self.link)

    def holders(self, key: str = "") -> int:
        """Slots held now (expired ones included until the next acquire removes them)."""
        return int(self.link.client.zcard(f"{self.prefix}:{key}"))

    def _renew(self, slot: FleetSlot) -> bool:
        result = self._renew_script(keys=[slot.key], args=[self.ttl, slot.holder, self._now()])
        return int(result) == 1


def _unavailable(fail_open: bool, link: RedisLink) -> FleetDecision:
    if fail_open:
        return FleetDecision(True, 0.0, unavailable=True)
    return FleetDecision(False, max(link.seconds_until_retry(), 0.1), unavailable=True)
