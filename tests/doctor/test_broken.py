"""``taskkit doctor`` finds each deliberately broken setup (issue 17's must-show list), on real
services: a visibility timeout shorter than a task's soft time limit, an unmigrated database,
checkpoints signed with another key (or no key at all), an unreachable broker, a skewed clock
(a fake clock), a task module the worker does not import."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from taskkit.checkpoint import CheckpointStore
from taskkit.config import Settings
from taskkit.doctor import diagnose
from taskkit.errors import TaskkitWarning
from taskkit.tasks import ResilientTask, create_app
from tests.conftest import pg_schema

KEY_A = "doctor-test-key-aaaaaaaaaaaaaaaa"
KEY_B = "doctor-test-key-bbbbbbbbbbbbbbbb"

APP = """
from taskkit.config import Settings
from taskkit.tasks import ResilientTask, create_app

app = create_app(
    "{self}",
    settings=Settings(broker_url="{broker}", extend_visibility={extend}, visibility_timeout=30),
)


@app.task(base=ResilientTask, bind=True, name="{self}.train", soft_time_limit=120)
def train(self):
    return 1
"""


def _visibility_app(write_module: Callable[[str, str], str], broker: str, extend: bool) -> str:
    return write_module("visapp", APP.replace("{broker}", broker).replace("{extend}", str(extend)))


def test_visibility_timeout_shorter_than_a_soft_time_limit(project: Path, own_redis, write_module):
    server = own_redis(6401)
    settings = Settings(broker_url=server.url, extend_visibility=False)
    spec = _visibility_app(write_module, server.url, extend=False)

    report = diagnose(settings, app_spec=spec)

    check = report.check("visibility_timeout")
    assert check.verdict == "error", check
    assert f"{spec}.train (soft_time_limit=120s)" in check.reason
    assert "visibility_timeout (30s)" in check.reason
    assert "TASKKIT_EXTEND_VISIBILITY=true" in (check.fix or "")
    assert "above 120s" in (check.fix or "")
    assert report.check("broker").verdict == "ok"
    assert report.exit_code == 2
    app = report.check("app")  # create_app warned while the app loaded: shown, not raised
    assert app.verdict == "warning", app
    assert "taskkit_outer_max_delay=600s is longer than the broker's visibility_timeout" in (
        app.reason
    )


def test_the_keeper_makes_a_long_soft_time_limit_safe(project: Path, own_redis, write_module):
    server = own_redis(6402)
    spec = _visibility_app(write_module, server.url, extend=True)

    check = diagnose(Settings(broker_url=server.url), app_spec=spec).check("visibility_timeout")

    assert check.verdict == "ok", check
    assert check.details["keeper"] is True
    assert check.details["longest_limit"]["soft_time_limit"] == 120.0


def test_unmigrated_database(project: Path, postgres_url: str):
    with pg_schema(postgres_url, prefix="taskkit_doctor") as url:
        report = diagnose(Settings(database_url=url), app=create_app("dk", settings=Settings()))

    check = report.check("database")
    assert check.verdict == "error", check
    assert "has no taskkit tables" in check.reason
    assert check.fix == "run: taskkit db upgrade"
    assert check.details["revision"] is None


def test_migrated_database_is_ok(project: Path, pg_schema_url: str):
    report = diagnose(Settings(database_url=pg_schema_url), app=create_app("dk"))

    check = report.check("database")
    assert check.verdict == "ok", check
    assert check.details["revision"] == check.details["head"]


def _checkpoint(folder: Path, key: str) -> None:
    settings = Settings(secret_key=key, checkpoint_dir=folder)
    with CheckpointStore("run-7", settings=settings) as store:
        store.save({"weights": [1.0, 2.0]}, step=3)


def test_checkpoints_signed_with_another_key(project: Path, tmp_path: Path):
    folder = tmp_path / "checkpoints"
    _checkpoint(folder, KEY_A)

    check = diagnose(Settings(secret_key=KEY_B, checkpoint_dir=folder)).check("secret_key")

    assert check.verdict == "error", check
    assert "run run-7 step 3" in check.reason
    assert "does not verify with this host's key from TASKKIT_SECRET_KEY" in check.reason
    assert "TASKKIT_SECRET_KEYS_OLD" in (check.fix or "")


def test_the_key_that_signed_them_or_an_old_key_verifies(project: Path, tmp_path: Path):
    folder = tmp_path / "checkpoints"
    _checkpoint(folder, KEY_A)

    same = diagnose(Settings(secret_key=KEY_A, checkpoint_dir=folder)).check("secret_key")
    rotated = diagnose(
        Settings(secret_key=KEY_B, secret_keys_old=KEY_A, checkpoint_dir=folder)
    ).check("secret_key")

    assert same.verdict == "ok", same
    assert "verifies" in same.reason
    assert rotated.verdict == "ok", rotated


def test_missing_key_with_checkpoints_of_another_host(project: Path, tmp_path: Path):
    folder = tmp_path / "checkpoints"
    _checkpoint(folder, KEY_A)
    home = tmp_path / "home-without-key"

    check = diagnose(Settings(home=home, checkpoint_dir=folder)).check("secret_key")

    assert check.verdict == "error", check
    assert "no signing key on this host, but checkpoints exist" in check.reason
    assert not (home / "secret.key").exists()  # doctor made no key


def test_unreachable_broker(project: Path, own_redis):
    server = own_redis(6403)
    server.stop()  # a port of our own with nothing listening any more
    settings = Settings(broker_url=server.url)

    report = diagnose(settings, app=create_app("dk", settings=settings))

    broker = report.check("broker")
    assert broker.verdict == "error", broker
    assert "redis://127.0.0.1:6403/0 does not answer" in broker.reason
    assert "TASKKIT_BROKER_URL" in (broker.fix or "")
    assert report.check("result_backend").verdict == "error"
    assert report.check("clock_redis").verdict == "warning"
    assert report.exit_code == 2


class SkewedClock:
    """This host's clock, ``offset`` seconds off."""

    def __init__(self, offset: float) -> None:
        self.offset = offset

    def __call__(self) -> float:
        return time.time() + self.offset


