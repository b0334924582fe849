"""``GET /doctor``: the report of ``taskkit doctor`` (``taskkit.doctor.diagnose``), as JSON.

Decisions:

- Always 200 with the overall ``verdict`` (``ok``, ``warning``, ``error``) and every check: a
  report, not a probe (``/health/ready`` is the probe).
- It shows the configuration (masked: no key, token or URL password is ever in it), so when
  ``TASKKIT_API_TOKEN`` is set it needs ``Authorization: Bearer <token>`` (401 otherwise);
  without a token configured the service only listens on loopback and it answers anyone there.
- The checks run on the service's own settings and Celery app (``taskkit serve --app``), each
  bounded to a few seconds, in FastAPI's thread pool.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel

from taskkit.api._auth import require_token

__all__ = ["DoctorCheck", "DoctorReport", "router", "token_when_configured"]

router = APIRouter(tags=["doctor"])


def token_when_configured(request: Request) -> None:
    """FastAPI dependency: ``require_token`` when the service has a ``TASKKIT_API_TOKEN``."""
    if request.app.state.settings.api_token is not None:
        require_token(request)


class DoctorCheck(BaseModel):
    """One check: its verdict, what it saw, what to do, and what it looked at."""

    name: str
    verdict: Literal["ok", "warning", "error"]
    reason: str
    fix: str | None
    details: dict[str, Any]


class DoctorReport(BaseModel):
    """Every check of ``taskkit doctor`` and the overall verdict (and its exit code)."""

    verdict: Literal["ok", "warning", "error"]
    exit_code: int
    checks: list[DoctorCheck]


@router.get(
    "/doctor",
    response_model=DoctorReport,
    dependencies=[Depends(token_when_configured)],
    responses={401: {"description": "TASKKIT_API_TOKEN is set and the request lacks it"}},
)
def doctor(request: Request) -> DoctorReport:
    """The deployment's checks (``taskkit doctor --json``): services, app, settings, keys."""
    from taskkit.doctor import diagnose  # noqa: PLC0415 - only when asked

    report = diagnose(request.app.state.settings, app=request.app.state.celery_app)
    return DoctorReport.model_validate(report.to_dict())
