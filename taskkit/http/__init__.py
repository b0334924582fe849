"""``taskkit.http``: a resilient HTTP client on httpx (extra ``taskkit[api]``).

``ResilientClient`` (and ``AsyncResilientClient`` for asyncio) is the seed's
``ExternalAPIClient`` as a product: a timeout on every call, retries of idempotent requests
that honour ``Retry-After``, one circuit breaker per host (shared through Redis when
``redis_url`` is given), a retry budget, and a ``probe`` that closes an open breaker as soon
as the host answers its health check. ``breakers()`` lists the per-host breakers of this
process. Built on ``taskkit.recovery`` (``retry``, ``CircuitBreaker``, ``RetryBudget``).

Example::

    from taskkit.http import ResilientClient

    client = ResilientClient("https://api.example.com", timeout=5.0)
    data = client.get("/users")                            # through the breaker
    critical = client.get("/critical", use_circuit=False)  # bypasses it
"""

from __future__ import annotations

try:
    import httpx  # noqa: F401 - checked here, so the missing extra is named
except ImportError as exc:
    raise ImportError(
        "taskkit.http needs httpx, which comes with the extra: pip install 'taskkit[api]'"
    ) from exc

from taskkit.http._client import AsyncResilientClient, ResilientClient
from taskkit.http._core import breakers

__all__ = ["AsyncResilientClient", "ResilientClient", "breakers"]
