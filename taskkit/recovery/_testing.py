"""The process-wide test switch that ``taskkit.testing`` flips.

It lives in the core so that ``retry`` and ``batch_with_retry`` can read it without importing
anything else. It is read only after a failure, never on the happy path.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["TEST_MODE", "TestMode"]


@dataclass
class TestMode:
    """When ``active``: every wait is zero, and attempts are capped at ``max_attempts``."""

    __test__ = False  # not a pytest test class

    active: bool = False
    max_attempts: int | None = None

    def cap(self, attempts: int) -> int:
        if self.active and self.max_attempts is not None:
            return min(attempts, self.max_attempts)
        return attempts


TEST_MODE = TestMode()
