"""The circuit breakers: GET /breakers, POST /breakers/{name}/reset."""

from __future__ import annotations

from fastapi import APIRouter

__all__ = ["router"]

router = APIRouter()
