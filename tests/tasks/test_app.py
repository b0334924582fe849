"""create_app's defaults, the visibility timeout checks, and the embedded default end to end."""

from __future__ import annotations

import warnings

import pytest

from taskkit.config import Settings, load_settings
from taskkit.errors import ConfigurationError, TaskkitWarning
from taskkit.tasks import create_app
from taskkit.tasks._visibility import VisibilityKeeper, check_visibility
from tests._support.workers import WorkerProcess

REDIS = "redis://127.0.0.1:6379/15"


def test_reliable_defaults_on_redis():
    app = create_app("d", settings=Settings(broker_url=REDIS))
    conf = app.conf
    assert conf.task_serializer == "json"
    assert conf.accept_content == ["json"]
    assert conf.task_acks_late
    assert conf.task_reject_on_worker_lost
    assert conf.worker_prefetch_multiplier == 1
    assert conf.task_track_started
    assert conf.broker_connection_retry_on_startup
    assert conf.result_extended
    assert conf.result_backend == REDIS
    options = conf.broker_transport_options
    assert options["visibility_timeout"] == 30.0
    assert options["unacked_restore_interval"] == 5
    assert options["unacked_restore_throttle"] == 1
    assert VisibilityKeeper in app.steps["consumer"]


def test_embedded_default_uses_files_under_home(tmp_path):
    settings = Settings(home=tmp_path / "tk")
    app = create_app("e", settings=settings)
    assert app.conf.broker_url == f"taskkit+sqlite:///{tmp_path / 'tk' / 'queue.db'}"
    assert app.conf.result_backend == f"db+sqlite:///{tmp_path / 'tk' / 'results.db'}"
    assert settings.lease_url == (tmp_path / "tk" / "leases").as_uri()
    # nothing Redis-specific; the embedded broker takes its visibility timeout
    assert app.conf.broker_transport_options == {"visibility_timeout": settings.visibility_timeout}


def test_leases_default_to_a_redis_every_worker_shares():
    assert Settings(broker_url=REDIS).lease_url == REDIS
    rabbit = "amqp://guest:guest@127.0.0.1:5672//"
    assert Settings(broker_url=rabbit, result_backend=REDIS).lease_url == REDIS
    local = Settings(broker_url=rabbit, result_backend="rpc://")
    assert local.lease_url.startswith("file://")
    assert Settings(lease_url="redis://leases:6379/3").lease_url == "redis://leases:6379/3"


def test_countdowns_are_clamped_under_the_timeout_when_nothing_extends_it():
    with pytest.warns(TaskkitWarning) as record:
        app = create_app(
            "c",
            settings=Settings(broker_url=REDIS, extend_visibility=False),
            task_time_limit=3600,
        )
    messages = [str(w.message) for w in record]
    assert any("taskkit_outer_max_delay=600s" in m and "clamped to 27s" in m for m in messages)
    assert any("task_time_limit=3600s is longer" in m for m in messages)
    assert app.conf.taskkit_outer_max_delay == 27.0


def test_a_time_limit_longer_than_the_timeout_is_reported_when_nothing_extends_it():
    app = create_app(
        "t",
        settings=Settings(broker_url=REDIS, extend_visibility=False),
        taskkit_outer_max_delay=10.0,
    )
    app.conf.task_time_limit = 3600
    with pytest.warns(TaskkitWarning, match="task_time_limit=3600s is longer"):
        problems = check_visibility(app)
    assert len(problems) == 1


def test_with_the_keeper_long_countdowns_are_kept():
    with warnings.catch_warnings():
        warnings.simplefilter("error", TaskkitWarning)
        app = create_app("k", settings=Settings(broker_url=REDIS), task_time_limit=7200)
    assert app.conf.get("taskkit_outer_max_delay") is None  # the task default (600 s) applies


def test_bad_broker_settings_name_the_variable(monkeypatch):
    monkeypatch.setenv("TASKKIT_BROKER_URL", "localhost:6379")
    with pytest.raises(ConfigurationError, match="TASKKIT_BROKER_URL: .*not a URL"):
        load_settings()
    monkeypatch.setenv("TASKKIT_BROKER_URL", "redis://x")
    monkeypatch.setenv("TASKKIT_VISIBILITY_TIMEOUT", "1")
    with pytest.raises(ConfigurationError, match="TASKKIT_VISIBILITY_TIMEOUT"):
        load_settings()


def test_embedded_default_runs_a_task_end_to_end_through_a_worker_subprocess(tmp_path, monkeypatch):
    """No TASKKIT_BROKER_URL: ``make worker``'s app on SQLite files, nothing else running."""
    home = tmp_path / "home"
    monkeypatch.setenv("TASKKIT_HOME", str(home))
    monkeypatch.delenv("TASKKIT_BROKER_URL", raising=False)
    monkeypatch.delenv("TASKKIT_RESULT_BACKEND", raising=False)
    settings = load_settings()
    assert settings.embedded_broker

    app = create_app("workers", settings=settings)
    worker = WorkerProcess("embedded", tmp_path, app="workers.app", pool="prefork", concurrency=1)
    try:
        worker.wait_ready()
        added = app.send_task("workers.tasks.add", args=(2, 3))
        assert added.get(timeout=60) == 5
        counted = app.send_task("workers.tasks.count_to", args=(3, 0.05))
        assert counted.get(timeout=60) == 3
        assert counted.state == "SUCCESS"
        assert (home / "queue.db").exists()
        assert (home / "results.db").exists()
    finally:
        worker.stop()
        print(worker.log()[-3000:])


def test_your_transport_options_are_kept_on_any_broker_and_redis_ones_only_on_redis(tmp_path):
    rabbit = create_app(
        "r",
        settings=Settings(broker_url="amqp://guest:guest@127.0.0.1:5672//", home=tmp_path / "h"),
        broker_transport_options={"confirm_publish": True},
    )
    assert rabbit.conf.broker_transport_options == {"confirm_publish": True}
    assert (tmp_path / "h").is_dir()  # where the default SQLite results go
    redis_app = create_app(
        "s",
        settings=Settings(broker_url=REDIS),
        broker_transport_options={"visibility_timeout": 60},
    )
    assert redis_app.conf.broker_transport_options["visibility_timeout"] == 60
    assert redis_app.conf.broker_transport_options["unacked_restore_throttle"] == 1
