"""``ResilientClient`` and ``AsyncResilientClient``: httpx clients with timeouts, retries that
honour ``Retry-After``, a circuit breaker per host and a retry budget."""

from __future__ import annotations

import time
from collections.abc import Callable, Coroutine, Iterable, Mapping
from types import TracebackType
from typing import Any, Self

import httpx

from taskkit._utils import check_int, check_seconds, mask_password
from taskkit.errors import ConfigurationError
from taskkit.http._core import (
    COUNTED,
    IDEMPOTENT_METHODS,
    RETRIED,
    host_name,
    host_policy,
    is_retryable_status,
    name_target,
    retry_after,
    retryable,
    safe_url,
    status_error,
)
from taskkit.recovery import Budget, CircuitBreaker, CircuitState, Retrying

__all__ = ["AsyncResilientClient", "ResilientClient"]


class _Policy:
    """What both clients decide at construction: URL, credentials, breaker, budget, retries."""

    def __init__(
        self,
        base_url: str,
        *,
        timeout: float,
        max_attempts: int,
        retry_methods: Iterable[str],
        breaker: CircuitBreaker | None,
        budget: Budget | None,
        redis_url: str | None,
        redis_prefix: str,
        headers: Mapping[str, str] | None,
        failure_threshold: int,
        recovery_timeout: float,
        delay: float,
        backoff: float,
        max_delay: float,
        probe_timeout: float,
        clock: Callable[[], float],
    ) -> None:
        if not isinstance(base_url, str | httpx.URL):
            raise ConfigurationError(f"base_url must be an http(s) URL, got {base_url!r}")
        url = httpx.URL(str(base_url))
        if url.scheme not in ("http", "https") or not url.host:
            raise ConfigurationError(
                f"base_url must be an http:// or https:// URL with a host, "
                f"got {mask_password(str(base_url))!r}"
            )
        check_seconds("timeout", timeout)
        check_seconds("probe_timeout", probe_timeout)
        check_int("max_attempts", max_attempts, 1)
        if isinstance(retry_methods, str):
            raise ConfigurationError(
                f"retry_methods must be a collection of method names, got the string "
                f"{retry_methods!r}"
            )
        self.retry_methods = frozenset(str(m).upper() for m in retry_methods)
        header_map = dict(headers or {})
        # Credentials in the URL become Basic auth (unless an Authorization header is given),
        # so no request URL, nor any message built from one, holds them.
        self.auth: httpx.Auth | None = None
        if url.username or url.password:
            if not any(k.lower() == "authorization" for k in header_map):
                self.auth = httpx.BasicAuth(url.username, url.password or "")
            url = url.copy_with(username=None, password=None)
        self.base_url = url
        self.headers = header_map
        self.timeout = float(timeout)
        self.probe_timeout = float(probe_timeout)
        self.host = host_name(url)
        if breaker is None or budget is None:
            shared = host_policy(
                self.host,
                failure_threshold=failure_threshold,
                recovery_timeout=recovery_timeout,
                redis_url=redis_url,
                redis_prefix=redis_prefix,
                clock=clock,
            )
            breaker = shared.breaker if breaker is None else breaker
            budget = shared.budget if budget is None else budget
        if not isinstance(breaker, CircuitBreaker):
            raise ConfigurationError(f"breaker must be a CircuitBreaker, got {breaker!r}")
        #: The circuit breaker of this client's host (by default ``http:<host>``, shared by
        #: every client of this process, and of the fleet when ``redis_url`` is given).
        self.breaker: CircuitBreaker = breaker
        #: The retry budget of this client's host.
        self.budget: Budget = budget
        self.max_attempts = max_attempts
        self.delay, self.backoff, self.max_delay = delay, backoff, max_delay

    def retry_if(self, error: BaseException) -> bool:
        return retryable(error, self.retry_methods)

    def retrying(
        self, sleep: Callable[[float], object] | None, clock: Callable[[], float]
    ) -> Retrying:
        return Retrying(
            max_attempts=self.max_attempts,
            delay=self.delay,
            backoff=self.backoff,
            max_delay=self.max_delay,
            jitter=True,
            exceptions=COUNTED,
            retry_if=self.retry_if,
            budget=self.budget,
            sleep=sleep,
            clock=clock,
            _stacklevel=4,
        )

    def check_answer(self, response: httpx.Response) -> httpx.Response:
        """Raise for an error status (retries already done), else return the response."""
        if response.status_code >= 400:
            raise status_error(response, retry_after(response))
        return response

    def describe(self, cls: str) -> str:
        return f"{cls}({safe_url(self.base_url)!r}, breaker={self.breaker.name!r})"


