"""Secrets stay out of what Celery shows: URL passwords in report/inspect conf, arguments marked
sensitive in logs, dead letters, task events and the result backend; long argument reprs cut."""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery.app.utils import filter_hidden_settings

from taskkit.config import Settings
from taskkit.errors import ConfigurationError
from taskkit.tasks import ResilientTask, TaskFailure, create_app
from tests._support.commands import clean_env, run_command
from tests._support.workers import wait_for

SECRET = "SuperSecret"
URLS = {
    "broker_url": f"redis://:{SECRET}@127.0.0.1:6379/14",
    "result_backend": f"redis://user:{SECRET}@127.0.0.1:6379/13",
    "lease_url": f"redis://:{SECRET}@127.0.0.1:6379/12",
    "database_url": f"postgresql+psycopg://app:{SECRET}@127.0.0.1:5432/test",
}


def secret_app() -> Any:
    return create_app("secrets", settings=Settings(**URLS))


# -- item 10: every URL setting masked wherever Celery prints its config --------------------------


def test_no_url_password_in_the_filtered_config_or_the_bug_report():
    app = secret_app()
    for with_defaults in (False, True):
        assert SECRET not in repr(app.conf.table(with_defaults=with_defaults))
        assert SECRET not in app.conf.humanize(with_defaults=with_defaults)
    assert SECRET not in repr(filter_hidden_settings(app.conf))
    assert SECRET not in app.bugreport()
    # what `celery inspect conf` (and so Flower's /api/workers) answers
    from celery.worker import control

    state = type("State", (), {"app": app})()
    for with_defaults in (False, True):
        assert SECRET not in repr(control.conf(state, with_defaults=with_defaults))
    # the lease store still gets the real URL
    assert SECRET in app.conf.taskkit_lease_backend


def test_the_lease_url_given_as_an_app_setting_is_kept_hidden_too():
    app = create_app(
        "secrets",
        settings=Settings(broker_url="memory://", result_backend="cache+memory://"),
        taskkit_lease_url=URLS["lease_url"],
    )
    assert SECRET not in app.conf.humanize(with_defaults=True)
    assert app.conf.taskkit_lease_backend == URLS["lease_url"]


