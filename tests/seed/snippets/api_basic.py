"""Copied from the seed (usage-examples.md, "Basic API Call with Retry and Timeout"); only import lines changed."""

from fastapi import APIRouter, HTTPException
from taskkit.recovery import retry, timeout
import requests

router = APIRouter()

@router.get("/external-data")
@timeout(seconds=30)
@retry(max_attempts=3, delay=1.0, backoff=2.0)
async def fetch_external_data():
    """Fetch data from external API with retry."""
    try:
        response = requests.get(
            "https://api.example.com/data",
            timeout=10
        )
        response.raise_for_status()
        return response.json()
    except requests.RequestException as e:
        raise HTTPException(status_code=503, detail=f"External service unavailable: {e}")
