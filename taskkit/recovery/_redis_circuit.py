"""``RedisCircuitStorage``: one breaker state for every process that names the same breaker."""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from taskkit.errors import CircuitBreakerError, CircuitStorageUnavailable, ConfigurationError
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

#: How old a shared state a process may act on by default, in seconds (``max_staleness``).
DEFAULT_MAX_STALENESS = 0.05

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

# Adds n calls to the window's bucket of now (width 0: no window).
_COUNT_CALLS = """
local function count_calls(now, width, buckets, n)
  if width <= 0 or n <= 0 then return end
  local bucket = math.floor(now / width)
  if redis.call('HINCRBY', KEYS[3], 'c:' .. bucket, n) == n then
    -- first calls of a new bucket: drop the buckets that left the window
    local oldest = bucket - buckets
    for _, field in ipairs(redis.call('HKEYS', KEYS[3])) do
      if tonumber(string.sub(field, 3)) <= oldest then redis.call('HDEL', KEYS[3], field) end
    end
    redis.call('PEXPIRE', KEYS[3], math.ceil(width * buckets * 2000))
  end
end
"""

# The reply of the outcome scripts: state, state changed from ('' if not), seconds left while
# open, failure streak.
_STATE_REPLY = """
local function state_reply(changed)
  local v = redis.call('HMGET', KEYS[1], 'state', 'open_until', 'failures')
  local state = v[1] or 'closed'
  local left = 0
  if state == 'open' then left = tonumber(v[2] or '0') - now end
  return {state, changed, tostring(left), v[3] or '0'}
end
"""

