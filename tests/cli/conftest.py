"""Fixtures for the CLI tests: the database of the test, the test app, and a CLI runner."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, select
from typer.testing import CliRunner

from taskkit.db.models import ModelRun, TrainingProgress
from taskkit.db.session import session_scope


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture
def database(
    db_url: str, engine: Engine, redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[str]:
    """``db_url`` as TASKKIT_DATABASE_URL, signed checkpoints under ``tmp_path``, the test app
    as TASKKIT_APP; its queues are emptied afterwards (tables are emptied by ``engine``)."""
    from taskkit.config import reset_settings
    from tests.cli import cliapp

    variables = {
        "TASKKIT_DATABASE_URL": db_url,
        "TASKKIT_CHECKPOINT_DIR": str(tmp_path / "checkpoints"),
        "TASKKIT_APP": "tests.cli.cliapp",
        # signed checkpoints: no "only checksummed" warning (warnings are errors here)
        "TASKKIT_SECRET_KEY": "tkcli-test-key-16b",
    }
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    reset_settings()
    yield db_url
    for name in variables:
        monkeypatch.delenv(name, raising=False)
    reset_settings()
    _delete_keys(redis_url, f"{cliapp.PREFIX}:*")


def _delete_keys(redis_url: str, pattern: str) -> None:
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        keys = list(client.scan_iter(match=pattern))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


@pytest.fixture(scope="session", autouse=True)
def _delete_this_runs_leases() -> Iterator[None]:
    yield
    import sys

    from tests.conftest import REDIS_URL

    cliapp = sys.modules.get("tests.cli.cliapp")
    if cliapp is None:
        return
    _delete_keys(REDIS_URL, f"taskkit:*:tkcli_{cliapp.RUN}.*")
    _delete_keys(REDIS_URL, f"{cliapp.PREFIX}:*")


@pytest.fixture
def make_run(database: str) -> Callable[..., int]:
    """Insert a run (and a progress row when ``epoch`` is given); returns its id."""

    def make(
        name: str = "baseline",
        status: str = "queued",
        *,
        task_name: str | None = None,
        epoch: int | None = None,
        total: int | None = None,
        metrics: dict[str, Any] | None = None,
        error: str | None = None,
        final_score: float | None = None,
        config: dict[str, Any] | None = None,
    ) -> int:
        from tests.cli import cliapp

        with session_scope(database) as session:
            run = ModelRun(
                name=name,
                model_type="sgd",
                config=config or {"epochs": total or 4},
                status=status,
                task_id=f"task-{name}",
                task_name=task_name or cliapp.TRAIN,
                error_message=error,
                final_score=final_score,
                started_at=None if status == "queued" else datetime.now(UTC),
            )
            session.add(run)
            session.flush()
            if epoch is not None:
                session.add(
                    TrainingProgress(
                        model_run_id=run.id,
                        status="running",
                        current_epoch=epoch,
                        total_epochs=total,
                        progress_percentage=100.0 * epoch / total if total else 0.0,
                        metrics=metrics or {},
                    )
                )
            return run.id

    return make


@pytest.fixture
def update_run(database: str) -> Callable[..., None]:
    """Change a run's columns (``epoch=`` changes its progress row)."""

    def update(run_id: int, *, epoch: int | None = None, **columns: Any) -> None:
        with session_scope(database) as session:
            run = session.get(ModelRun, run_id)
            assert run is not None
            for column, value in columns.items():
                setattr(run, column, value)
            if epoch is not None:
                progress = session.scalars(
                    select(TrainingProgress).filter_by(model_run_id=run_id)
                ).one()
                progress.current_epoch = epoch
                total = progress.total_epochs or 1
                progress.progress_percentage = 100.0 * epoch / total

    return update


@pytest.fixture
def read_row(database: str) -> Callable[[int], ModelRun]:
    def read(run_id: int) -> ModelRun:
        with session_scope(database) as session:
            run = session.get(ModelRun, run_id)
            assert run is not None
            return run

    return read
