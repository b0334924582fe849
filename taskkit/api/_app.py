"""``create_api``: the FastAPI app, its routers, limits and error answers."""

from __future__ import annotations

import functools
import importlib
import os
from typing import Any

from fastapi import FastAPI

from taskkit.api import (
    _breakers,
    _control,
    _dashboard,
    _deadletters,
    _health,
    _predict,
    _runs,
)
from taskkit.config import Settings, get_settings

__all__ = ["create_api"]


def create_api(settings: Settings | None = None, celery_app: Any = None) -> Any:
    """The service: JSON endpoints, the dashboard at ``/``, OpenAPI at ``/openapi.json``.

    ``celery_app`` is the app tasks are sent with; None loads ``TASKKIT_APP`` (default
    ``workers.app``) on first use, so the service starts even while it cannot be imported.

    Example::

        from taskkit.api import create_api

        api = create_api()
    """
    settings = settings or get_settings()
    api = FastAPI(title="taskkit", version=_version())
    api.state.settings = settings
    api.state.celery_app = functools.cache(lambda: celery_app or _load_celery_app(settings))
    for module in (_health, _runs, _control, _deadletters, _breakers, _predict, _dashboard):
        api.include_router(module.router)
    return api


def _load_celery_app(settings: Settings) -> Any:
    # `taskkit serve --app` passes the app it loaded; this is for create_api() alone.
    spec = os.environ.get("TASKKIT_APP") or "workers.app"
    module_name, _, attr = spec.partition(":")
    module = importlib.import_module(module_name)
    app = getattr(module, attr) if attr else getattr(module, "app", None) or module.celery_app
    app.loader.import_default_modules()
    return app


def _version() -> str:
    from taskkit import __version__  # noqa: PLC0415

    return __version__
