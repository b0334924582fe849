"""The dead letters: GET /dead-letters, replay, discard."""

from __future__ import annotations

from fastapi import APIRouter

__all__ = ["router"]

router = APIRouter()