def test_clock_skew_against_redis_and_postgresql(project: Path, redis_url: str, pg_schema_url: str):
    settings = Settings(broker_url=redis_url, database_url=pg_schema_url)
    app = create_app("dk", settings=settings)

    skewed = diagnose(settings, app=app, clock=SkewedClock(120))
    in_time = diagnose(settings, app=app, clock=SkewedClock(0))

    for name in ("clock_redis", "clock_database"):
        check = skewed.check(name)
        assert check.verdict == "error", check
        assert "120." in check.reason
        assert "ahead of" in check.reason
        assert -125 < check.details["skew_seconds"] < -115
        assert "synchronise the clocks" in (check.fix or "")
        assert in_time.check(name).verdict == "ok", in_time.check(name)


def test_a_small_skew_is_a_warning(project: Path, redis_url: str):
    settings = Settings(broker_url=redis_url)

    check = diagnose(settings, app=create_app("dk", settings=settings), clock=SkewedClock(-4))
    found = check.check("clock_redis")

    assert found.verdict == "warning", found
    assert "behind" in found.reason


TASKS = """
from {name:mainapp} import app
from taskkit.tasks import ResilientTask


@app.task(base=ResilientTask, bind=True, name="{self}.{task}")
def {task}(self):
    return 1
"""

MAIN = """
from taskkit.config import Settings
from taskkit.tasks import create_app

app = create_app("{self}", settings=Settings(), include={include})
"""


def _main_app(write_module: Callable[[str, str], str], include: list[str]) -> str:
    return write_module("mainapp", MAIN.replace("{include}", repr(include)))


