"""``create_api``: the FastAPI app, its routers, limits and error answers.

Decisions:

- Request bodies larger than ``TASKKIT_API_MAX_BODY_BYTES`` are refused with 413 before the
  endpoint sees them: at once when ``Content-Length`` says so, else (a chunked body) as soon
  as the bytes read pass the limit. The 413 is an ``HTTPException`` raised while the body is
  read, so FastAPI answers it as it is instead of calling it a malformed body (400).
- CORS is off unless ``TASKKIT_API_CORS_ORIGINS`` names origins: then those origins may call
  ``GET`` and ``POST`` with the ``Authorization``, ``Content-Type`` and ``Idempotency-Key``
  headers, without cookies (the token is a header, never a cookie).
- An error no endpoint answered is logged with its traceback and a request id; the client gets
  500 ``internal error, see the service log`` and that request id (also in ``X-Request-ID``),
  never the exception's text, which may hold a path, a query or a URL.
- A request that does not validate is FastAPI's 422 (``detail``: the list of problems), with
  a NaN or an infinity in the echoed input written as a string (JSON has neither).
- ``BrokerUnavailable`` and ``DatabaseUnavailable``, wherever they come from, are 503 with
  their message (it names the service and host, never a password) and ``Retry-After: 5``.
"""

from __future__ import annotations

import functools
import importlib
import logging
import math
import os
import uuid
from typing import Any

from fastapi import FastAPI, HTTPException, Request, status
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from taskkit.api import (
    _breakers,
    _control,
    _dashboard,
    _deadletters,
    _doctor,
    _health,
    _metrics,
    _predict,
    _runs,
)
from taskkit.config import Settings, get_settings
from taskkit.errors import BrokerUnavailable, DatabaseUnavailable

__all__ = ["BodySizeLimit", "create_api"]

logger = logging.getLogger("taskkit.api")

#: Seconds a client is told to wait (``Retry-After``) when the broker or database is down.
RETRY_AFTER_OUTAGE = 5


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
    # /predict first, on the app's own router: a request is matched against the routes in
    # order, router by router, and /predict is the hot path (issue 16's overhead target: after
    # ~20 routes of five routers it paid ~10 us a route, and an included router's ~25 us).
    api.add_api_route(**_predict.ROUTE)
    for module in (_health, _runs, _control, _deadletters, _breakers, _dashboard):
        api.include_router(module.router)
    api.include_router(_metrics.router)
    api.include_router(_doctor.router)
    origins = [o.strip() for o in settings.api_cors_origins.split(",") if o.strip()]
    if origins:
        api.add_middleware(
            CORSMiddleware,
            allow_origins=origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "Idempotency-Key"],
            allow_credentials=False,
        )
    api.add_middleware(BodySizeLimit, limit=settings.api_max_body_bytes)
    api.add_exception_handler(RequestValidationError, _invalid_request)
    api.add_exception_handler(BrokerUnavailable, _service_unavailable)
    api.add_exception_handler(DatabaseUnavailable, _service_unavailable)
    api.add_exception_handler(Exception, _internal_error)
    _document_errors(api)
    return api


class BodySizeLimit:
    """ASGI middleware: 413 for a request body over ``limit`` bytes (declared or streamed).

    Example::

        api.add_middleware(BodySizeLimit, limit=1_000_000)
    """

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            detail = self._too_large() if declared.isdigit() else "Content-Length is not a number"
            code = 413 if declared.isdigit() else 400
            response = JSONResponse({"detail": detail}, status_code=code)
            await response(scope, receive, send)
            return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise HTTPException(413, self._too_large())
            return message

        await self.app(scope, limited, send)

    def _too_large(self) -> str:
        return f"request body too large: at most {self.limit} bytes (TASKKIT_API_MAX_BODY_BYTES)"


async def _invalid_request(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    # FastAPI's own answer echoes the input, and NaN or an infinity there cannot be encoded
    # as JSON: that 422 became a 500.
    errors = jsonable_encoder(_finite(exc.errors()))
    return JSONResponse({"detail": errors}, status_code=status.HTTP_422_UNPROCESSABLE_CONTENT)


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    return value


async def _service_unavailable(request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse(
        {"detail": str(exc)},
        status_code=status.HTTP_503_SERVICE_UNAVAILABLE,
        headers={"Retry-After": str(RETRY_AFTER_OUTAGE)},
    )


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    request_id = uuid.uuid4().hex[:16]
    logger.error(
        "taskkit api: %s %s failed (request %s)",
        request.method,
        request.url.path,
        request_id,
        exc_info=exc,
    )
    return JSONResponse(
        {"detail": "internal error, see the service log", "request_id": request_id},
        status_code=status.HTTP_500_INTERNAL_SERVER_ERROR,
        headers={"X-Request-ID": request_id},
    )


def _document_errors(api: Any) -> None:
    """Document every 4xx answer as what it is: ``{"detail": "<one line>"}`` from an
    ``HTTPException``, or, for a request FastAPI itself refuses, its list of validation errors.
    (FastAPI documents every 422 as the list only, and a route's own 4xx model as the line only;
    schemathesis holds the answers to the schema.)"""
    build = api.openapi

    def openapi() -> dict[str, Any]:
        if api.openapi_schema is None:
            spec = build()
            schemas = spec.setdefault("components", {}).setdefault("schemas", {})
            listed = {"$ref": "#/components/schemas/ValidationError"}
            schemas["ErrorAnswer"] = {
                "title": "ErrorAnswer",
                "type": "object",
                "properties": {
                    "detail": {
                        "anyOf": [
                            {"type": "string"},
                            {
                                "type": "array",
                                "items": listed if "ValidationError" in schemas else {},
                            },
                        ],
                    },
                },
                "required": ["detail"],
            }
            for path_item in spec.get("paths", {}).values():
                for operation in path_item.values():
                    for code, answer in operation.get("responses", {}).items():
                        if str(code).startswith("4"):
                            answer["content"] = {
                                "application/json": {
                                    "schema": {"$ref": "#/components/schemas/ErrorAnswer"}
                                }
                            }
        return api.openapi_schema  # type: ignore[no-any-return]

    api.openapi = openapi


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
