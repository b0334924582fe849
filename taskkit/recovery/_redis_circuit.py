"""``RedisCircuitStorage``: one breaker state for every process that names the same breaker."""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from taskkit.errors import CircuitBreakerError, CircuitStorageUnavailable
from taskkit.recovery._circuit import (
    WINDOW_BUCKETS,
    Admission,
    CircuitBackend,
    CircuitConfig,
    CircuitState,
    LocalCircuit,
    Notify,
)
from taskkit.recovery._redis_link import OnUnavailable, RedisLink, text

if TYPE_CHECKING:
    from redis import Redis

__all__ = ["RedisCircuitStorage"]

# Every script reads the time from Redis (TIME), so processes on hosts whose clocks disagree
# still agree on when an open breaker may probe. Keys: KEYS[1] the state hash, KEYS[2] the
# probe leases (a sorted set: token -> lease expiry), KEYS[3] the failure-rate window (a hash of
# "c:<bucket>" calls and "f:<bucket>" failures).

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
"""

_OPEN = """
local function open_circuit(now, recovery)
  redis.call('HSET', KEYS[1], 'state', 'open', 'open_until', tostring(now + recovery),
             'failures', 0, 'probe_successes', 0)
  redis.call('DEL', KEYS[2], KEYS[3])
end
"""

# ARGV: recovery_timeout, half_open_max_calls, probe_timeout, token, bucket_width (0: no
# window), buckets. Reply: verdict, state, seconds left, state changed from ('' if not), streak.
_ACQUIRE = (
    _NOW
    + """
local state = redis.call('HGET', KEYS[1], 'state') or 'closed'
local changed = ''
if state == 'open' then
  local open_until = tonumber(redis.call('HGET', KEYS[1], 'open_until') or '0')
  if now < open_until then
    return {'reject', 'open', tostring(open_until - now), '', '0'}
  end
  state = 'half_open'
  changed = 'open'
  redis.call('HSET', KEYS[1], 'state', 'half_open', 'probe_successes', 0)
  redis.call('DEL', KEYS[2])
end
if state == 'half_open' then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
  local in_flight = redis.call('ZCARD', KEYS[2])
  if in_flight >= tonumber(ARGV[2]) then
    return {'reject', 'half_open', '0', changed, tostring(in_flight)}
  end
  local lease = tonumber(ARGV[3])
  redis.call('ZADD', KEYS[2], now + lease, ARGV[4])
  redis.call('PEXPIRE', KEYS[2], math.ceil(lease * 1000) + 1000)
  return {'probe', 'half_open', '0', changed, '0'}
end
local width = tonumber(ARGV[5])
if width > 0 then
  local bucket = math.floor(now / width)
  if redis.call('HINCRBY', KEYS[3], 'c:' .. bucket, 1) == 1 then
    -- first call of a new bucket: drop the buckets that left the window
    local oldest = bucket - tonumber(ARGV[6])
    for _, field in ipairs(redis.call('HKEYS', KEYS[3])) do
      if tonumber(string.sub(field, 3)) <= oldest then redis.call('HDEL', KEYS[3], field) end
    end
    redis.call('PEXPIRE', KEYS[3], math.ceil(width * tonumber(ARGV[6]) * 2000))
  end
end
return {'allow', 'closed', '0', changed, redis.call('HGET', KEYS[1], 'failures') or '0'}
"""
)

# ARGV: failure_threshold, recovery_timeout, token, is_probe, bucket_width, buckets,
# failure_rate_threshold (0: none), minimum_calls. Reply: state, state changed from.
_FAILURE = (
    _NOW
    + _OPEN
    + """
local state = redis.call('HGET', KEYS[1], 'state') or 'closed'
local recovery = tonumber(ARGV[2])
if ARGV[4] == '1' then
  redis.call('ZREM', KEYS[2], ARGV[3])
  if state == 'half_open' then
    open_circuit(now, recovery)
    return {'open', 'half_open'}
  end
  return {state, ''}
end
if state ~= 'closed' then return {state, ''} end
local failures = redis.call('HINCRBY', KEYS[1], 'failures', 1)
local tripped = failures >= tonumber(ARGV[1])
local width = tonumber(ARGV[5])
local rate = tonumber(ARGV[7])
if width > 0 and rate > 0 then
  local bucket = math.floor(now / width)
  redis.call('HINCRBY', KEYS[3], 'f:' .. bucket, 1)
  local oldest = bucket - tonumber(ARGV[6])
  local calls, fails = 0, 0
  local fields = redis.call('HGETALL', KEYS[3])
  for i = 1, #fields, 2 do
    local kind, index = string.sub(fields[i], 1, 1), tonumber(string.sub(fields[i], 3))
    if index > oldest then
      if kind == 'c' then calls = calls + tonumber(fields[i + 1])
      else fails = fails + tonumber(fields[i + 1]) end
    end
  end
  if calls >= tonumber(ARGV[8]) and fails >= rate * calls then tripped = true end
