"""``taskkit.config``: every setting is read from its ``TASKKIT_*`` variable (or ``.env``), the
embedded defaults live under the home, a malformed value names its variable, secrets stay out
of reprs and errors, and ``get_settings`` caches until ``reset_settings``.

How ``TASKKIT_HOME`` itself is found (explicit, else the project's ``.taskkit``, from any
subfolder) is tested in ``tests/cli/test_home.py``; lease and result-backend defaults derived
from a Redis or RabbitMQ broker in ``tests/tasks/test_app.py``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr, ValidationError

from taskkit.config import Settings, get_settings, load_settings, reset_settings
from taskkit.errors import ConfigurationError


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A project folder as the working directory, with no ``TASKKIT_*`` variable set (the test
    session sets ``TASKKIT_HOME``), and no cached settings before or after."""
    for name in [n for n in os.environ if n.startswith("TASKKIT_")]:
        monkeypatch.delenv(name)
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'mine'\n")
    monkeypatch.chdir(tmp_path)
    reset_settings()
    yield tmp_path
    monkeypatch.undo()
    reset_settings()


# -- every field from its variable --------------------------------------------------------------

#: A valid value for each setting's variable, and the value the setting then has; each differs
#: from the field's default, so a variable that is not read fails the test. Paths are relative to
#: the project folder (the working directory).
SAMPLES: dict[str, tuple[str, Any]] = {
    "home": ("state", Path("state")),
    "database_url": (
        "postgresql+psycopg://app@db:5432/app",
        "postgresql+psycopg://app@db:5432/app",
    ),
    "db_connect_timeout": ("2.5", 2.5),
    "db_pool_size": ("12", 12),
    "db_max_overflow": ("0", 0),
    "db_pool_recycle": ("-1", -1),
    "sqlite_busy_timeout": ("0.5", 0.5),
    "broker_url": ("redis://broker:6379/1", "redis://broker:6379/1"),
    "result_backend": ("redis://results:6379/2", "redis://results:6379/2"),
    "visibility_timeout": ("5", 5.0),
    "extend_visibility": ("false", False),
    "lease_url": ("redis://leases:6379/3", "redis://leases:6379/3"),
    "lease_ttl": ("60", 60.0),
    "progress_interval": ("0", 0.0),
    "checkpoint_dir": ("ckpts", Path("ckpts")),
    "checkpoint_storage": ("database", "database"),
    "checkpoint_keep_last": ("7", 7),
    "checkpoint_keep_best": ("0", 0),
    "secret_key": ("s3cret-s3cret-s3cret", "s3cret-s3cret-s3cret"),
    "secret_key_file": ("keys/team.key", Path("keys/team.key")),
    "secret_keys_old": (
        "old-key-1-old-key-1,old-key-2-old-key-2",
        "old-key-1-old-key-1,old-key-2-old-key-2",
    ),
    "resume_orphaned_runs": ("false", False),
    "dead_letter": ("0", False),
    "dead_letter_retention_days": ("7.5", 7.5),
    "dead_letter_queue": ("taskkit.dead", "taskkit.dead"),
    "worker_events": ("1", True),
    "consumer_timeout": ("0", 0.0),
    "api_token": ("t0ken-t0ken", "t0ken-t0ken"),
    "api_max_body_bytes": ("2048", 2048),
    "api_cors_origins": ("http://localhost:3000", "http://localhost:3000"),
    "predictor_url": ("http://127.0.0.1:9000", "http://127.0.0.1:9000"),
    "metrics_port": ("9808", 9808),
    "metrics_dir": ("/var/lib/taskkit-metrics", Path("/var/lib/taskkit-metrics")),
    "log_format": ("json", "json"),
    "log_retry_attempts": ("false", False),
    "log_circuit_state_changes": ("0", False),
    "alert_on_circuit_open": ("no", False),
    "alert_webhook_url": ("http://127.0.0.1:9/hook", "http://127.0.0.1:9/hook"),
    "tracing": ("false", False),
}


def test_every_setting_has_a_sample():
    assert set(SAMPLES) == set(Settings.model_fields), "add the new setting to SAMPLES"


