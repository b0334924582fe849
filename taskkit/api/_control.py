"""The steering runs: POST /runs/{id}/resume, /stop, /fork."""

from __future__ import annotations

from fastapi import APIRouter

__all__ = ["router"]

router = APIRouter()