end
if tripped then
  open_circuit(now, recovery)
  return {'open', 'closed'}
end
return {'closed', ''}
"""
)

# ARGV: success_threshold, token, is_probe. Reply: state, state changed from.
_SUCCESS = """
local state = redis.call('HGET', KEYS[1], 'state') or 'closed'
if ARGV[3] == '1' then
  redis.call('ZREM', KEYS[2], ARGV[2])
  if state == 'half_open' then
    if redis.call('HINCRBY', KEYS[1], 'probe_successes', 1) >= tonumber(ARGV[1]) then
      redis.call('HSET', KEYS[1], 'state', 'closed', 'failures', 0, 'probe_successes', 0)
      redis.call('DEL', KEYS[2], KEYS[3])
      return {'closed', 'half_open'}
    end
  end
  return {state, ''}
end
if state == 'closed' then redis.call('HSET', KEYS[1], 'failures', 0) end
return {state, ''}
"""

# Reply: state (an expired open reads half_open), seconds left, failures. Writes nothing.
_READ = (
    _NOW
    + """
local v = redis.call('HMGET', KEYS[1], 'state', 'open_until', 'failures')
local state = v[1] or 'closed'
if state == 'open' then
  local left = tonumber(v[2] or '0') - now
  if left > 0 then return {'open', tostring(left), '0'} end
  return {'half_open', '0', '0'}
