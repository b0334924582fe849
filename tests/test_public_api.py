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
    "taskkit.tasks._base",
    "taskkit.tasks._lease",
    "taskkit.tasks._progress",
    "taskkit.tasks._batch",
    "taskkit.deadletter",
    "taskkit.deadletter._ledger",
    "taskkit.contrib.pandas",
    "taskkit.checkpoint",
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


ERROR_SAMPLES = [
    PermanentError("bad input"),
    RetryLater("rate limited", retry_after=2.5),
    TimeoutExceeded(3.0, "fetch"),
    CircuitBreakerError("ml-api", "open", 12.0, "5 failures"),
    CircuitStorageUnavailable("ml-api", "open", 0.0, "redis down"),
    ConfigurationError("delay must be >= 0"),
    DatabaseUnavailable("127.0.0.1:5432/app", 3, "connection refused"),
    ConcurrentUpdateError("ModelRun", 7, 5),
    LeaseHeld("train:run-1", "task t1 on host pid 9"),
    LeaseLost("train:run-1", 4),
]


@pytest.mark.parametrize("error", ERROR_SAMPLES, ids=lambda e: type(e).__name__)
def test_every_error_survives_pickle_and_celerys_json_results(error):
    """A task's failure comes back to the caller as the same class, message and attributes."""
    import pickle

    from celery import Celery
    from celery.backends.base import BaseBackend
    from celery.utils.serialization import get_pickleable_exception

    backend = BaseBackend(app=Celery("errors", set_as_current=False), serializer="json")
    stored = backend.prepare_exception(get_pickleable_exception(error), "json")
    for copy in (pickle.loads(pickle.dumps(error)), backend.exception_to_python(stored)):
        assert type(copy) is type(error)
        assert str(copy) == str(error)
        assert vars(copy) == vars(error)
