"""Recovery primitives for any Python code: no Celery, no database.

``retry`` (schedules: ``delays``, ``RetryStrategy``), ``timeout``, ``CircuitBreaker`` (shared
by a fleet with ``RedisCircuitStorage``), ``RetryBudget``/``RedisRetryBudget``, fleet-wide
limits (``FleetRateLimit``, ``FleetConcurrency``), ``fallback``, ``safe_execute``,
``batch_with_retry``, ``parallel_batch_process``, ``TransactionManager`` and ``events``.
Importing this package imports neither Celery nor SQLAlchemy (nor Redis, until a Redis-backed
primitive is created). Behaviour and decisions: ``docs/recovery.md``.

Example::

    from taskkit.recovery import CircuitBreaker, retry, timeout

    breaker = CircuitBreaker(failure_threshold=5, recovery_timeout=60, name="ml-api")

    @timeout(seconds=30)
    @retry(max_attempts=3, delay=1.0, backoff=2.0)
    @breaker
    def predict(features: list[float]) -> dict: ...
"""

from taskkit.recovery import events
from taskkit.recovery._batch import BatchResult, batch_with_retry
from taskkit.recovery._budget import Budget, RetryBudget
from taskkit.recovery._circuit import CircuitBreaker, CircuitState, CircuitStorage
from taskkit.recovery._fallback import fallback, safe_execute
from taskkit.recovery._fleet import (
    FleetConcurrency,
    FleetDecision,
    FleetRateLimit,
    FleetSlot,
    parse_rate,
)
from taskkit.recovery._parallel import parallel_batch_process
from taskkit.recovery._redis_budget import RedisRetryBudget
from taskkit.recovery._redis_circuit import RedisCircuitStorage
from taskkit.recovery._retry import RetryCallState, Retrying, retry
from taskkit.recovery._schedule import RetryStrategy, delays, next_wait
from taskkit.recovery._timeout import timeout
from taskkit.recovery._transaction import TransactionManager

__all__ = [
    "BatchResult",
    "Budget",
    "CircuitBreaker",
    "CircuitState",
    "CircuitStorage",
    "FleetConcurrency",
    "FleetDecision",
    "FleetRateLimit",
    "FleetSlot",
    "RedisCircuitStorage",
    "RedisRetryBudget",
    "RetryBudget",
    "RetryCallState",
    "RetryStrategy",
    "Retrying",
    "TransactionManager",
    "batch_with_retry",
    "delays",
    "events",
    "fallback",
    "next_wait",
    "parallel_batch_process",
    "parse_rate",
    "retry",
    "safe_execute",
    "timeout",
]