def test_celery_report_prints_no_url_password(tmp_path: Path):
    (tmp_path / "secretapp.py").write_text(
        "from taskkit.tasks import create_app\napp = create_app('secretapp')\n"
    )
    env = clean_env(
        PYTHONPATH=str(tmp_path),
        TASKKIT_HOME=str(tmp_path / "home"),
        **{f"TASKKIT_{name.upper()}": url for name, url in URLS.items()},
    )
    celery = Path(sys.executable).with_name("celery")
    done = run_command([str(celery), "-A", "secretapp", "report"], cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    assert "taskkit_lease" in done.stdout  # the setting is there, masked
    assert SECRET not in done.stdout + done.stderr


# -- item 13: pickle task messages ----------------------------------------------------------------


def test_accepting_pickle_task_messages_warns():
    from taskkit.errors import TaskkitWarning

    with pytest.warns(TaskkitWarning, match="pickle"):
        create_app("p", broker_url="memory://", accept_content=["json", "pickle"])
    with pytest.warns(TaskkitWarning, match="pickle"):
        create_app("p", broker_url="memory://", task_serializer="pickle")


# -- item 11: sensitive arguments -----------------------------------------------------------------


def test_sensitive_args_must_be_argument_names():
    def login(self, user, password):
        return user

    app = create_app("s", broker_url="memory://", result_backend="cache+memory://")
    app.finalize()  # tasks are made (and their options checked) at once
    with pytest.raises(ConfigurationError, match="sensitive_args must be a tuple"):
        app.task(base=ResilientTask, bind=True, shared=False, name="l1", sensitive_args="password")(
            login
        )
    with pytest.raises(ConfigurationError, match="'paswsord'.*did you mean 'password'"):
        app.task(
            base=ResilientTask, bind=True, shared=False, name="l2", sensitive_args=("paswsord",)
        )(login)
    task = app.task(
        base=ResilientTask, bind=True, shared=False, name="l3", sensitive_args=["password"]
    )(login)
    assert task.sensitive_args == ("password",)
    assert task.redact(("ann", "pw"), {}) == (("ann", "[redacted]"), {}, ("password",))
    assert task.redact((), {"password": "pw"}) == ((), {"password": "[redacted]"}, ("password",))


def test_sensitive_args_on_a_batch_task_is_refused():
    """Its message is a list of items: redacting "the item" would hide the whole batch and the
    items' own dead letters would keep them."""
    from taskkit.tasks import BatchTask

    def score(self, item):
        return item

    app = create_app("s", broker_url="memory://", result_backend="cache+memory://")
    app.finalize()
    with pytest.raises(ConfigurationError, match="not supported on a batch task"):
        app.task(base=BatchTask, bind=True, shared=False, name="b1", sensitive_args=("item",))(
            score
        )


def _kit():
    from tests._support.apps import redis_test_app

    kit = redis_test_app("sec", worker_send_task_events=True, task_send_sent_event=True)
    kit.app.finalize()

    @kit.app.task(
        base=ResilientTask, bind=True, sensitive_args=("password", "api_key"), max_retries=0
    )
    def login(self, user, password, api_key=None, blob=None):
        raise ValueError(f"{user} may not log in")

    @kit.app.task(base=ResilientTask, bind=True, max_retries=0)
    def huge(self, items):
        raise ValueError("no")

    kit.login, kit.huge = login, huge  # type: ignore[attr-defined]
    return kit


@pytest.fixture(scope="module")
def worker_app(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from taskkit.db import upgrade

    url = f"sqlite:///{tmp_path_factory.mktemp('secrets') / 'tk.db'}"
    upgrade(url)
    kit = _kit()
    kit.app.conf.taskkit_database_url = url
    return kit


@contextlib.contextmanager
def listening(app: Any, events: list[dict[str, Any]]) -> Iterator[None]:
    """Collect the app's events in a thread for the block. Redis delivers events by PUBLISH, to
    subscribers only: the block starts once a probe event has come back, so none is missed."""
    receiver = app.events.Receiver(
        app.connection(), handlers={"*": events.append}, app=app, node_id=f"probe-{uuid.uuid4()}"
    )
    thread = threading.Thread(
        target=receiver.capture, kwargs={"limit": None, "wakeup": False}, daemon=True
    )
    thread.start()
    try:
        with app.events.default_dispatcher() as dispatcher:

            def probed() -> bool:
                dispatcher.send("taskkit-probe")
                time.sleep(0.05)
                return any(e.get("type") == "taskkit-probe" for e in events)

            wait_for(probed, 10, "the event receiver to subscribe")
        yield
    finally:
        receiver.should_stop = True
        thread.join(timeout=10)


def test_sensitive_arguments_are_redacted_everywhere(worker, worker_app, caplog):
    from taskkit.deadletter import DeadLetterStore

    kit = worker_app
    recorded: list[TaskFailure] = []
    original = type(kit.login).record_failure

    def keep(self: Any, failure: TaskFailure) -> None:
        recorded.append(failure)
        original(self, failure)

    type(kit.login).record_failure = keep
    events: list[dict[str, Any]] = []
    try:
        with caplog.at_level(logging.DEBUG), listening(kit.app, events):
            result = kit.login.apply_async(
                ("ann", "hunter2"), {"api_key": "k-123456", "blob": "visible"}
            )
            with pytest.raises(ValueError):
                result.get(timeout=30)
            wait_for(lambda: any(e.get("type") == "task-failed" for e in events), 10, "task-failed")
    finally:
        type(kit.login).record_failure = original
    secrets = ("hunter2", "k-123456")
    # the ERROR log (taskkit's) and Celery's own log lines
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "failed for good" in logged
    assert "visible" in logged  # the other arguments are still there
    for secret in secrets:
        assert secret not in logged
    # the failure handed to record_failure, and the dead letter
    (failure,) = recorded
    assert failure.args[0] == "ann"
    assert all(s not in repr((failure.args, failure.kwargs)) for s in secrets)
    (letter,) = [
        lt
        for lt in DeadLetterStore(kit.app.conf.taskkit_database_url).list()
        if lt.task_id == result.id
    ]
    stored = json.dumps(letter.payload)
    assert "ann" in stored
    assert all(s not in stored for s in secrets)
    assert letter.payload.get("redacted") == ["api_key", "password"]
    # task events (what Flower shows)
    received = [e for e in events if e.get("type") in ("task-sent", "task-received")]
    assert received
    for event in received:
        assert all(s not in json.dumps(event) for s in secrets)
        assert "ann" in json.dumps(event)
    # the result backend (result_extended)
    meta = kit.app.backend.get_task_meta(result.id)
    assert meta["args"][0] == "ann"
    assert all(s not in json.dumps(meta, default=str) for s in secrets)


def test_a_huge_argument_list_is_cut_in_the_log_line(worker, worker_app, caplog):
    kit = worker_app
    items = [{"id": i, "text": "x" * 30} for i in range(50_000)]
    with caplog.at_level(logging.ERROR, logger="taskkit.tasks"):
        result = kit.huge.delay(items)
        with pytest.raises(ValueError):
            result.get(timeout=60)
    (line,) = [r.getMessage() for r in caplog.records if "failed for good" in r.getMessage()]
    assert len(line) < 6_000
    assert "characters cut" in line
