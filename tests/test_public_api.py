"""The public surface: complete __all__, lightweight imports, the error tree."""

from __future__ import annotations

import importlib
import inspect
import subprocess
import sys

import pytest

import taskkit.errors
from taskkit.errors import (
    CircuitBreakerError,
    CircuitStorageUnavailable,
    ConcurrentUpdateError,
    ConfigurationError,
    DatabaseUnavailable,
    LeaseHeld,
    LeaseLost,
    PermanentError,
    RetryLater,
    TaskkitError,
    TimeoutExceeded,
)

PUBLIC_MODULES = [
    "taskkit",
    "taskkit.errors",
    "taskkit.recovery",
    "taskkit.recovery.events",
    "taskkit.testing",
    "taskkit.config",
    "taskkit.db",
    "taskkit.db.models",
    "taskkit.db.session",
    "taskkit.db.migrate",
    "taskkit.cli",
    "taskkit.tasks",
    "taskkit.tasks.base",
    "taskkit.tasks.lease",
    "taskkit.tasks.progress",
]


@pytest.mark.parametrize("name", PUBLIC_MODULES)
def test_all_lists_every_public_name_and_each_one_exists(name):
    module = importlib.import_module(name)
    exported = set(module.__all__)
    for attr in exported:
        assert hasattr(module, attr), f"{name}.__all__ lists {attr}, which does not exist"
    defined_here = {
        attr
        for attr, value in vars(module).items()
        if not attr.startswith("_")
        and (inspect.isclass(value) or inspect.isfunction(value))
        and (value.__module__ == name or value.__module__.startswith(name + "._"))
    }
    assert defined_here <= exported, defined_here - exported


def test_importing_recovery_imports_neither_celery_nor_sqlalchemy_nor_redis():
    code = (
        "import sys, taskkit.recovery, taskkit.testing\n"
        "top = {m.split('.')[0] for m in sys.modules}\n"
        "heavy = sorted(top & {'celery', 'sqlalchemy', 'redis', 'kombu'})\n"
        "print(','.join(heavy))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == ""


def test_every_error_is_a_taskkit_error_and_keeps_its_builtin_meaning():
    for cls in (
        PermanentError,
        RetryLater,
        TimeoutExceeded,
        CircuitBreakerError,
        ConfigurationError,
        DatabaseUnavailable,
        ConcurrentUpdateError,
        LeaseHeld,
        LeaseLost,
    ):
        assert issubclass(cls, TaskkitError)
    assert issubclass(LeaseHeld, PermanentError)  # the ladder fails it at once
    assert issubclass(DatabaseUnavailable, ConnectionError)
    assert issubclass(TimeoutExceeded, TimeoutError)
    assert issubclass(ConfigurationError, ValueError)
    assert issubclass(CircuitStorageUnavailable, CircuitBreakerError)


def test_the_error_tree_in_the_docstring_names_every_error():
    for name in taskkit.errors.__all__:
        assert name in taskkit.errors.__doc__


def test_retry_later_rejects_a_negative_wait():
    with pytest.raises(ConfigurationError, match="retry_after must be >= 0"):
        RetryLater(retry_after=-1)


@pytest.mark.parametrize("package", ["taskkit.db", "taskkit.tasks"])
def test_every_public_function_has_a_docstring_with_an_example(package):
    module = importlib.import_module(package)
    for name in module.__all__:
        value = getattr(module, name)
        if inspect.isfunction(value) or name == "ResilientTask":
            assert "Example::" in (value.__doc__ or ""), name