@pytest.mark.parametrize("name", sorted(Settings.model_fields))
def test_each_setting_is_read_from_its_taskkit_variable(
    name: str, project: Path, monkeypatch: pytest.MonkeyPatch
):
    raw, expected = SAMPLES[name]
    if isinstance(expected, Path):
        expected = project / expected
    assert expected != getattr(load_settings(), name), "the sample must not be the default"
    monkeypatch.setenv(f"TASKKIT_{name.upper()}", raw)

    value = getattr(load_settings(), name)

    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    assert value == expected


def test_a_dotenv_file_in_the_working_directory_is_read_and_the_environment_wins(
    project: Path, monkeypatch: pytest.MonkeyPatch
):
    (project / ".env").write_text(
        "TASKKIT_LEASE_TTL=40\nTASKKIT_DB_POOL_SIZE=9\nOTHER_TOOL_SETTING=x\n"
    )
    monkeypatch.setenv("TASKKIT_DB_POOL_SIZE", "3")

    settings = load_settings()

    assert settings.lease_ttl == 40.0
    assert settings.db_pool_size == 3


def test_other_taskkit_variables_are_not_settings_and_do_not_break_them(
    project: Path, monkeypatch: pytest.MonkeyPatch
):
    """Unknown ``TASKKIT_*`` names are ignored, not refused: the CLI reads ``TASKKIT_APP`` and
    the test suite ``TASKKIT_TEST_*``/``TASKKIT_REQUIRE_SERVICES``, beside the settings."""
    monkeypatch.setenv("TASKKIT_APP", "mine.tasks")
    monkeypatch.setenv("TASKKIT_REQUIRE_SERVICES", "0")
    monkeypatch.setenv("TASKKIT_LEASE_TTLL", "not a number")

    assert load_settings().lease_ttl == 15.0


