"""``taskkit.http``: a resilient HTTP client on httpx (extra ``taskkit[api]``)."""

from __future__ import annotations

__all__: list[str] = []