def test_task_module_not_loaded_by_the_worker(project: Path, write_module):
    included = f"included_{project.name}"
    spec = _main_app(write_module, [included])
    (project / f"{included}.py").write_text(
        TASKS.replace("{name:mainapp}", spec).replace("{self}", included).replace("{task}", "a")
    )
    forgotten = write_module("forgotten", TASKS.replace("{task}", "b"))

    report = diagnose(Settings(), app_spec=spec, tasks_modules=[included, forgotten])

    check = report.check("task_modules")
    assert check.verdict == "error", check
    assert f"the worker does not import {forgotten}" in check.reason
    assert f"{forgotten}.b" in check.reason
    assert included not in check.reason
    assert f"add {forgotten!r} to create_app(include=[...])" in (check.fix or "")
    assert check.details["not_registered_by_worker"] == {forgotten: [f"{forgotten}.b"]}
    # Celery shares an app's tasks with every app of the process: look at this test's own
    registered = report.check("app").details["taskkit_tasks"]
    assert f"{included}.a" in registered
    assert f"{forgotten}.b" not in registered


def test_an_include_that_does_not_import(project: Path, write_module):
    spec = _main_app(write_module, ["no_such_tasks_module_xyz"])

    report = diagnose(Settings(), app_spec=spec)

    assert report.check("app").verdict == "error"
    check = report.check("task_modules")
    assert check.verdict == "error", check
    assert "no module named 'no_such_tasks_module_xyz'" in check.reason


def test_tasks_declared_on_another_app_with_another_broker(project: Path, write_module):
    other = "\n".join(
        [
            "from taskkit.config import Settings",
            "from taskkit.tasks import ResilientTask, create_app",
            "other = create_app('elsewhere', settings=Settings(broker_url='redis://:pw-x1@nowhere:6379/0'))",
            "@other.task(base=ResilientTask, bind=True, name='{self}.lost')",
            "def lost(self):",
            "    return 1",
        ]
    )
    module = write_module("otherapp", other)
    spec = _main_app(write_module, [module])

    check = diagnose(Settings(), app_spec=spec).check("task_modules")

    assert check.verdict == "error", check
    assert f"{module}.lost (app 'elsewhere' sends to redis://:***@nowhere:6379/0" in check.reason


def test_an_app_module_that_does_not_import(project: Path):
    report = diagnose(Settings(), app_spec="no_such_app_module_xyz")

    app = report.check("app")
    assert app.verdict == "error"
    assert "cannot import the app module 'no_such_app_module_xyz'" in app.reason
    # the services are still checked, from the settings
    assert report.check("broker").verdict == "ok"


def test_acks_and_serializer_of_a_careless_app(project: Path):
    settings = Settings()
    with pytest.warns(TaskkitWarning, match="pickle"):
        app = create_app("dk", settings=settings, accept_content=["json", "pickle"])

    @app.task(base=ResilientTask, bind=True, name="dk.early", acks_late=False)
    def early(self: Any) -> int:
        return 1

    report = diagnose(settings, app=app)

    assert report.check("serializer").verdict == "error"
    assert "pickle" in report.check("serializer").reason
    acks = report.check("acks")
    assert acks.verdict == "error", acks
    assert "dk.early" in acks.reason


def test_rabbitmq_consumer_timeout_shorter_than_a_task(project: Path, rabbitmq_url: str):
    settings = Settings(broker_url=rabbitmq_url, consumer_timeout=600)
    app = create_app("dk", settings=settings)

    @app.task(base=ResilientTask, bind=True, name="dk.long", time_limit=3600)
    def long(self: Any) -> int:
        return 1

    check = diagnose(settings, app=app).check("consumer_timeout")

    assert check.details["rabbitmq_version"], check
    assert check.verdict in {"error", "warning"}, check
    assert "dk.long" in check.reason