end
return {state, '0', v[3] or '0'}
"""
)


class RedisCircuitStorage:
    """Keep breaker state in Redis so a fleet of worker processes shares it.

    Pass it as ``CircuitBreaker(..., name="payments", storage=RedisCircuitStorage(redis))``;
    every breaker with the same name (and prefix) in any process sees one state.

    - Transitions are Lua scripts, atomic in Redis; time is the Redis server's (``TIME``).
    - Keys are ``<prefix>{<name>}``, ``...:probes`` and ``...:window``: namespaced by name, and
      hash-tagged so they live on one Redis Cluster slot.
    - Creating a breaker writes nothing: it never resets the shared state.
    - Round trips: one per call through a healthy closed breaker (the admission script). A
      failure, a probe's outcome, and the first success after failures add one write each.
    - Half-open probe slots are leases: a probe that has not reported after ``probe_timeout``
      (its process crashed, say) frees its slot, so the fleet cannot be wedged half-open.
    - Redis unreachable: with ``on_unavailable="local"`` (the default) each process falls
      back to its own local breaker state and logs one warning per outage; with ``"reject"``
      calls fail closed with ``CircuitStorageUnavailable``. Redis is tried again every
      ``retry_interval`` seconds, not on every call.

    Decision: the failure-rate window counts a call when it is admitted and a failure when it
    is reported, so successes need no write; a call still in flight counts as a success.

    Example::

        import redis
        storage = RedisCircuitStorage(redis.Redis.from_url("redis://127.0.0.1:6379/0"))
        breaker = CircuitBreaker(failure_threshold=5, recovery_timeout=30,
                                 name="feature-store", storage=storage)
    """

    def __init__(
        self,
        client: Redis | str,
        *,
        prefix: str = "taskkit:circuit:",
        on_unavailable: OnUnavailable = "local",
        retry_interval: float = 5.0,
    ) -> None:
        self.link = RedisLink(
            client,
            what="circuit breaker state",
            on_unavailable=on_unavailable,
            retry_interval=retry_interval,
        )
        self.prefix = prefix
        self._acquire = self.link.register(_ACQUIRE)
        self._failure = self.link.register(_FAILURE)
        self._success = self.link.register(_SUCCESS)
        self._read = self.link.register(_READ)

    def keys(self, name: str) -> list[str]:
        """The Redis keys of breaker ``name``."""
        base = f"{self.prefix}{{{name}}}"
        return [base, f"{base}:probes", f"{base}:window"]

    def bind(
        self, config: CircuitConfig, notify: Notify, clock: Callable[[], float] = time.monotonic
    ) -> CircuitBackend:
        return _RedisCircuit(self, config, notify, clock)


class _RedisCircuit:
    """The backend of one named breaker: Redis first, its own local state during an outage."""

    def __init__(
        self,
        storage: RedisCircuitStorage,
        config: CircuitConfig,
        notify: Notify,
        clock: Callable[[], float],
    ) -> None:
        self.storage = storage
        self.link = storage.link
        self.config = config
        self.keys = storage.keys(config.name)
        self.local = LocalCircuit(config, notify, clock)
        self._notify = notify
        self._tokens = itertools.count()
        self._token_prefix = f"{os.getpid()}:{id(self):x}:"
        rate = config.failure_rate_threshold
        self._width = config.window / WINDOW_BUCKETS if rate is not None else 0.0
        self._rate = rate or 0.0

    def acquire(self) -> Admission:
        if not self.link.up:
            return self._acquire_without_redis()
        token = self._token_prefix + str(next(self._tokens))
        config = self.config
        try:
            reply = self.storage._acquire(
                keys=self.keys,
                args=[
                    config.recovery_timeout,
                    config.half_open_max_calls,
                    config.probe_timeout,
                    token,
                    self._width,
                    WINDOW_BUCKETS,
                ],
            )
        except self.link.errors as exc:
            self.link.failed(exc)
            return self._acquire_without_redis()
        self.link.succeeded()
        verdict, state, left, changed_from, streak = (text(v) for v in reply)
        self._announce(changed_from, state)
        if verdict == "reject":
            detail = f"{streak} probe call(s) in flight" if state == "half_open" else ""
            raise CircuitBreakerError(config.name, state, float(left), detail)
        return Admission(probe=verdict == "probe", token=token, local=False, streak=int(streak))

    def on_success(self, admission: Admission) -> None:
        if admission.local:
            self.local.on_success(admission)
        elif admission.probe or admission.streak:
            self._report(
                self.storage._success,
                [self.config.success_threshold, admission.token, int(admission.probe)],
                lambda: self.local.on_success(Admission(probe=False)),
            )

    def on_failure(self, admission: Admission) -> None:
        if admission.local:
            self.local.on_failure(admission)
            return
        config = self.config
        self._report(
            self.storage._failure,
            [
                config.failure_threshold,
                config.recovery_timeout,
                admission.token,
                int(admission.probe),
                self._width,
                WINDOW_BUCKETS,
                self._rate,
                config.minimum_calls,
            ],
            lambda: self.local.on_failure(Admission(probe=False)),
        )

    def on_ignored(self, admission: Admission) -> None:
        if admission.local:
            self.local.on_ignored(admission)
        elif admission.probe:
            try:
                self.link.client.zrem(self.keys[1], admission.token)
            except self.link.errors as exc:
                self.link.failed(exc)  # the lease expires by itself after probe_timeout

    def current(self) -> tuple[CircuitState, float]:
        if self.link.up:
            try:
                state, left, _ = (text(v) for v in self.storage._read(keys=self.keys))
            except self.link.errors as exc:
                self.link.failed(exc)
            else:
                self.link.succeeded()
                return CircuitState(state), float(left)
        return self.local.current()

    def failure_count(self) -> int:
        if self.link.up:
            try:
                return int(text(self.storage._read(keys=self.keys)[2]))
            except self.link.errors as exc:
                self.link.failed(exc)
        return self.local.failure_count()

    def reset(self) -> None:
        self.local.reset()
        old, _ = self.current()
        self.link.client.delete(*self.keys)
        if old is not CircuitState.CLOSED:
            self._notify(old, CircuitState.CLOSED)

    def _acquire_without_redis(self) -> Admission:
        if self.link.on_unavailable == "reject":
            raise CircuitStorageUnavailable(
                self.config.name,
                "unavailable",
                self.link.seconds_until_retry(),
                "its shared state in Redis is unreachable",
            )
        return self.local.acquire()

    def _report(
        self, script: Callable[..., object], args: list[object], fallback: Callable[[], None]
    ) -> None:
        if not self.link.up:
            fallback()
            return
        try:
            reply = script(keys=self.keys, args=args)
        except self.link.errors as exc:
            self.link.failed(exc)
            fallback()
            return
        self.link.succeeded()
        state, changed_from = (text(v) for v in reply)  # type: ignore[attr-defined]
        self._announce(changed_from, state)

    def _announce(self, changed_from: str, state: str) -> None:
        if changed_from:
            self._notify(CircuitState(changed_from), CircuitState(state))