class ResilientClient:
    """An HTTP client for a dependency that fails: timeouts, retries, a breaker per host.

    ``get``/``post`` are the seed's ``ExternalAPIClient`` (parsed JSON back, ``use_circuit``)
    and ``probe`` its ``ExternalMLService.health_check``; ``request`` returns the
    ``httpx.Response``. One ``httpx.Client`` (connection pool) serves every call: create the
    client once and reuse it, and ``close()`` it (or use ``with``).

    Options (keyword-only):

    - ``timeout=10.0``: seconds for each of connect, read, write and pool wait (httpx's
      ``Timeout``); ``probe_timeout=5.0`` for ``probe``.
    - ``max_attempts=3``, ``delay=0.5``, ``backoff=2.0``, ``max_delay=30.0``: the retry
      schedule (exponential with full jitter, as ``taskkit.recovery.retry``).
    - ``retry_methods``: methods retried after a timeout, a dropped connection, a 5xx (but 501)
      or a 429; default the idempotent ones (GET, HEAD, OPTIONS, PUT, DELETE).
    - ``breaker=None``: a ``CircuitBreaker`` of your own; by default the host's breaker
      ``http:<host[:port]>`` with ``failure_threshold=5`` and ``recovery_timeout=60`` (the
      seed's values), one per host and settings for the whole process (``breakers()`` lists
      them), kept in Redis when ``redis_url`` is given (``RedisCircuitStorage``; keys under
      ``redis_prefix + "circuit:"``).
    - ``budget=None``: a ``Budget`` of your own; by default the host's ``RetryBudget`` (a
      ``RedisRetryBudget`` under ``redis_prefix + "budget:"`` with ``redis_url``), so retries
      add at most about 20% to the load on a failing host.
    - ``headers``, ``transport`` (e.g. ``httpx.MockTransport``): passed to httpx.
    - ``sleep``, ``clock``: injectable, for tests (``clock`` drives the breaker and budget).

    Decisions:

    - Retries: a non-idempotent method (POST, PATCH) is retried only when its request carries
      an ``Idempotency-Key`` header (the server then deduplicates) or the method is in
      ``retry_methods``, or when the request provably never left (connect error, connect or
      pool timeout). Other 4xx answers are never retried.
    - ``Retry-After`` (seconds or an HTTP date, measured from the answer's ``Date``) sets the
      wait when it is longer than the backoff. One longer than ``max_delay`` is not waited
      for: the call gives up at once and the error's ``retry_after`` says when to come back
      (a Celery task can hand it to ``self.retry(countdown=...)``).
    - The breaker wraps the whole retried call, as in the seed's ``ExternalAPIClient``: one
      call that fails after its retries is one failure. It counts timeouts, connection
      failures, 5xx and 429 answers; a 4xx answer is the caller's fault and counts as a
      success (the host answered). A call refused by an open breaker raises
      ``taskkit.errors.CircuitBreakerError`` without touching the network.
    - Errors: once retries are exhausted the last httpx error itself propagates (no wrapper):
      ``httpx.HTTPStatusError`` for an error answer (every status >= 400, so ``get`` never
      parses an error page as data), an ``httpx.TransportError`` otherwise, with the note and
      ``taskkit_attempts`` attribute ``retry`` adds. Messages name the method and
      ``scheme://host:port/path``, never the query string, the URL's password or credential
      headers. A password in ``base_url`` is sent as Basic auth.

    Example::

        with ResilientClient("https://ml-api.example.com", timeout=5.0) as client:
            users = client.get("/users")
            created = client.post("/predict", {"features": [1.0, 2.0]},
                                  headers={"Idempotency-Key": "req-42"})
            if client.breaker.state is CircuitState.OPEN and client.probe("/health"):
                ...  # healthy again: the probe closed the breaker
    """

    def __init__(
        self,
        base_url: str,
        *,
        timeout: float = 10.0,
        max_attempts: int = 3,
        retry_methods: Iterable[str] = IDEMPOTENT_METHODS,
        breaker: CircuitBreaker | None = None,
        budget: Budget | None = None,
        redis_url: str | None = None,
        redis_prefix: str = "taskkit:",
        headers: Mapping[str, str] | None = None,
        failure_threshold: int = 5,
        recovery_timeout: float = 60.0,
        delay: float = 0.5,
        backoff: float = 2.0,
        max_delay: float = 30.0,
        probe_timeout: float = 5.0,
        sleep: Callable[[float], object] | None = None,
        clock: Callable[[], float] = time.monotonic,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._policy = policy = _Policy(
            base_url,
            timeout=timeout,
            max_attempts=max_attempts,
            retry_methods=retry_methods,
            breaker=breaker,
            budget=budget,
            redis_url=redis_url,
            redis_prefix=redis_prefix,
            headers=headers,
            failure_threshold=failure_threshold,
            recovery_timeout=recovery_timeout,
            delay=delay,
            backoff=backoff,
            max_delay=max_delay,
            probe_timeout=probe_timeout,
            clock=clock,
        )
        self.breaker = policy.breaker
        self.budget = policy.budget
        self._client = httpx.Client(
            base_url=policy.base_url,
            timeout=policy.timeout,
            headers=policy.headers,
            auth=policy.auth,
            transport=transport,
        )
        # Built once: a call allocates no policy, wrapper or breaker.
        self._send: Callable[[str, str, dict[str, Any]], httpx.Response] = policy.retrying(
            sleep, clock
        )(self._attempt)
        self._check = policy.check_answer

    def _attempt(self, method: str, endpoint: str, kwargs: dict[str, Any]) -> httpx.Response:
        try:
            response = self._client.request(method, endpoint, **kwargs)
        except RETRIED as exc:
            name_target(exc)
            raise
        if response.status_code >= 400 and is_retryable_status(response.status_code):
            raise status_error(response, retry_after(response))
        return response

    def request(
        self, method: str, endpoint: str, *, use_circuit: bool = True, **kwargs: Any
    ) -> httpx.Response:
        """Send ``method endpoint`` (relative to ``base_url``) with retries, through the
        breaker unless ``use_circuit=False``; ``kwargs`` go to ``httpx.Client.request``
        (``json=``, ``params=``, ``headers=``, ``timeout=``...). Raises ``HTTPStatusError``
        for any answer >= 400.

        Example::

            response = client.request("PUT", "/models/7", json={"stage": "prod"})
            etag = response.headers["etag"]
        """
        method = method.upper()
        if use_circuit:
            response = self.breaker.call(self._send, method, endpoint, kwargs)
        else:
            response = self._send(method, endpoint, kwargs)
        return self._check(response)

    def get(self, endpoint: str, use_circuit: bool = True, **kwargs: Any) -> Any:
        """GET ``endpoint`` and return its parsed JSON (None for an empty body).

        Example::

            users = client.get("/users")
            critical = client.get("/critical", use_circuit=False)  # bypasses the breaker
        """
        return _json(self.request("GET", endpoint, use_circuit=use_circuit, **kwargs))

    def post(self, endpoint: str, data: Any = None, use_circuit: bool = True, **kwargs: Any) -> Any:
        """POST ``data`` as JSON to ``endpoint`` and return the parsed JSON answer. Retried
        only with an ``Idempotency-Key`` header (or ``"POST"`` in ``retry_methods``).

        Example::

            answer = client.post("/predict", {"features": [0.1, 0.2]})
        """
        return _json(self.request("POST", endpoint, use_circuit=use_circuit, json=data, **kwargs))

    def probe(self, path: str = "/health") -> bool:
        """One GET of ``path`` outside the breaker, no retry: True for a 2xx answer, and then a
        breaker that is not closed is closed at once (``reset``), without waiting for its
        recovery timeout. Any failure is False and changes nothing.

        Example::

            if client.breaker.state is CircuitState.OPEN and not client.probe():
                return local_model_fallback(features)
        """
        try:
            response = self._client.get(path, timeout=self._policy.probe_timeout)
        except httpx.HTTPError:
            return False
        healthy = response.is_success
        if healthy and self.breaker.state is not CircuitState.CLOSED:
            self.breaker.reset()
        return healthy

    def close(self) -> None:
        """Close the connection pool. Example: ``client.close()``."""
        self._client.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return self._policy.describe(type(self).__name__)


class AsyncResilientClient:
    """``ResilientClient`` for asyncio: the same options and behaviour, awaited.

    Waits between retries use ``asyncio.sleep`` (or the injected ``sleep``, which may return
    an awaitable). A breaker kept in Redis is read with the synchronous Redis client (one
    short round trip per call, bounded by a 0.5 s socket timeout).

    Options and decisions: as ``ResilientClient``; ``transport`` is an async one.

    Example::

        async with AsyncResilientClient("https://ml-api.example.com") as client:
            answer = await client.post("/predict", {"features": [1.0, 2.0]})
            healthy = await client.probe()
    """

    def __init__(
        self,
        base_url: str,
        *,
        timeout: float = 10.0,
        max_attempts: int = 3,
        retry_methods: Iterable[str] = IDEMPOTENT_METHODS,
        breaker: CircuitBreaker | None = None,
        budget: Budget | None = None,
        redis_url: str | None = None,
        redis_prefix: str = "taskkit:",
        headers: Mapping[str, str] | None = None,
        failure_threshold: int = 5,
        recovery_timeout: float = 60.0,
        delay: float = 0.5,
        backoff: float = 2.0,
        max_delay: float = 30.0,
        probe_timeout: float = 5.0,
        sleep: Callable[[float], object] | None = None,
        clock: Callable[[], float] = time.monotonic,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._policy = policy = _Policy(
            base_url,
            timeout=timeout,
            max_attempts=max_attempts,
            retry_methods=retry_methods,
            breaker=breaker,
            budget=budget,
            redis_url=redis_url,
            redis_prefix=redis_prefix,
            headers=headers,
            failure_threshold=failure_threshold,
            recovery_timeout=recovery_timeout,
            delay=delay,
            backoff=backoff,
            max_delay=max_delay,
            probe_timeout=probe_timeout,
            clock=clock,
        )
        self.breaker = policy.breaker
        self.budget = policy.budget
        self._client = httpx.AsyncClient(
            base_url=policy.base_url,
            timeout=policy.timeout,
            headers=policy.headers,
            auth=policy.auth,
            transport=transport,
        )
        self._send: Callable[[str, str, dict[str, Any]], Coroutine[Any, Any, httpx.Response]] = (
            policy.retrying(sleep, clock)(self._attempt)
        )
        self._check = policy.check_answer

    async def _attempt(self, method: str, endpoint: str, kwargs: dict[str, Any]) -> httpx.Response:
        try:
            response = await self._client.request(method, endpoint, **kwargs)
        except RETRIED as exc:
            name_target(exc)
            raise
        if response.status_code >= 400 and is_retryable_status(response.status_code):
            raise status_error(response, retry_after(response))
        return response

    async def request(
        self, method: str, endpoint: str, *, use_circuit: bool = True, **kwargs: Any
    ) -> httpx.Response:
        """As ``ResilientClient.request``, awaited.

        Example::

            response = await client.request("DELETE", "/cache/users")
        """
        method = method.upper()
        if use_circuit:
            response = await self.breaker.call_async(self._send, method, endpoint, kwargs)
        else:
            response = await self._send(method, endpoint, kwargs)
        return self._check(response)

    async def get(self, endpoint: str, use_circuit: bool = True, **kwargs: Any) -> Any:
        """As ``ResilientClient.get``, awaited. Example: ``await client.get("/users")``."""
        return _json(await self.request("GET", endpoint, use_circuit=use_circuit, **kwargs))

    async def post(
        self, endpoint: str, data: Any = None, use_circuit: bool = True, **kwargs: Any
    ) -> Any:
        """As ``ResilientClient.post``, awaited.

        Example::

            answer = await client.post("/predict", {"features": [0.1, 0.2]})
        """
        response = await self.request(
            "POST", endpoint, use_circuit=use_circuit, json=data, **kwargs
        )
        return _json(response)

    async def probe(self, path: str = "/health") -> bool:
        """As ``ResilientClient.probe``, awaited. Example: ``healthy = await client.probe()``."""
        try:
            response = await self._client.get(path, timeout=self._policy.probe_timeout)
        except httpx.HTTPError:
            return False
        healthy = response.is_success
        if healthy and self.breaker.state is not CircuitState.CLOSED:
            self.breaker.reset()
        return healthy

    async def close(self) -> None:
        """Close the connection pool. Example: ``await client.close()``."""
        await self._client.aclose()

    #: httpx's name for ``close``.
    aclose = close

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def __repr__(self) -> str:
        return self._policy.describe(type(self).__name__)


def _json(response: httpx.Response) -> Any:
    return response.json() if response.content else None
