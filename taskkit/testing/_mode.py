"""Test mode: every wait of ``retry`` and ``batch_with_retry`` is zero while it is on."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from taskkit._utils import TEST_MODE
from taskkit.errors import ConfigurationError

__all__ = ["is_testing", "no_waits", "set_testing"]


def set_testing(on: bool, *, max_attempts: int | None = None) -> None:
    """Turn test mode on or off for the whole process.

    Example::

        set_testing(True, max_attempts=2)     # e.g. in conftest.py
    """
    if max_attempts is not None and (not isinstance(max_attempts, int) or max_attempts < 1):
        raise ConfigurationError(f"max_attempts must be an integer >= 1, got {max_attempts!r}")
    TEST_MODE.active = bool(on)
    TEST_MODE.max_attempts = max_attempts if on else None


def is_testing() -> bool:
    """Whether test mode is on.

    Example::

        with no_waits():
            assert is_testing()
    """
    return TEST_MODE.active


@contextmanager
def no_waits(*, max_attempts: int | None = None) -> Iterator[None]:
    """Test mode for the ``with`` block; the previous mode is restored after it.

    Example::

        with no_waits(max_attempts=2):
            assert download("x") == b"..."
    """
    previous = (TEST_MODE.active, TEST_MODE.max_attempts)
    set_testing(True, max_attempts=max_attempts)
    try:
        yield
    finally:
        TEST_MODE.active, TEST_MODE.max_attempts = previous
