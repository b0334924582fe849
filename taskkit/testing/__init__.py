"""Test *your* tasks and retry code: no real waits, an in-process worker, in-memory fakes.

While test mode is on, every wait of ``retry`` and ``batch_with_retry`` is zero (``sleep`` is
not called at all) and, if ``max_attempts`` is given, attempts are capped at it. The code under
test still retries, so its retry paths still run, just without waiting. Decision: the switch is
process-wide (like ``stamina.set_testing``), not per thread, so code under test that retries in
worker threads is covered too.

The pytest plugin (registered when taskkit is installed; built on pytest-celery's
``celery.contrib.pytest`` fixtures) offers ``taskkit_app``, ``taskkit_worker`` (an in-process
worker on the in-memory broker), ``taskkit_dead_letters``, ``taskkit_checkpoints`` and
``taskkit_progress`` (the fakes of ``taskkit.testing.fakes``, installed for one test) and
``taskkit_no_waits``. ``docs/testing.md`` shows a whole test.

Example::

    from taskkit.testing import no_waits

    def test_flaky_download():
        with no_waits(max_attempts=2):
            assert download("x") == b"..."

    def test_bad_symbol(taskkit_worker, taskkit_dead_letters):
        fetch_price.delay("???")
        (letter,) = taskkit_dead_letters.list(task=fetch_price.name)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from taskkit.testing._mode import is_testing, no_waits, set_testing

if TYPE_CHECKING:
    from taskkit.testing.fakes import (
        FakeDeadLetterStore,
        FakeProgressSink,
        MemoryCheckpointStorage,
        ProgressRecord,
    )

try:
    import pytest  # noqa: F401 - the fixtures need it; taskkit itself does not
except ImportError:  # pragma: no cover - pytest is only needed for the fixtures
    pass
else:
    from taskkit.testing._plugin import (
        celery_config_for_tests,
        taskkit_app,
        taskkit_celery_config,
        taskkit_checkpoints,
        taskkit_dead_letters,
        taskkit_no_waits,
        taskkit_progress,
        taskkit_worker,
    )

__all__ = [
    "FakeDeadLetterStore",
    "FakeProgressSink",
    "MemoryCheckpointStorage",
    "ProgressRecord",
    "celery_config_for_tests",
    "is_testing",
    "no_waits",
    "set_testing",
    "taskkit_app",
    "taskkit_celery_config",
    "taskkit_checkpoints",
    "taskkit_dead_letters",
    "taskkit_no_waits",
    "taskkit_progress",
    "taskkit_worker",
]

_FAKES = {"FakeDeadLetterStore", "FakeProgressSink", "MemoryCheckpointStorage", "ProgressRecord"}


def __getattr__(name: str) -> Any:
    # The fakes import SQLAlchemy and Celery: loaded on first use, so that the plugin, which
    # every pytest session of a taskkit user loads, stays light.
    if name in _FAKES:
        from taskkit.testing import fakes  # noqa: PLC0415

        return getattr(fakes, name)
    raise AttributeError(f"module 'taskkit.testing' has no attribute {name!r}")
