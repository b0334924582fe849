"""``TASKKIT_HOME`` resolves once per project: an explicit value wins; else the nearest folder,
from the working directory upwards, holding a ``.taskkit/`` folder or a ``pyproject.toml``;
else the working directory. The embedded database, broker and checkpoints follow it."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from subprocess import CompletedProcess

import pytest

from taskkit.config import find_home, load_settings, reset_settings
from tests._support.commands import taskkit

SCRIPT = Path(sys.executable).with_name("taskkit")


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A project folder (its pyproject.toml) with a subfolder ``notebooks/deep``."""
    root = tmp_path / "project"
    (root / "notebooks" / "deep").mkdir(parents=True)
    (root / "pyproject.toml").write_text("[project]\nname = 'mine'\n")
    return root


@pytest.fixture
def no_home(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No TASKKIT_* variable (the test session sets TASKKIT_HOME for every other test)."""
    for name in [n for n in os.environ if n.startswith("TASKKIT_")]:
        monkeypatch.delenv(name)
    reset_settings()
    yield
    monkeypatch.undo()
    reset_settings()


def test_the_project_root_holds_the_home_from_any_subfolder(project: Path):
    assert find_home(project / "notebooks" / "deep") == project / ".taskkit"
    assert find_home(project) == project / ".taskkit"


def test_the_nearest_taskkit_folder_wins_over_a_farther_pyproject(project: Path):
    inner = project / "notebooks"
    (inner / ".taskkit").mkdir()

    assert find_home(inner / "deep") == inner / ".taskkit"
    assert find_home(project) == project / ".taskkit"


def test_a_taskkit_file_is_not_a_home_folder(project: Path):
    (project / "notebooks" / ".taskkit").write_text("not a folder")

    assert find_home(project / "notebooks" / "deep") == project / ".taskkit"


def test_outside_any_project_the_working_directory(tmp_path: Path):
    lonely = tmp_path / "lonely" / "dir"
    lonely.mkdir(parents=True)
    if any((p / ".taskkit").is_dir() or (p / "pyproject.toml").is_file() for p in lonely.parents):
        pytest.skip(f"a folder above {lonely} marks a project")

    assert find_home(lonely) == lonely / ".taskkit"


def test_settings_in_a_subfolder_use_the_projects_files(
    project: Path, no_home: None, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.chdir(project / "notebooks" / "deep")

    settings = load_settings()

    home = project / ".taskkit"
    assert settings.home == home
    assert settings.database_url == f"sqlite:///{home / 'taskkit.db'}"
    assert settings.broker_url == f"taskkit+sqlite:///{home / 'queue.db'}"
    assert settings.result_backend == f"db+sqlite:///{home / 'results.db'}"
    assert settings.lease_url == (home / "leases").as_uri()
    assert settings.checkpoint_dir == home / "checkpoints"


def test_an_explicit_taskkit_home_wins(
    project: Path, tmp_path: Path, no_home: None, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.chdir(project / "notebooks")
    monkeypatch.setenv("TASKKIT_HOME", str(tmp_path / "elsewhere"))

    assert load_settings().home == tmp_path / "elsewhere"
    assert load_settings().database_url == f"sqlite:///{tmp_path / 'elsewhere' / 'taskkit.db'}"

    monkeypatch.setenv("TASKKIT_HOME", "state")  # relative: to the working directory
    assert load_settings().home == project / "notebooks" / "state"
    assert load_settings(home=tmp_path / "code").home == tmp_path / "code"


def _taskkit(*args: str, cwd: Path) -> CompletedProcess[str]:
    return taskkit(*args, cwd=cwd)


def test_a_command_from_a_subfolder_uses_the_projects_database(project: Path):
    """Migrated at the root, listed from a subfolder: the same file; no empty one is made."""
    database = project / ".taskkit" / "taskkit.db"
    deep = project / "notebooks" / "deep"

    upgraded = _taskkit("db", "upgrade", cwd=project)
    listed = _taskkit("runs", "list", cwd=deep)

    assert upgraded.returncode == 0, upgraded.stderr
    assert f"database sqlite:///{database} is at revision" in upgraded.stdout
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout == f"no runs in sqlite:///{database}\n"
    assert not (deep / ".taskkit").exists()
    assert not (project / "notebooks" / ".taskkit").exists()


def test_an_unmigrated_project_database_is_named_from_a_subfolder(project: Path):
    result = _taskkit("dlq", "depth", cwd=project / "notebooks")

    assert result.returncode == 2
    assert result.stderr == (
        f"error: the database sqlite:///{project / '.taskkit' / 'taskkit.db'} has no taskkit "
        "tables; run: taskkit db upgrade\n"
    )
    assert not (project / "notebooks" / ".taskkit").exists()
