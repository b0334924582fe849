"""Health for a load balancer: GET /health, /health/live, /health/ready.

Decisions:

- ``/health`` is the seed's: ``{"status", "circuits": {name: state}}`` with the state names as
  the seed prints them (``CLOSED``, ``OPEN``, ``HALF_OPEN``), for every breaker ``/breakers``
  lists. ``status`` is ``healthy``, or ``degraded`` while a breaker is not closed (``/predict``
  still answers, from the local model); always 200: it is a report, not a probe.
- ``/health/live``: 200 whenever the process answers (restart it when this fails).
- ``/health/ready``: 200 only when the database answers and is migrated to this taskkit's head
  (``taskkit db upgrade`` otherwise), the broker (and a Redis result backend) answers
  (``taskkit.tasks.check_reachable``, about a second at most), and the lease store answers
  (Redis ``PING``, or a lock-file folder that exists and is writable); else 503 naming each
  failed check (take it out of rotation). Nothing is written; every detail is masked.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel

from taskkit._utils import mask_password
from taskkit.api._breakers import known_breakers

__all__ = ["Check", "Health", "Live", "Ready", "router"]

router = APIRouter(tags=["health"])

#: Seconds the lease store's Redis has to answer.
PROBE_TIMEOUT = 1.0


class Health(BaseModel):
    """The seed's health answer."""

    status: Literal["healthy", "degraded"]
    circuits: dict[str, str]


class Live(BaseModel):
    status: Literal["alive"]


class Check(BaseModel):
    """One readiness check."""

    ok: bool
    detail: str


class Ready(BaseModel):
    """Readiness: every check, and whether all passed."""

    status: Literal["ready", "not ready"]
    checks: dict[str, Check]


@router.get("/health", response_model=Health)
def health_check(request: Request) -> Health:
    """Health check endpoint: status and every named circuit breaker's state."""
    circuits = {name: b.state.name for name, b in known_breakers(request.app).items()}
    degraded = any(state != "CLOSED" for state in circuits.values())
    return Health(status="degraded" if degraded else "healthy", circuits=circuits)


@router.get("/health/live", response_model=Live)
def live() -> Live:
    """The process is up."""
    return Live(status="alive")


@router.get(
    "/health/ready",
    response_model=Ready,
    responses={503: {"model": Ready, "description": "A check failed"}},
)
def ready(request: Request, response: Response) -> Ready:
    """Database reachable and migrated, broker reachable, lease store reachable: 200, else 503."""
    settings = request.app.state.settings
    checks = {
        "database": _check(_database, settings.database_url),
        "broker": _check(_broker, request.app),
        "lease_store": _check(_lease_store, settings.lease_url),
    }
    ok = all(check.ok for check in checks.values())
    if not ok:
        response.status_code = 503
    return Ready(status="ready" if ok else "not ready", checks=checks)


def _check(probe: Any, target: Any) -> Check:
    try:
        return Check(ok=True, detail=probe(target))
    except _NotReady as exc:
        return Check(ok=False, detail=str(exc))
    except Exception as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        return Check(ok=False, detail=mask_password(reason))


class _NotReady(Exception):
    pass


def _database(url: str) -> str:
    from taskkit.db.migrate import schema_status  # noqa: PLC0415 - Alembic: only when asked

    status = schema_status(url)
    if not status.known:
        raise _NotReady(
            f"{status.database} is at revision {status.revision}, which this taskkit does not "
            "know (a newer taskkit migrated it)"
        )
    if status.revision != status.head:
        raise _NotReady(
            f"{status.database} is at revision {status.revision or 'none'}, not {status.head}: "
            "run `taskkit db upgrade`"
        )
    return f"{status.database} at revision {status.revision} (head)"


def _broker(app: Any) -> str:
    from taskkit.tasks import check_reachable  # noqa: PLC0415 - Celery: only when asked

    celery_app = app.state.celery_app()
    check_reachable(celery_app)
    return f"{mask_password(str(celery_app.conf.broker_url))} answers"


def _lease_store(url: str) -> str:
    scheme = url.split("://", 1)[0]
    if scheme in {"redis", "rediss", "redis+socket"}:
        import redis  # noqa: PLC0415

        client = redis.Redis.from_url(
            url, socket_timeout=PROBE_TIMEOUT, socket_connect_timeout=PROBE_TIMEOUT
        )
        try:
            client.ping()
        finally:
            client.close()
        return f"{mask_password(url)} answers"
    if scheme == "file":
        folder = Path(unquote(urlsplit(url).path))
        existing = folder if folder.exists() else folder.parent
        if not existing.is_dir() or not os.access(existing, os.W_OK):
            raise _NotReady(f"lease folder {folder} is not a writable folder")
        return f"lease folder {folder} is writable"
    raise _NotReady(f"lease store {mask_password(url)}: unsupported scheme {scheme!r}")
