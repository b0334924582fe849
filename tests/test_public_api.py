"""The public surface: complete __all__, lightweight imports, the error tree."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import pytest

import taskkit
import taskkit.errors
from taskkit.errors import (
    CheckpointCorrupt,
    CheckpointError,
    CheckpointFormatError,
    CheckpointTampered,
    CircuitBreakerError,
    CircuitStorageUnavailable,
    ConcurrentUpdateError,
    ConfigurationError,
    DatabaseUnavailable,
    InvalidRunId,
    LeaseHeld,
    LeaseLost,
    PermanentError,
    RetryLater,
    TaskkitError,
    TimeoutExceeded,
)

ROOT = Path(__file__).resolve().parent.parent

#: Every public module (no ``_`` in its path) and what it exports: the curated API. A name
#: added to or removed from a package's ``__all__`` must be added or removed here, on purpose.
CURATED = {
    "taskkit": {"__version__"},
    "taskkit.api": {
        "LocalModel",
        "PredictRequest",
        "PredictResponse",
        "create_api",
        "local_predictor",
    },
    "taskkit.http": {"AsyncResilientClient", "ResilientClient", "breakers"},
    "taskkit.errors": {
        "BrokerUnavailable",
        "CheckpointCorrupt",
        "CheckpointError",
        "CheckpointFormatError",
        "CheckpointTampered",
        "CheckpointWarning",
        "CircuitBreakerError",
        "CircuitStorageUnavailable",
        "ConcurrentUpdateError",
        "ConfigurationError",
        "DatabaseUnavailable",
        "DeadLetterNotFound",
        "InvalidRunId",
        "LeaseHeld",
        "LeaseLost",
        "PermanentError",
        "ReplayRejected",
        "RetryLater",
        "RunNotFound",
        "RunNotResumable",
        "RunNotStoppable",
        "TaskkitError",
        "TaskkitWarning",
        "TimeoutExceeded",
    },
    "taskkit.recovery": {
        "BatchResult",
        "Budget",
        "CircuitBreaker",
        "CircuitState",
        "CircuitStorage",
        "FleetConcurrency",
        "FleetDecision",
        "FleetRateLimit",
        "FleetSlot",
        "RedisCircuitStorage",
        "RedisRetryBudget",
        "RetryBudget",
        "RetryCallState",
        "RetryStrategy",
        "Retrying",
        "TransactionManager",
        "batch_with_retry",
        "delays",
        "events",
        "fallback",
        "next_wait",
        "parallel_batch_process",
        "parse_rate",
        "retry",
        "safe_execute",
        "timeout",
    },
    "taskkit.recovery.events": {
        "BatchChunkFinished",
        "CheckpointSaved",
        "CircuitStateChanged",
        "DeadLettered",
        "EpochFinished",
        "Event",
        "GaveUp",
        "LeaseTakenOver",
        "RetryScheduled",
        "RunResumed",
        "TaskAttemptEnded",
        "TaskFailed",
        "active",
        "emit",
        "subscribe",
    },
    "taskkit.config": {"Settings", "find_home", "get_settings", "load_settings", "reset_settings"},
    "taskkit.db": {
        "BulkInsertResult",
        "atomic_update",
        "db_retry",
        "ensure_connection",
        "get_db",
        "get_engine",
        "get_sessionmaker",
        "is_transient",
        "safe_bulk_insert",
        "session_scope",
        "upgrade",
        "with_savepoint",
    },
    "taskkit.db.models": {
        "Base",
        "Batch",
        "BatchChunk",
        "BatchItem",
        "BatchItemRow",
        "CheckpointChunk",
        "CheckpointRecord",
        "Dataset",
        "DeadLetter",
        "ModelRun",
        "Prediction",
        "TrainingEpoch",
        "TrainingProgress",
    },
    "taskkit.db.session": {
        "create_engine_for",
        "dispose_engines",
        "get_db",
        "get_engine",
        "get_sessionmaker",
        "session_scope",
    },
    "taskkit.db.migrate": {
        "SchemaStatus",
        "current_revision",
        "head_revision",
        "schema_status",
        "upgrade",
        "upgrade_from",
    },
    "taskkit.db.runs": {"FINAL", "RunView", "check_run_id", "list_runs", "read_epochs", "read_run"},
    "taskkit.db.classify": {
        "describe_database",
        "driver_message",
        "is_disconnect",
        "is_missing_schema",
        "is_transient",
        "sqlstate",
    },
    "taskkit.checkpoint": {
        "Checkpoint",
        "CheckpointInfo",
        "CheckpointStorage",
        "CheckpointStore",
        "DatabaseStorage",
        "DirectoryStorage",
        "FsspecStorage",
        "seal",
        "storage_from_settings",
        "unseal",
        "validate_run_id",
    },
    "taskkit.deadletter": {
        "UNSERIALIZABLE",
        "BatchProgress",
        "BatchReport",
        "DeadLetterEntry",
        "DeadLetterStore",
        "ItemLedger",
        "LetterQuery",
        "ReplayResult",
        "SentReplay",
        "batch_progress",
        "batch_report",
    },
    "taskkit.tasks": {
        "DEFAULT_PERMANENT_ERRORS",
        "DEFAULT_TRANSIENT_ERRORS",
        "PROGRESS",
        "BatchSubmission",
        "BatchTask",
        "FileLeaseStore",
        "Lease",
        "LeaseOwner",
        "LeaseStore",
        "Option",
        "ProgressReport",
        "RedisLeaseStore",
        "ReproducibilityWarning",
        "ResilientTask",
        "TaskFailure",
        "TrainingRun",
        "TrainingTask",
        "check_reachable",
        "create_app",
        "duplicate_count",
        "duplicate_dropped",
        "fork_run",
        "load_model",
        "options_markdown",
        "reliable_defaults",
        "replay_dead_letters",
        "request_stop",
        "resume_orphaned_runs",
        "resume_run",
        "run_is_alive",
        "stop_run",
        "submit",
        "submit_batch",
        "submit_run",
        "VISIBILITY_SAFE_SHARE",
        "consumer_timeout_supported",
        "effective_consumer_timeout",
        "extends_visibility",
        "rabbitmq_version",
        "task_time_limits",
        "uses_amqp",
        "uses_visibility_timeout",
        "visibility_timeout",
    },
    "taskkit.testing": {
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
    },
    "taskkit.testing.fakes": {
        "FakeDeadLetterStore",
        "FakeProgressSink",
        "MemoryCheckpointStorage",
        "ProgressRecord",
    },
    "taskkit.cli": {"app", "main"},
    "taskkit.cli.db": {"db_app"},
    "taskkit.cli.doctor": {"doctor_app", "report_table"},
    "taskkit.cli.batches": {"batch_panel", "batches_app"},
    "taskkit.cli.dlq": {"dlq_app", "letter_panel", "letter_record", "letters_table", "parse_age"},
    "taskkit.cli.runs": {"runs_app"},
    "taskkit.cli.serve": {"is_loopback", "serve_app"},
    "taskkit.cli.tasks": {"LeaseView", "TaskView", "read_task", "task_panel", "tasks_app"},
    "taskkit.cli.train": {"train_app"},
    "taskkit.contrib": set(),
    "taskkit.telemetry": set(),
    "taskkit.telemetry.metrics": {
        "BUCKETS_BYTES",
        "BUCKETS_SECONDS",
        "CIRCUIT_STATE_VALUES",
        "CONTENT_TYPE",
        "DB_CACHE_SECONDS",
        "FLUSH_SECONDS",
        "BreakerCollector",
        "BudgetCollector",
        "DatabaseCollector",
        "Metrics",
        "ensure_multiprocess",
        "install",
        "installed",
        "mark_dead",
        "multiprocess_dir",
        "prepare_multiprocess_dir",
        "render",
        "serve",
        "track_breaker",
        "track_budget",
        "uninstall",
    },
    "taskkit.telemetry.logs": {
        "CONTEXT_FIELDS",
        "EVENT_KINDS",
        "EventFilter",
        "JsonFormatter",
        "configure_logging",
    },
    "taskkit.telemetry.alerts": {
        "CircuitAlert",
        "LogNotifier",
        "Notifier",
        "WebhookNotifier",
        "add_notifier",
        "flush_alerts",
        "install_alerts",
    },
    "taskkit.telemetry.tracing": {
        "TRACER_NAME",
        "attempt_span",
        "enabled",
        "layer_of",
        "record_circuit_state",
    },
    "taskkit.doctor": {
        "CHECK_NAMES",
        "CHECK_TIMEOUT",
        "EXIT_CODES",
        "Check",
        "Report",
        "Verdict",
        "diagnose",
    },
    "taskkit.broker": {"SCHEME", "Channel", "Transport"},
    "taskkit.contrib.pandas": {"RESULT_COLUMN", "process_dataframe_in_batches"},
}
PUBLIC_MODULES = sorted(CURATED)


@pytest.mark.parametrize("name", PUBLIC_MODULES)
def test_each_public_module_exports_exactly_its_curated_names(name):
    assert set(importlib.import_module(name).__all__) == CURATED[name]


def test_every_public_module_is_in_the_curated_list():
    """A new public (non-underscore) module must be added to CURATED, or made private."""
    found = set()
    for info in pkgutil.walk_packages(taskkit.__path__, "taskkit."):
        parts = info.name.split(".")
        if not any(part.startswith("_") for part in parts) and "migrations" not in parts:
            found.add(info.name)
    assert found | {"taskkit"} == set(CURATED)


def test_the_docs_import_each_name_by_one_path():
    """README and docs never import a name from two different modules."""
    paths: dict[str, set[str]] = {}
    pattern = re.compile(r"^\s*from (taskkit[\w.]*) import \(?([\w, ]+)", re.MULTILINE)
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        for module, names in pattern.findall(page.read_text()):
            for name in filter(None, (n.strip() for n in names.split(","))):
                paths.setdefault(name, set()).add(module)
    assert {name: found for name, found in paths.items() if len(found) > 1} == {}


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
    CheckpointError("could not be written (OSError: disk full)", "run-1", 3),
    CheckpointError("the store is closed", "run-1", None),
    CheckpointError("something", None, None),
    CheckpointCorrupt("its data is truncated: 10 bytes, the manifest says 20", "run-1", 4),
    CheckpointTampered("its signature does not match", "run-1", 5),
    CheckpointFormatError("not a taskkit checkpoint frame (wrong magic bytes)"),
    InvalidRunId("../x", "contains '..' (a parent directory)"),
    InvalidRunId(None, "must be a str or an int, not NoneType"),
]


@pytest.mark.parametrize(
    "error", ERROR_SAMPLES, ids=lambda e: f"{type(e).__name__}-{str(e.args[-1])[:20]}"
)
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
