"""Run ids, the checkpoint errors (pickle and Celery JSON round trips), and the settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from taskkit.checkpoint import CheckpointStore, DirectoryStorage, validate_run_id
from taskkit.config import load_settings, reset_settings
from taskkit.errors import (
    CheckpointCorrupt,
    CheckpointError,
    CheckpointTampered,
    CheckpointWarning,
    ConfigurationError,
    InvalidRunId,
    PermanentError,
    TaskkitError,
    TaskkitWarning,
)


@pytest.mark.parametrize(
    ("run_id", "problem"),
    [
        ("../x", "contains '..'"),
        ("x/..", "contains '..'"),
        ("..", "contains '..'"),
        ("a..b", "contains '..'"),
        ("/abs", "is an absolute path"),
        ("\\\\server\\share", "is an absolute path"),
        ("C:\\runs", "is an absolute path"),
        ("a/b", "contains a path separator"),
        ("a\\b", "contains a path separator"),
        ("a\x00b", "contains a NUL byte"),
        ("", "is empty"),
        (".hidden", "must start with a letter or a digit"),
        ("-rf", "must start with a letter or a digit"),
        ("a b", "contains ' '"),
        ("run:1", "contains ':'"),
        ("naïve", "contains 'ï'"),
        ("x" * 129, "is 129 characters long; at most 128"),
        (-1, "must start with a letter or a digit"),
        (None, "must be a str or an int, not NoneType"),
        (True, "must be a str or an int, not bool"),
        (1.5, "must be a str or an int, not float"),
    ],
)
def test_unsafe_run_ids_are_refused_with_the_reason(run_id, problem):
    with pytest.raises(InvalidRunId, match="invalid checkpoint run id") as caught:
        validate_run_id(run_id)
    assert problem in str(caught.value)
    assert problem in caught.value.problem
    assert isinstance(caught.value, ConfigurationError)
    assert isinstance(caught.value, ValueError)


@pytest.mark.parametrize(
    ("run_id", "expected"),
    [("a", "a"), ("exp-1.b_c", "exp-1.b_c"), (42, "42"), (0, "0"), ("x" * 128, "x" * 128)],
)
def test_safe_run_ids(run_id, expected):
    assert validate_run_id(run_id) == expected


def test_a_store_refuses_an_unsafe_run_id_before_touching_the_disk(tmp_path: Path):
    with pytest.raises(InvalidRunId, match="'../x'"):
        CheckpointStore(
            "../x", storage=DirectoryStorage(tmp_path / "c"), secret_key="a-test-key-16-bytes"
        )
    assert not (tmp_path / "c").exists()
    assert not (tmp_path / "x").exists()


def test_error_messages_and_the_tree():
    error = CheckpointCorrupt("its data is missing", "exp", 7)
    assert str(error) == "checkpoint run 'exp', step 7: its data is missing"
    assert (error.run_id, error.step, error.reason) == ("exp", 7, "its data is missing")
    assert str(CheckpointError("no storage")) == "no storage"
    assert issubclass(CheckpointError, TaskkitError)
    assert issubclass(CheckpointCorrupt, CheckpointError)
    assert issubclass(CheckpointTampered, CheckpointError)
    assert issubclass(CheckpointTampered, PermanentError)  # the retry ladder gives up at once
    assert not issubclass(CheckpointCorrupt, PermanentError)
    assert issubclass(InvalidRunId, ConfigurationError)
    assert issubclass(CheckpointWarning, TaskkitWarning)


# -- settings ----------------------------------------------------------------------------------


def test_checkpoint_settings_defaults(monkeypatch, tmp_path: Path):
    monkeypatch.chdir(tmp_path)
    for name in (
        "TASKKIT_HOME",
        "TASKKIT_CHECKPOINT_DIR",
        "TASKKIT_SECRET_KEY",
        "TASKKIT_SECRET_KEY_FILE",
        "TASKKIT_SECRET_KEYS_OLD",
    ):
        monkeypatch.delenv(name, raising=False)
    settings = load_settings()
    assert settings.checkpoint_dir == tmp_path / ".taskkit" / "checkpoints"  # not /tmp
    assert settings.checkpoint_storage == "directory"
    assert (settings.checkpoint_keep_last, settings.checkpoint_keep_best) == (3, 1)
    assert settings.secret_key is None
    assert settings.secret_key_file is None
    assert settings.secret_keys_old is None


def test_checkpoint_settings_from_the_environment(monkeypatch, tmp_path: Path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TASKKIT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("TASKKIT_CHECKPOINT_DIR", "ckpts")
    monkeypatch.setenv("TASKKIT_CHECKPOINT_STORAGE", "database")
    monkeypatch.setenv("TASKKIT_CHECKPOINT_KEEP_LAST", "5")
    monkeypatch.setenv("TASKKIT_CHECKPOINT_KEEP_BEST", "0")
    monkeypatch.setenv("TASKKIT_SECRET_KEY", "s3cret-s3cret-s3cret")
    settings = load_settings()
    assert settings.checkpoint_dir == tmp_path / "ckpts"  # relative: against the working dir
    assert settings.checkpoint_storage == "database"
    assert (settings.checkpoint_keep_last, settings.checkpoint_keep_best) == (5, 0)
    assert settings.secret_key is not None
    assert settings.secret_key.get_secret_value() == "s3cret-s3cret-s3cret"
    assert "s3cret" not in repr(settings)
    monkeypatch.setenv("TASKKIT_SECRET_KEY", "")
    assert load_settings().secret_key is None  # set but empty: no key, not an empty key
    # the home default follows TASKKIT_HOME when TASKKIT_CHECKPOINT_DIR is not set
    monkeypatch.delenv("TASKKIT_CHECKPOINT_DIR")
    assert load_settings().checkpoint_dir == tmp_path / "home" / "checkpoints"
    reset_settings()


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("TASKKIT_CHECKPOINT_KEEP_LAST", "0"),
        ("TASKKIT_CHECKPOINT_KEEP_BEST", "-1"),
        ("TASKKIT_CHECKPOINT_STORAGE", "s3"),
    ],
)
def test_bad_checkpoint_settings_name_the_variable(monkeypatch, variable, value):
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigurationError, match=variable):
        load_settings()
