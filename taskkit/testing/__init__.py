"""Make taskkit fast in *your* test suite: no real waits, fewer attempts.

While test mode is on, every wait of ``retry`` and ``batch_with_retry`` is zero (``sleep`` is
not called at all) and, if ``max_attempts`` is given, attempts are capped at it. The code under
test still retries, so its retry paths still run, just without waiting.

Three ways to turn it on::

    from taskkit.testing import no_waits

    def test_flaky_download():
        with no_waits(max_attempts=2):
            assert download("x") == b"..."

    # or the pytest fixture, registered automatically when taskkit is installed:
    def test_flaky_upload(taskkit_no_waits):
        ...

    # or for a whole session, e.g. in conftest.py:
    set_testing(True)

Decision: the switch is process-wide (like ``stamina.set_testing``), not per thread, so code
under test that retries in worker threads is covered too.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from taskkit._utils import TEST_MODE
from taskkit.errors import ConfigurationError

__all__ = ["is_testing", "no_waits", "set_testing", "taskkit_no_waits"]


def set_testing(on: bool, *, max_attempts: int | None = None) -> None:
    """Turn test mode on or off for the whole process."""
    if max_attempts is not None and (not isinstance(max_attempts, int) or max_attempts < 1):
        raise ConfigurationError(f"max_attempts must be an integer >= 1, got {max_attempts!r}")
    TEST_MODE.active = bool(on)
    TEST_MODE.max_attempts = max_attempts if on else None


def is_testing() -> bool:
    """Whether test mode is on."""
    return TEST_MODE.active


@contextmanager
def no_waits(*, max_attempts: int | None = None) -> Iterator[None]:
    """Test mode for the ``with`` block; the previous mode is restored after it."""
    previous = (TEST_MODE.active, TEST_MODE.max_attempts)
    set_testing(True, max_attempts=max_attempts)
    try:
        yield
    finally:
        TEST_MODE.active, TEST_MODE.max_attempts = previous


try:
    import pytest
except ImportError:  # pragma: no cover - pytest is only needed for the fixture

    def taskkit_no_waits() -> None:
        raise RuntimeError("taskkit_no_waits is a pytest fixture; install pytest to use it")

else:

    @pytest.fixture
    def taskkit_no_waits() -> Iterator[None]:
        """Pytest fixture: test mode on for one test (no attempt cap)."""
        with no_waits():
            yield
