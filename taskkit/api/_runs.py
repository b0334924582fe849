"""The runs: POST /train, GET /models/{id}, GET /runs, GET /runs/{id}, GET /runs/{id}/events."""

from __future__ import annotations

from fastapi import APIRouter

__all__ = ["router"]

router = APIRouter()
