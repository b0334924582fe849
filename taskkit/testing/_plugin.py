"""The pytest fixtures of ``taskkit.testing`` (a ``pytest11`` plugin: every pytest session of a
project that installs taskkit loads this module, so it imports nothing but pytest here).

They build on ``celery.contrib.pytest`` as pytest-celery ships it: ``taskkit_app`` is its
``celery_app`` (configured by ``celery_config``, ``celery_parameters``) with taskkit's test
settings, and ``taskkit_worker`` starts the same in-process worker as Celery's own
``celery_worker`` fixture (honouring ``celery_includes``, ``celery_worker_pool`` and
``celery_worker_parameters``). Decision: a fixture of its own name, because pytest-celery 1.x
replaces ``celery_worker`` with its Docker-container worker.
"""

# Imports inside the fixtures on purpose: this module must not import Celery or SQLAlchemy.
# ruff: noqa: PLC0415

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from taskkit.testing._mode import no_waits

if TYPE_CHECKING:
    from celery import Celery

    from taskkit.testing.fakes import (
        FakeDeadLetterStore,
        FakeProgressSink,
        MemoryCheckpointStorage,
    )

__all__ = [
    "celery_config_for_tests",
    "taskkit_app",
    "taskkit_celery_config",
    "taskkit_checkpoints",
    "taskkit_dead_letters",
    "taskkit_no_waits",
    "taskkit_progress",
    "taskkit_worker",
]

#: The key checkpoints are signed with in tests (loading still verifies the signature).
TEST_SECRET_KEY = "taskkit-testing-key"


def celery_config_for_tests(home: str | Path) -> dict[str, Any]:
    """Celery settings for running taskkit tasks in a test: the in-memory broker and result
    backend (no Redis, no Docker), a SQLite database migrated to head, lease files and
    checkpoints under ``home``, progress unthrottled and every retry wait zero.

    Example::

        app = create_app("jobs", **celery_config_for_tests(tmp_path))
    """
    from taskkit.config import load_settings
    from taskkit.db.migrate import upgrade
    from taskkit.db.session import create_engine_for
    from taskkit.tasks import reliable_defaults

    home = Path(home)
    home.mkdir(parents=True, exist_ok=True)
    settings = load_settings(
        home=home,
        broker_url="memory://",
        result_backend="cache+memory://",
        progress_interval=0.0,
    )
    engine = create_engine_for(settings.database_url)
    try:
        upgrade(engine)
    finally:
        engine.dispose()
    return {
        **reliable_defaults(settings),
        "broker_url": settings.broker_url,
        "result_backend": settings.result_backend,
        "taskkit_inner_delay": 0.0,
        "taskkit_inner_max_delay": 0.0,
        "taskkit_outer_delay": 0.0,
        "taskkit_outer_max_delay": 0.0,
    }


