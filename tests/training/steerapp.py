"""The app of the steering tests (stop, resume, fork: tests/training/test_stop_fork.py,
tests/api/test_control_api.py, tests/cli/test_runs_fork.py): the embedded defaults under
``TASKKIT_HOME`` (the taskkit+sqlite broker, SQLite results and database) and the example
training body. Every epoch a run trains is appended to ``$TASKKIT_HOME/epochs-<run id>.txt``
with the config's ``alpha``, so a test reads which epochs ran, in order, with which config.

A worker runs ``celery -A tests.training.steerapp worker`` with the test's environment; the test
process calls ``build()`` after setting that environment (the settings are read then).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from celery import Celery

from taskkit.config import get_settings, reset_settings
from taskkit.tasks import TrainingTask, create_app
from workers.training import run_training

TASK = "steer.train"


def epochs_file(run_id: int) -> Path:
    return Path(get_settings().home) / f"epochs-{run_id}.txt"


def epochs_trained(run_id: int) -> list[tuple[int, float | None]]:
    """``(epoch, alpha)`` of every epoch any attempt of run ``run_id`` started, in order."""
    path = epochs_file(run_id)
    if not path.exists():
        return []
    rows = [line.split() for line in path.read_text().splitlines() if line.strip()]
    return [(int(e), None if a == "None" else float(a)) for e, a in rows]


def build() -> Celery:
    """The app, with the settings of the environment now."""
    app = create_app("steer")

    @app.task(base=TrainingTask, bind=True, shared=False, name=TASK)
    def train(self: TrainingTask, model_run_id: int, config: dict[str, Any]) -> dict[str, Any]:
        path = epochs_file(model_run_id)

        def on_epoch(epoch: int) -> None:
            with path.open("a") as log:
                log.write(f"{epoch} {config.get('alpha')}\n")

        return run_training(self, config, on_epoch=on_epoch)

    return app


@contextmanager
def steering_worker(root: Path, key: str) -> Iterator[Celery]:
    """A worker subprocess of this app on a home under ``root`` (migrated), and the same app in
    this process, whose ``TASKKIT_*`` environment is the worker's until the block ends."""
    from tests._support.commands import clean_env, taskkit
    from tests._support.workers import WorkerProcess

    home = root / "home"
    values = {
        "TASKKIT_HOME": str(home),
        "TASKKIT_DATABASE_URL": f"sqlite:///{home / 'taskkit.db'}",
        "TASKKIT_SECRET_KEY": key,
        "TASKKIT_CHECKPOINT_KEEP_LAST": "50",
        "TASKKIT_LEASE_TTL": "3",
    }
    saved = {
        k: v for k, v in os.environ.items() if k.startswith("TASKKIT_") and k != "TASKKIT_TEST_RUN"
    }
    for name in saved:
        del os.environ[name]
    os.environ.update(values)
    reset_settings()
    worker = None
    try:
        upgraded = taskkit("db", "upgrade", cwd=root, env=clean_env(**values))
        assert upgraded.returncode == 0, upgraded.stderr
        worker = WorkerProcess("steer", root, app="tests.training.steerapp", env=values)
        worker.wait_ready()
        yield build()
    finally:
        if worker is not None:
            worker.stop()
        for name in values:
            os.environ.pop(name, None)
        os.environ.update(saved)
        reset_settings()


app = build()