def test_embedded_broker_limits(project: Path, tmp_path: Path):
    check = diagnose(Settings(home=tmp_path / "home")).check("embedded_broker")
    sqla = Settings(broker_url=f"sqla+sqlite:///{tmp_path / 'b.db'}")
    kombu = diagnose(sqla, app=create_app("dk", settings=sqla)).check("embedded_broker")

    assert check.verdict == "ok"
    assert "one host only" in check.reason
    assert "celery inspect" in check.reason
    assert kombu.verdict == "warning"
    assert not (tmp_path / "home" / "queue.db").exists()  # doctor made no broker file


def test_checkpoint_storage_that_cannot_be_written(project: Path, tmp_path: Path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")

    check = diagnose(Settings(checkpoint_dir=blocker / "checkpoints")).check("checkpoint_storage")

    assert check.verdict == "error", check
    assert "is not a folder" in check.reason


def test_checkpoint_storage_room_against_the_last_checkpoint(project: Path, tmp_path: Path):
    folder = tmp_path / "checkpoints"
    _checkpoint(folder, KEY_A)

    check = diagnose(Settings(secret_key=KEY_A, checkpoint_dir=folder)).check("checkpoint_storage")

    assert check.verdict == "ok", check
    assert check.details["last_size_bytes"] > 0
    assert check.details["free_bytes"] > check.details["last_size_bytes"]


def test_a_key_made_on_one_host_of_a_fleet(project: Path, tmp_path: Path, redis_url: str):
    from taskkit._keys import home_key

    home = tmp_path / "home"
    home_key(home)  # what the first checkpoint on this host did
    fleet = Settings(home=home, broker_url=redis_url)

    check = diagnose(fleet, app=create_app("dk", settings=fleet)).check("secret_key")

    assert check.verdict == "warning", check
    assert "made on this host" in check.reason
    assert "on every host" in (check.fix or "")


def test_what_doctor_says_the_worker_registers_is_what_a_real_worker_registers(
    project: Path, tmp_path: Path, write_module
):
    from tests._support.workers import WorkerProcess, wait_for

    included = write_module("withtasks", TASKS.replace("{task}", "a"))
    spec = _main_app(write_module, [included])
    forgotten = write_module("forgotten", TASKS.replace("{task}", "b"))
    # {name:mainapp} was resolved when the task modules were written: rewrite them now
    for module in (included, forgotten):
        path = project / f"{module}.py"
        path.write_text(path.read_text().replace("{name:mainapp}", spec))

    report = diagnose(Settings(), app_spec=spec, tasks_modules=[included, forgotten])
    worker = WorkerProcess(
        "doctor",
        tmp_path,
        app=spec,
        pool="solo",
        env={"PYTHONPATH": f"{project}:{Path.cwd()}", "TASKKIT_HOME": str(tmp_path / "home")},
    )
    try:
        wait_for(lambda: "[tasks]" in worker.log() and " ready." in worker.log(), 60, "the worker")
        banner = worker.log()
    finally:
        worker.stop()

    assert f"{included}.a" in banner
    assert f"{forgotten}.b" not in banner
    assert report.check("task_modules").details["not_registered_by_worker"] == {
        forgotten: [f"{forgotten}.b"]
    }


def test_a_service_that_never_answers_is_cut_at_the_deadline(project: Path):
    import socket

    with socket.socket() as silent:  # accepts connections (the backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"redis://127.0.0.1:{silent.getsockname()[1]}/0"
        settings = Settings(broker_url=url)

        report = diagnose(settings, app=create_app("dk", settings=settings), timeout=0.5)

    broker = report.check("broker")
    assert broker.verdict == "error"
    assert "did not answer within 0.5s" in broker.reason
    assert report.check("serializer").verdict == "ok"  # the others still report


def test_settings_that_do_not_validate(project: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("TASKKIT_LEASE_TTL", "soon")

    report = diagnose(app_spec="no_such_app_module_xyz")

    settings = report.check("settings")
    assert settings.verdict == "error"
    assert "TASKKIT_LEASE_TTL" in settings.reason
    assert report.check("database").reason.startswith("not checked")
    assert report.exit_code == 2