@pytest.fixture(scope="session")
def taskkit_celery_config(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Session fixture: ``celery_config_for_tests`` on a temporary directory of the session. Return
    it from your ``celery_config`` fixture, or update your own app's ``conf`` with it."""
    return celery_config_for_tests(tmp_path_factory.mktemp("taskkit"))


@pytest.fixture
def taskkit_app(
    celery_app: Celery,
    taskkit_celery_config: Mapping[str, Any],
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Celery]:
    """The app under test: pytest-celery's ``celery_app`` with ``taskkit_celery_config``, whose
    database is also the process default for the test (``submit_run`` and the CLI find it).

    Override it in your ``conftest.py`` to test the tasks of your own app::

        @pytest.fixture
        def taskkit_app(taskkit_app, taskkit_celery_config):
            from myproject.tasks import app
            app.conf.update(taskkit_celery_config)
            return app
    """
    from taskkit.config import reset_settings

    celery_app.conf.update(taskkit_celery_config)
    monkeypatch.setenv("TASKKIT_DATABASE_URL", str(taskkit_celery_config["taskkit_database_url"]))
    reset_settings()
    yield celery_app
    # the cached settings name the test's database: the next reader gets them afresh, once
    # monkeypatch has put the environment back
    reset_settings()


@pytest.fixture
def taskkit_worker(
    taskkit_app: Celery,
    celery_includes: Sequence[str],
    celery_worker_pool: Any,
    celery_worker_parameters: Mapping[str, Any],
) -> Iterator[Any]:
    """An in-process Celery worker (a thread; solo pool by default) consuming ``taskkit_app``,
    with taskkit's waits off (``no_waits``) for the test. Yields Celery's ``WorkController``.

    Example::

        def test_fetch(taskkit_worker):
            assert fetch.delay("x").get(timeout=10) == b"..."
    """
    from celery.contrib.testing.worker import start_worker

    for module in celery_includes:
        taskkit_app.loader.import_task_module(module)
    parameters = {"perform_ping_check": False, **celery_worker_parameters}
    with (
        no_waits(),
        start_worker(taskkit_app, pool=celery_worker_pool, **parameters) as worker,
    ):
        yield worker


@pytest.fixture
def taskkit_dead_letters(monkeypatch: pytest.MonkeyPatch) -> FakeDeadLetterStore:
    """A ``FakeDeadLetterStore`` that every ``ResilientTask.dead_letters()`` returns for the
    test (a subclass that overrides ``dead_letters`` keeps its own).

    Example::

        def test_bad_symbol_is_dead_lettered(taskkit_worker, taskkit_dead_letters):
            fetch.delay("???")
            (letter,) = taskkit_dead_letters.list(task=fetch.name)
    """
    from taskkit.tasks import ResilientTask
    from taskkit.testing.fakes import FakeDeadLetterStore

    store = FakeDeadLetterStore()
    monkeypatch.setattr(ResilientTask, "dead_letters", lambda task: store)
    return store


@pytest.fixture
def taskkit_checkpoints(monkeypatch: pytest.MonkeyPatch) -> MemoryCheckpointStorage:
    """A ``MemoryCheckpointStorage`` under every ``TrainingTask.checkpoint_store(run_id)`` for
    the test: the real ``CheckpointStore`` (signed with a test key, verified on load) on
    memory instead of files. A subclass that overrides ``checkpoint_store`` keeps its own.

    Example::

        def test_resumes(taskkit_worker, taskkit_checkpoints):
            run_id, task_id = submit_run(train, {"epochs": 4})
            ...
            assert taskkit_checkpoints.steps(run_id)[-1] == 3
    """
    from taskkit.checkpoint import CheckpointStore
    from taskkit.tasks import TrainingTask
    from taskkit.testing.fakes import MemoryCheckpointStorage

    storage = MemoryCheckpointStorage()

    def checkpoint_store(
        task: TrainingTask, run_id: Any, *, run_uid: str | None = None
    ) -> CheckpointStore:
        return CheckpointStore(
            run_id,
            run_uid=run_uid or task.run_uid(run_id),  # the run's identity, as the real one
            storage=storage,
            format=task.checkpoint_format,
            compress=task.checkpoint_compress,
            secret_key=TEST_SECRET_KEY,
        )

    monkeypatch.setattr(TrainingTask, "checkpoint_store", checkpoint_store)
    return storage


@pytest.fixture
def taskkit_progress(monkeypatch: pytest.MonkeyPatch) -> FakeProgressSink:
    """A ``FakeProgressSink`` that sees every ``progress()`` report of every ResilientTask in
    the test (what the task reported; the Celery state and a training run's row are still
    written as usual).

    Example::

        def test_progress(taskkit_worker, taskkit_progress):
            count_to.delay(3).get(timeout=10)
            assert taskkit_progress.last(count_to.name).current == 3
    """
    from taskkit.tasks import ProgressReport, ResilientTask
    from taskkit.testing.fakes import FakeProgressSink

    sink = FakeProgressSink()
    report_progress = ResilientTask.progress

    def progress(
        task: ResilientTask,
        current: float,
        total: float | None = None,
        message: str | None = None,
        **metrics: Any,
    ) -> ProgressReport:
        report = report_progress(task, current, total, message, **metrics)
        sink.add(task.name, task.request.id, report)
        return report

    monkeypatch.setattr(ResilientTask, "progress", progress)
    return sink


@pytest.fixture
def taskkit_no_waits() -> Iterator[None]:
    """Test mode on for one test (no attempt cap): every retry wait is zero."""
    with no_waits():
        yield