# ARGV: recovery_timeout, half_open_max_calls, probe_timeout, token, bucket_width (0: no
# window), buckets, calls admitted from the process's cache since its last report (counted in
# the window while closed). Reply: verdict, state, seconds left, state changed from ('' if
# not), streak (closed) or probes in flight (half-open).
_ACQUIRE = (
    _NOW
    + _COUNT_CALLS
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
count_calls(now, tonumber(ARGV[5]), tonumber(ARGV[6]), 1 + tonumber(ARGV[7]))
return {'allow', 'closed', '0', changed, redis.call('HGET', KEYS[1], 'failures') or '0'}
"""
)

# ARGV: failure_threshold, recovery_timeout, token, is_probe, bucket_width, buckets,
# failure_rate_threshold (0: none), minimum_calls, calls admitted from the cache since the last
# report. Reply: see _STATE_REPLY.
_FAILURE = (
    _NOW
    + _OPEN
    + _COUNT_CALLS
    + _STATE_REPLY
    + """
local state = redis.call('HGET', KEYS[1], 'state') or 'closed'
local recovery = tonumber(ARGV[2])
if ARGV[4] == '1' then
  redis.call('ZREM', KEYS[2], ARGV[3])
  if state == 'half_open' then
    open_circuit(now, recovery)
    return state_reply('half_open')
  end
  return state_reply('')
end
if state ~= 'closed' then return state_reply('') end
local failures = redis.call('HINCRBY', KEYS[1], 'failures', 1)
local tripped = failures >= tonumber(ARGV[1])
local width = tonumber(ARGV[5])
local rate = tonumber(ARGV[7])
if width > 0 and rate > 0 then
  count_calls(now, width, tonumber(ARGV[6]), tonumber(ARGV[9]))
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
  return state_reply('closed')
end
return state_reply('')
"""
)

# ARGV: success_threshold, token, is_probe. Reply: see _STATE_REPLY.
_SUCCESS = (
    _NOW
    + _STATE_REPLY
    + """
local state = redis.call('HGET', KEYS[1], 'state') or 'closed'
if ARGV[3] == '1' then
  redis.call('ZREM', KEYS[2], ARGV[2])
  if state == 'half_open' then
    if redis.call('HINCRBY', KEYS[1], 'probe_successes', 1) >= tonumber(ARGV[1]) then
      redis.call('HSET', KEYS[1], 'state', 'closed', 'failures', 0, 'probe_successes', 0)
      redis.call('DEL', KEYS[2], KEYS[3])
      return state_reply('half_open')
    end
  end
  return state_reply('')
end
if state == 'closed' then redis.call('HSET', KEYS[1], 'failures', 0) end
return state_reply('')
"""
)

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
    - ``max_staleness`` (default 0.05 s): how old a shared state a process may act on. Each
      reply from Redis tells the process the state; for ``max_staleness`` seconds after it sent
      the request (its breaker's clock) it admits calls through a closed breaker, and rejects
      calls to an open one, without a round trip. A healthy call then costs well under a
      microsecond plus one round trip per ``max_staleness`` per process. Failures are
      reported at once (one round trip each, which also refreshes the state); probes are always
      admitted by Redis, so half-open stays one probe fleet-wide; the failure-rate window's call
      counts travel with the next round trip. ``max_staleness=0`` is the exact mode: one round
      trip per call, every call decided by Redis.
    - Half-open probe slots are leases: a probe that has not reported after ``probe_timeout``
      (its process crashed, say) frees its slot, so the fleet cannot be wedged half-open.
    - Redis unreachable: with ``on_unavailable="local"`` (the default) each process falls
      back to its own local breaker state and logs one warning per outage; with ``"reject"``
      calls fail closed with ``CircuitStorageUnavailable``. Redis is tried again every
      ``retry_interval`` seconds, not on every call. A process notices the outage at its next
      round trip: within ``max_staleness``, or at its next failure.

    Decision: ``max_staleness`` defaults to 0.05 s, not 0. A round trip per call (~100 us on a
    local Redis) costs more than many of the calls a breaker protects and puts every call of
    the fleet on one Redis; 50 ms is far below what a breaker acts on (thresholds of failures,
    recovery timeouts of seconds), failures are not delayed, and probes are still decided in
    Redis. Use 0 when every process must stop within one round trip of the breaker opening.
    The window counts a call when it is admitted and a failure when it is reported, so
    successes need no write; a call still in flight counts as a success.

    Example::

        import redis
        storage = RedisCircuitStorage(redis.Redis.from_url("redis://127.0.0.1:6379/0"))
        breaker = CircuitBreaker(failure_threshold=5, recovery_timeout=30,
                                 name="feature-store", storage=storage)
        exact = RedisCircuitStorage("redis://127.0.0.1:6379/0", max_staleness=0)
    """

    def __init__(
        self,
        client: Redis | str,
        *,
        prefix: str = "taskkit:circuit:",
        on_unavailable: OnUnavailable = "local",
        retry_interval: float = 5.0,
        max_staleness: float = DEFAULT_MAX_STALENESS,
    ) -> None:
        if (
            isinstance(max_staleness, bool)
            or not isinstance(max_staleness, int | float)
            or not max_staleness >= 0
        ):
            raise ConfigurationError(
                f"max_staleness must be a number of seconds >= 0 (0: one round trip per call), "
                f"got {max_staleness!r}"
            )
        self.link = RedisLink(
            client,
            what="circuit breaker state",
            on_unavailable=on_unavailable,
            retry_interval=retry_interval,
        )
        self.prefix = prefix
        #: Seconds a process acts on a state Redis told it, without asking again (0: never).
        self.max_staleness = float(max_staleness)
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


#: The admission of a call through a closed breaker that Redis did not see; never mutated.
CACHED = Admission(probe=False, local=False)

_NEVER = float("-inf")

#: What a process knows of the shared state: (admit calls before this time, reject calls before
#: this time, the rejecting state, the open breaker's deadline, the rejection's detail). Times
#: are the breaker's clock; one tuple, replaced whole, so threads never read half an update.
_Cache = tuple[float, float, str, float, str]
_UNKNOWN: _Cache = (_NEVER, _NEVER, "", 0.0, "")


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
        self._clock = clock
        self._tokens = itertools.count()
        self._token_prefix = f"{os.getpid()}:{id(self):x}:"
        rate = config.failure_rate_threshold
        self._width = config.window / WINDOW_BUCKETS if rate is not None else 0.0
        self._rate = rate or 0.0
        # Never trust a closed state for as long as an open breaker waits: a process that saw
        # it closed just before it opened must have asked again before its first probe.
        self._staleness = min(storage.max_staleness, config.recovery_timeout)
        self._cache: _Cache = _UNKNOWN
        #: The failure streak in the last reply: a success must reset it in Redis.
        self._streak = 0
        #: Calls admitted from the cache that the window in Redis has not counted yet (a race
        #: between threads may lose one: the rate then reads higher, never lower).
        self._pending = 0
        self._pending_since = 0.0

    # -- calls ------------------------------------------------------------------------------

    def acquire(self) -> Admission:
        now = self._clock()
        cache = self._cache
        if now < cache[0]:
            if self._width:
                if not self._pending:
                    self._pending_since = now
                self._pending += 1
            return CACHED
        if now < cache[1]:
            raise CircuitBreakerError(self.config.name, cache[2], cache[3] - now, cache[4])
        return self._acquire_from_redis(now)

    def on_success(self, admission: Admission) -> None:
        if admission.local:
            self.local.on_success(admission)
        elif admission.probe or self._streak:
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
                self._take_pending(self._clock()),
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
                self._lost(exc)  # the lease expires by itself after probe_timeout

    # -- reading ----------------------------------------------------------------------------

    def current(self) -> tuple[CircuitState, float]:
        if self.link.up:
            now = self._clock()
            try:
                state, left, failures = (text(v) for v in self.storage._read(keys=self.keys))
            except self.link.errors as exc:
                self._lost(exc)
            else:
                self.link.succeeded()
                self._learn(now, state, float(left), int(failures))
                return CircuitState(state), float(left)
        return self.local.current()

    def failure_count(self) -> int:
        if self.link.up:
            try:
                return int(text(self.storage._read(keys=self.keys)[2]))
            except self.link.errors as exc:
                self._lost(exc)
        return self.local.failure_count()

    def reset(self) -> None:
        self.local.reset()
        old, _ = self.current()
        self.link.client.delete(*self.keys)
        self._forget()
        self._streak = 0
        if old is not CircuitState.CLOSED:
            self._notify(old, CircuitState.CLOSED)

    # -- Redis ------------------------------------------------------------------------------

    def _acquire_from_redis(self, now: float) -> Admission:
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
                    self._take_pending(now),
                ],
            )
        except self.link.errors as exc:
            self._lost(exc)
            return self._acquire_without_redis()
        self.link.succeeded()
        verdict, state, left, changed_from, count = (text(v) for v in reply)
        self._announce(changed_from, state)
        if verdict == "probe":
            self._forget()  # the next call asks Redis: a probe is in flight
            return Admission(probe=True, token=token, local=False)
        if verdict == "allow":
            self._learn(now, "closed", 0.0, int(count))
            return Admission(probe=False, token=token, local=False, streak=int(count))
        detail = ""
        if state == "half_open":
            # Probe slots taken: turned away without asking again for max_staleness.
            detail = f"{count} probe call(s) in flight"
            self._cache = (_NEVER, now + self._staleness, state, now, detail)
        else:
            self._learn(now, state, float(left), 0)
        raise CircuitBreakerError(config.name, state, float(left), detail)

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
        now = self._clock()
        try:
            reply = script(keys=self.keys, args=args)
        except self.link.errors as exc:
            self._lost(exc)
            fallback()
            return
        self.link.succeeded()
        state, changed_from, left, failures = (text(v) for v in reply)  # type: ignore[attr-defined]
        self._announce(changed_from, state)
        self._learn(now, state, float(left), int(failures))

    def _learn(self, asked: float, state: str, left: float, streak: int) -> None:
        """Remember a state Redis replied with to a request sent at ``asked`` (this clock)."""
        self._streak = streak
        until = asked + self._staleness
        if state == "closed":
            self._cache = (until, _NEVER, "", 0.0, "")
        elif state == "open" and left > 0:
            self._cache = (_NEVER, min(until, asked + left), "open", asked + left, "")
        else:
            self._forget()  # half-open: only Redis admits probes

    def _forget(self) -> None:
        self._cache = _UNKNOWN

    def _take_pending(self, now: float) -> int:
        """The calls to add to the window now; calls older than the window are dropped."""
        pending, self._pending = self._pending, 0
        if pending and now - self._pending_since > self.config.window:
            return 0
        return pending

    def _lost(self, error: BaseException) -> None:
        self._forget()
        self.link.failed(error)

    def _announce(self, changed_from: str, state: str) -> None:
        if changed_from:
            self._notify(CircuitState(changed_from), CircuitState(state))