def test_arguments_override_the_environment(project: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("TASKKIT_LEASE_TTL", "40")

    assert load_settings(lease_ttl=20).lease_ttl == 20.0
    assert Settings(lease_ttl=25).lease_ttl == 25.0


def test_settings_are_frozen(project: Path):
    settings = load_settings()

    with pytest.raises(ValidationError, match="frozen"):
        settings.lease_ttl = 1  # type: ignore[misc]


# -- defaults -----------------------------------------------------------------------------------


def test_an_empty_environment_puts_the_embedded_files_under_the_home(project: Path):
    settings = load_settings()

    home = project / ".taskkit"
    assert settings.home == home
    assert settings.database_url == f"sqlite:///{home / 'taskkit.db'}"
    assert settings.broker_url == f"taskkit+sqlite:///{home / 'queue.db'}"
    assert settings.embedded_broker
    assert not settings.broker_uses_redis
    assert settings.result_backend == f"db+sqlite:///{home / 'results.db'}"
    assert settings.lease_url == (home / "leases").as_uri()
    assert settings.checkpoint_dir == home / "checkpoints"
    assert not home.exists(), "reading settings must not create files"


def test_an_empty_environment_has_the_documented_defaults(project: Path):
    settings = load_settings()

    assert {
        name: getattr(settings, name)
        for name in Settings.model_fields
        if name
        not in {"home", "database_url", "broker_url", "result_backend", "lease_url"}
        | {"checkpoint_dir"}
    } == {
        "db_connect_timeout": 10.0,
        "db_pool_size": 5,
        "db_max_overflow": 10,
        "db_pool_recycle": 1800,
        "sqlite_busy_timeout": 30.0,
        "visibility_timeout": 30.0,
        "extend_visibility": True,
        "lease_ttl": 15.0,
        "progress_interval": 1.0,
        "checkpoint_storage": "directory",
        "checkpoint_keep_last": 3,
        "checkpoint_keep_best": 1,
        "secret_key": None,
        "secret_key_file": None,
        "secret_keys_old": None,
        "resume_orphaned_runs": None,
        "dead_letter": True,
        "dead_letter_retention_days": 30.0,
        "dead_letter_queue": None,
        "worker_events": False,
        "consumer_timeout": 86400.0,
        "api_token": None,
        "api_max_body_bytes": 1_000_000,
        "api_cors_origins": "",
        "predictor_url": None,
        "metrics_port": None,
        "metrics_dir": None,
        "log_format": "text",
        "log_retry_attempts": True,
        "log_circuit_state_changes": True,
        "alert_on_circuit_open": True,
        "alert_webhook_url": None,
        "tracing": True,
    }


def test_the_embedded_defaults_follow_an_explicit_home_but_not_explicit_urls(
    project: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("TASKKIT_HOME", "state")
    monkeypatch.setenv("TASKKIT_DATABASE_URL", "postgresql+psycopg://app@db/app")

    settings = load_settings()

    home = project / "state"
    assert settings.database_url == "postgresql+psycopg://app@db/app"
    assert settings.broker_url == f"taskkit+sqlite:///{home / 'queue.db'}"
    assert settings.result_backend == f"db+sqlite:///{home / 'results.db'}"
    assert settings.checkpoint_dir == home / "checkpoints"


def test_empty_values_mean_the_default(project: Path, monkeypatch: pytest.MonkeyPatch):
    """``TASKKIT_X=`` (set but empty, as a template ``.env`` leaves it) is not a value."""
    for name in ("DATABASE_URL", "BROKER_URL", "RESULT_BACKEND", "LEASE_URL", "SECRET_KEY"):
        monkeypatch.setenv(f"TASKKIT_{name}", "  " if name.endswith("URL") else "")

    settings = load_settings()

    assert settings.database_url == f"sqlite:///{project / '.taskkit' / 'taskkit.db'}"
    assert settings.embedded_broker
    assert settings.lease_url.startswith("file://")
    assert settings.secret_key is None


# -- malformed values ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("variable", "value", "problem"),
    [
        ("TASKKIT_LEASE_TTL", "abc", "valid number"),
        ("TASKKIT_LEASE_TTL", "0", "greater than or equal to 1"),
        ("TASKKIT_DB_CONNECT_TIMEOUT", "0", "greater than 0"),
        ("TASKKIT_DB_POOL_SIZE", "2.5", "valid integer"),
        ("TASKKIT_DB_MAX_OVERFLOW", "-1", "greater than or equal to 0"),
        ("TASKKIT_DB_POOL_RECYCLE", "-2", "greater than or equal to -1"),
        ("TASKKIT_SQLITE_BUSY_TIMEOUT", "-0.5", "greater than or equal to 0"),
        ("TASKKIT_VISIBILITY_TIMEOUT", "4", "greater than or equal to 5"),
        ("TASKKIT_PROGRESS_INTERVAL", "-1", "greater than or equal to 0"),
        ("TASKKIT_DEAD_LETTER_RETENTION_DAYS", "0", "greater than 0"),
        ("TASKKIT_EXTEND_VISIBILITY", "maybe", "valid boolean"),
        ("TASKKIT_RESUME_ORPHANED_RUNS", "sometimes", "valid boolean"),
        ("TASKKIT_CHECKPOINT_STORAGE", "s3", "'directory' or 'database'"),
        ("TASKKIT_DATABASE_URL", "taskkit.db", "not a database URL"),
        ("TASKKIT_BROKER_URL", "localhost:6379", "not a URL"),
        ("TASKKIT_RESULT_BACKEND", "redis", "not a URL"),
        ("TASKKIT_LEASE_URL", "/var/run/leases", "not a URL"),
    ],
)
def test_a_malformed_value_names_its_variable(
    variable: str, value: str, problem: str, project: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv(variable, value)

    with pytest.raises(ConfigurationError) as caught:
        load_settings()

    message = str(caught.value)
    assert message.startswith(f"invalid taskkit settings: {variable}: ")
    assert problem in message
    assert isinstance(caught.value, ValueError)


def test_every_malformed_value_is_named_at_once(project: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("TASKKIT_LEASE_TTL", "abc")
    monkeypatch.setenv("TASKKIT_DB_POOL_SIZE", "0")

    with pytest.raises(ConfigurationError) as caught:
        load_settings()

    assert "TASKKIT_LEASE_TTL: " in str(caught.value)
    assert "TASKKIT_DB_POOL_SIZE: " in str(caught.value)


def test_a_malformed_argument_is_named_like_its_variable(project: Path):
    with pytest.raises(ConfigurationError, match="TASKKIT_LEASE_TTL: .*greater than or equal"):
        load_settings(lease_ttl=-3)


def test_get_settings_reports_a_malformed_value_and_reads_again_once_fixed(
    project: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("TASKKIT_LEASE_TTL", "abc")
    with pytest.raises(ConfigurationError, match="TASKKIT_LEASE_TTL"):
        get_settings()

    monkeypatch.setenv("TASKKIT_LEASE_TTL", "20")

    assert get_settings().lease_ttl == 20.0  # a failure is not cached


# -- secrets ------------------------------------------------------------------------------------

PASSWORD = "hunter2-Pa55"
SECRET_URLS = {
    "TASKKIT_DATABASE_URL": f"postgresql+psycopg://app:{PASSWORD}@db:5432/app",
    "TASKKIT_BROKER_URL": f"redis://:{PASSWORD}@broker:6379/0",
    "TASKKIT_RESULT_BACKEND": f"redis://:{PASSWORD}@results:6379/1",
    "TASKKIT_LEASE_URL": f"rediss://leases:{PASSWORD}@leases:6380/2",
    "TASKKIT_CHECKPOINT_DIR": f"s3://AKIAEXAMPLE:{PASSWORD}@models/checkpoints",
}


@pytest.mark.parametrize("variable", sorted(SECRET_URLS))
def test_a_url_password_is_not_in_the_settings_repr(
    variable: str, project: Path, monkeypatch: pytest.MonkeyPatch
):
    """Settings get logged (``logger.info("%r", settings)``, a debugger, a traceback's locals);
    the password must not go with them. The URL itself keeps it, for the drivers."""
    monkeypatch.setenv(variable, SECRET_URLS[variable])

    settings = load_settings()

    assert PASSWORD in getattr(settings, variable.removeprefix("TASKKIT_").lower())
    assert PASSWORD not in repr(settings)
    assert PASSWORD not in str(settings)


def test_the_secret_key_is_not_in_the_settings_repr(project: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("TASKKIT_SECRET_KEY", PASSWORD)

    settings = load_settings()

    assert settings.secret_key is not None
    assert settings.secret_key.get_secret_value() == PASSWORD
    assert PASSWORD not in repr(settings)
    assert PASSWORD not in str(settings)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("TASKKIT_DATABASE_URL", f"postgres//app:{PASSWORD}@db/app"),
        ("TASKKIT_BROKER_URL", f"redis//:{PASSWORD}@broker:6379/0"),
        ("TASKKIT_RESULT_BACKEND", f"{PASSWORD}@results"),
        ("TASKKIT_LEASE_URL", f"leases:{PASSWORD}@leases"),
    ],
)
def test_a_malformed_url_is_named_without_its_password(
    variable: str, value: str, project: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv(variable, value)

    with pytest.raises(ConfigurationError, match=variable) as caught:
        load_settings()

    assert PASSWORD not in str(caught.value)
    assert caught.value.__suppress_context__  # the pydantic error (it holds the value) not shown


def test_an_error_elsewhere_does_not_show_the_secrets(
    project: Path, monkeypatch: pytest.MonkeyPatch
):
    for variable, url in SECRET_URLS.items():
        monkeypatch.setenv(variable, url)
    monkeypatch.setenv("TASKKIT_SECRET_KEY", PASSWORD)
    monkeypatch.setenv("TASKKIT_LEASE_TTL", "abc")

    with pytest.raises(ConfigurationError, match="TASKKIT_LEASE_TTL") as caught:
        load_settings()

    assert PASSWORD not in str(caught.value)
    assert PASSWORD not in repr(caught.value)


# -- the process-wide settings ------------------------------------------------------------------


def test_get_settings_reads_once_and_again_after_reset_settings(
    project: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("TASKKIT_LEASE_TTL", "20")
    first = get_settings()

    monkeypatch.setenv("TASKKIT_LEASE_TTL", "30")
    (project / ".env").write_text("TASKKIT_DB_POOL_SIZE=9\n")

    assert get_settings() is first
    assert get_settings().lease_ttl == 20.0
    assert get_settings().db_pool_size == 5

    reset_settings()
    second = get_settings()

    assert second is not first
    assert (second.lease_ttl, second.db_pool_size) == (30.0, 9)
    assert get_settings() is second
