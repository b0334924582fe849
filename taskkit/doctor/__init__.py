"""``taskkit doctor``: checks of a deployment, each with a verdict, the reason and the fix."""

from __future__ import annotations

__all__: list[str] = []
