"""The installed ``taskkit`` command, in a real process, with the project's defaults."""

from __future__ import annotations

import sys
from pathlib import Path
from subprocess import CompletedProcess

import pytest

from tests._support.commands import clean_env, taskkit

REPO = Path(__file__).resolve().parents[2]
SCRIPT = Path(sys.executable).with_name("taskkit")


def _taskkit(*args: str, env: dict[str, str], cwd: Path = REPO) -> CompletedProcess[str]:
    return taskkit(*args, cwd=cwd, env=env)


def test_help_lists_the_commands(tmp_path: Path):
    result = _taskkit("--help", env=clean_env(), cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    for command in ("train", "runs", "resume", "db"):
        assert command in result.stdout


@pytest.mark.redis
def test_train_with_nothing_configured_uses_the_example_app_and_task(database: str, tmp_path: Path):
    """No --app, --task, TASKKIT_APP nor broker: workers.app (from the working directory), the
    embedded SQLite broker, and workers.training.train_model."""
    config = tmp_path / "run.yaml"
    config.write_text("epochs: 3\nseed: 1\n")
    env = clean_env(TASKKIT_HOME=str(tmp_path / "home"), TASKKIT_DATABASE_URL=database)

    submitted = _taskkit("train", str(config), "--name", "smoke", env=env)
    listed = _taskkit("runs", "list", env=env)

    assert submitted.returncode == 0, submitted.stderr
    assert "(workers.training.train_model)" in submitted.stdout
    assert listed.returncode == 0, listed.stderr
    [row] = listed.stdout.splitlines()[1:]
    assert row.split()[1:4] == ["smoke", "queued", "0/3"]
    assert (tmp_path / "home" / "queue.db").exists()
