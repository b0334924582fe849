"""``RedisRetryBudget``: one retry budget for a fleet of processes."""

from __future__ import annotations

from typing import TYPE_CHECKING

from taskkit.recovery._budget import RetryBudget, check_budget_options
from taskkit.recovery._redis_link import RedisLink, text

if TYPE_CHECKING:
    from redis import Redis

__all__ = ["RedisRetryBudget"]

# KEYS[1]: the bucket hash. ARGV: tokens deposited, tokens per second, max tokens,
# spend one (1/0), key TTL in seconds. Reply: spent (1/0), tokens left.
_REFILL_AND_SPEND = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local cap = tonumber(ARGV[3])
local v = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(v[1]) or cap
local ts = tonumber(v[2]) or now
tokens = math.min(cap, tokens + tonumber(ARGV[1]) + math.max(0, now - ts) * tonumber(ARGV[2]))
local spent = 0
if ARGV[4] == '1' and tokens >= 1 then
  tokens = tokens - 1
  spent = 1
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[5]))
return {spent, tostring(tokens)}
"""


class RedisRetryBudget:
    """A ``RetryBudget`` whose bucket lives in Redis, shared by every process that names it.

    Same rules as ``RetryBudget`` (each call deposits ``ratio`` tokens, each retry spends one,
    ``min_per_second`` trickles in, at most ``max_tokens``), refilled by Redis server time in
    one atomic script.

    Decision: calls are counted locally and deposited in one write with the next retry, or
    every ``flush_every`` calls, so the happy path does not pay a round trip per call. Calls not
    yet deposited cannot pay for retries elsewhere, which only makes the fleet stricter. When
    Redis is unreachable the process falls back to a local budget with the same settings (one
    warning per outage) and tries Redis again after ``retry_interval`` seconds.

    Example::

        budget = RedisRetryBudget("redis://127.0.0.1:6379/0", name="geocoder", ratio=0.1)

        @retry(max_attempts=5, delay=0.2, budget=budget)
        def geocode(address: str) -> tuple[float, float]: ...
    """

    def __init__(
        self,
        client: Redis | str,
        name: str,
        ratio: float = 0.2,
        min_per_second: float = 1.0,
        max_tokens: float = 10.0,
        *,
        prefix: str = "taskkit:budget:",
        flush_every: int = 100,
        retry_interval: float = 5.0,
        ttl: int = 86_400,
    ) -> None:
        check_budget_options(ratio, min_per_second, max_tokens)
        self.link = RedisLink(client, what=f"retry budget {name!r}", retry_interval=retry_interval)
        self.name = name
        self.key = f"{prefix}{{{name}}}"
        self.ratio = ratio
        self.min_per_second = min_per_second
        self.max_tokens = max_tokens
        self.flush_every = max(1, flush_every)
        self.ttl = ttl
        self.local = RetryBudget(ratio, min_per_second, max_tokens)
        self._script = self.link.register(_REFILL_AND_SPEND)
        self._unsent = 0
        self._last_seen = float(max_tokens)

    def record_call(self) -> None:
        self._unsent += 1
        if self._unsent >= self.flush_every:
            self._exchange(spend=False)

    def try_spend(self) -> bool:
        return self._exchange(spend=True)

    @property
    def available(self) -> float:
        """Tokens in the shared bucket now (after depositing this process's calls)."""
        self._exchange(spend=False)
        return self._last_seen

    def _exchange(self, *, spend: bool) -> bool:
        calls, self._unsent = self._unsent, 0
        if self.link.up:
            try:
                spent, tokens = self._script(
                    keys=[self.key],
                    args=[
                        calls * self.ratio,
                        self.min_per_second,
                        self.max_tokens,
                        int(spend),
                        self.ttl,
                    ],
                )
            except self.link.errors as exc:
                self.link.failed(exc)
            else:
                self.link.succeeded()
                self._last_seen = float(text(tokens))
                return int(spent) == 1
        self.local.record_calls(calls)
        spent_locally = self.local.try_spend() if spend else False
        self._last_seen = self.local.available
        return spent_locally
