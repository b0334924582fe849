"""The POST /predict through the resilient client with a local fallback."""

from __future__ import annotations

from fastapi import APIRouter

__all__ = ["router"]

router = APIRouter()
