"""What every endpoint module shares: the settings, the Celery app and database sessions of the
service (kept on ``app.state`` by ``create_api``), as FastAPI dependencies."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from fastapi import Request
from sqlalchemy.orm import Session

from taskkit.config import Settings
from taskkit.db.session import session_scope

__all__ = ["celery_app", "read_session", "service_settings", "write_session"]


def service_settings(request: Request) -> Settings:
    """The ``Settings`` the service was created with."""
    settings: Settings = request.app.state.settings
    return settings


def celery_app(request: Request) -> Any:
    """The Celery app tasks are sent with (``create_api(celery_app=...)`` or ``TASKKIT_APP``)."""
    return request.app.state.celery_app()


def read_session(request: Request) -> Iterator[Session]:
    """A read-only session (never waits for, nor blocks, a SQLite writer)."""
    with session_scope(request.app.state.settings.database_url, readonly=True) as db:
        yield db


def write_session(request: Request) -> Iterator[Session]:
    """A write session: committed when the endpoint returns, rolled back when it raises."""
    with session_scope(request.app.state.settings.database_url) as db:
        yield db
