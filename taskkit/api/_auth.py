"""Bearer-token check for every mutating endpoint (``TASKKIT_API_TOKEN``).

Decided: with no token configured, mutating endpoints answer 401 saying so (reading needs no
token; ``taskkit serve`` only binds a loopback address without one). The comparison is
constant-time (``hmac.compare_digest``) and the token never appears in an answer or a log.
"""

from __future__ import annotations

import hmac

from fastapi import HTTPException, Request, status

__all__ = ["require_token"]


def require_token(request: Request) -> None:
    """FastAPI dependency: 401 unless ``Authorization: Bearer <TASKKIT_API_TOKEN>``."""
    configured = request.app.state.settings.api_token
    challenge = {"WWW-Authenticate": "Bearer"}
    if configured is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "this service has no TASKKIT_API_TOKEN: set one to allow changes",
            headers=challenge,
        )
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    expected = configured.get_secret_value().encode()
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), expected):
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED, "missing or wrong bearer token", headers=challenge
        )
