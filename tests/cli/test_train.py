"""``taskkit train``: a config file becomes a queued run and a message for its task."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from taskkit.cli import _runview, app
from taskkit.db.models import ModelRun
from taskkit.db.session import session_scope
from tests.cli import cliapp

pytestmark = pytest.mark.redis


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _run_id(output: str) -> int:
    return int(output.split("submitted run ", 1)[1].split(maxsplit=1)[0])


def test_train_from_json_creates_a_queued_run_and_sends_its_task(
    runner: CliRunner, database: str, tmp_path: Path, read_row: Callable[[int], ModelRun]
):
    config = _write(tmp_path, "run.json", json.dumps({"epochs": 3, "seed": 7}))

    result = runner.invoke(app, ["train", str(config), "--task", cliapp.TRAIN, "--name", "base"])

    assert result.exit_code == 0, result.output
    run = read_row(_run_id(result.stdout))
    assert (run.status, run.name, run.task_name) == ("queued", "base", cliapp.TRAIN)
    assert run.config == {"epochs": 3, "seed": 7}
    assert f"as task {run.task_id}" in result.stdout
    assert f"taskkit runs show {run.id} --watch" in result.stdout
    [message] = cliapp.queued()
    assert message["headers"]["id"] == run.task_id
    assert message["headers"]["task"] == cliapp.TRAIN


def test_train_from_yaml_takes_the_task_and_name_from_the_config(
    runner: CliRunner, database: str, tmp_path: Path, read_row: Callable[[int], ModelRun]
):
    text = f"task: {cliapp.OTHER}\nname: forest\nepochs: 5\nlayers: [8, 4]\n"
    config = _write(tmp_path, "run.yaml", text)

    result = runner.invoke(app, ["train", str(config), "--queue", f"{cliapp.QUEUE}-2"])

    assert result.exit_code == 0, result.output
    run = read_row(_run_id(result.stdout))
    assert (run.status, run.name, run.task_name) == ("queued", "forest", cliapp.OTHER)
    assert run.config == {"task": cliapp.OTHER, "name": "forest", "epochs": 5, "layers": [8, 4]}
    assert cliapp.queued() == []
    [message] = cliapp.queued(f"{cliapp.QUEUE}-2")
    assert message["headers"]["id"] == run.task_id


def test_the_app_can_be_named_as_module_colon_attribute(
    runner: CliRunner, database: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.delenv("TASKKIT_APP")
    config = _write(tmp_path, "run.yml", "epochs: 2\n")

    result = runner.invoke(
        app, ["train", str(config), "--task", cliapp.TRAIN, "--app", "tests.cli.cliapp:other_app"]
    )

    assert result.exit_code == 0, result.output
    assert len(cliapp.queued()) == 1


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        ("bad.yaml", "epochs: 3\n  seed: [1, 2\n", "bad.yaml: invalid YAML at line 2"),
        ("bad.json", '{"epochs": 3,}', "bad.json: invalid JSON at line 1 column 14"),
        ("list.yaml", "- 1\n- 2\n", "must be a mapping (key: value), but it is a list"),
        ("empty.yml", "", "must be a mapping (key: value), but it is empty"),
        ("scalar.json", "3", "must be a mapping (key: value), but it is a number"),
        ("date.yaml", "start: 2024-01-01\n", "the config cannot be sent as JSON"),
        ("run.toml", "epochs = 3\n", "unsupported config format '.toml' (use .json, .yaml"),
        ("task.yaml", "task: [a]\n", "the config's 'task' must be a task name"),
    ],
)
def test_a_config_that_cannot_be_used_exits_2_naming_the_file_and_the_problem(
    runner: CliRunner, database: str, tmp_path: Path, name: str, text: str, expected: str
):
    config = _write(tmp_path, name, text)

    result = runner.invoke(app, ["train", str(config)])

    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: ")
    assert expected in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.output
    assert cliapp.queued() == []


def test_a_missing_config_file_exits_2(runner: CliRunner, database: str, tmp_path: Path):
    result = runner.invoke(app, ["train", str(tmp_path / "nope.yaml")])

    assert result.exit_code == 2
    assert f"error: config file {tmp_path / 'nope.yaml'} does not exist" in result.stderr


def test_an_unknown_task_exits_2_with_the_close_names(
    runner: CliRunner, database: str, tmp_path: Path, read_row: Callable[[int], ModelRun]
):
    config = _write(tmp_path, "run.json", "{}")

    result = runner.invoke(app, ["train", str(config), "--task", f"tkcli_{cliapp.RUN}.train_modle"])

    assert result.exit_code == 2, result.output
    assert "has no task" in result.stderr
    assert f"did you mean {cliapp.TRAIN}" in result.stderr
    assert cliapp.queued() == []


def test_the_default_task_is_the_example_training_task(
    runner: CliRunner, database: str, tmp_path: Path
):
    config = _write(tmp_path, "run.json", "{}")

    result = runner.invoke(app, ["train", str(config)])

    assert result.exit_code == 2
    assert "has no task 'workers.training.train_model'" in result.stderr


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("tests.cli.nope", "cannot import the app module 'tests.cli.nope'"),
        ("tests.cli.cliapp:missing", "module 'tests.cli.cliapp' has no 'missing'"),
        ("tests.cli.cliapp:QUEUE", "is a str, not a Celery app"),
        ("tests.cli.conftest", "has no 'app' or 'celery_app'"),
    ],
)
def test_an_app_that_cannot_be_loaded_exits_2(
    runner: CliRunner, database: str, tmp_path: Path, spec: str, expected: str
):
    config = _write(tmp_path, "run.json", "{}")

    result = runner.invoke(app, ["train", str(config), "--app", spec])

    assert result.exit_code == 2, result.output
    assert expected in result.stderr


def test_train_watch_follows_the_run_it_submitted(
    runner: CliRunner,
    database: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    update_run: Callable[..., None],
):
    config = _write(tmp_path, "run.json", '{"epochs": 2}')
    submitted: list[int] = []

    def worker_finishes(seconds: float) -> None:  # stands in for the worker, between two reads
        update_run(submitted[0], status="completed", final_score=0.9)

    read = _runview.read_run
    monkeypatch.setattr(_runview, "_sleep", worker_finishes)
    monkeypatch.setattr(
        "taskkit.cli._runview.read_run",
        lambda run_id, url: submitted.append(run_id) or read(run_id, url),
    )

    result = runner.invoke(app, ["train", str(config), "--task", cliapp.TRAIN, "--watch"])

    assert result.exit_code == 0, result.output
    assert f"run {submitted[0]}: queued, epoch 0/2, 0%" in result.stdout
    assert f"run {submitted[0]}: completed, epoch 0/2, 100%" in result.stdout


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("broker_down", "could not reach the broker redis://127.0.0.1:1/0: Error 111"),
        ("backend_down", "could not reach the result backend redis://127.0.0.1:1/0: Error 111"),
    ],
)
def test_a_service_that_cannot_be_reached_exits_1_before_a_run_is_made(
    runner: CliRunner, database: str, tmp_path: Path, spec: str, expected: str
):
    config = _write(tmp_path, "run.json", "{}")
    started = time.monotonic()

    result = runner.invoke(
        app, ["train", str(config), "--app", f"tests.cli.cliapp:{spec}", "--task", "down.train"]
    )

    assert result.exit_code == 1, result.output
    assert result.stderr.startswith(f"error: {expected}")
    assert time.monotonic() - started < 5
    with session_scope(database) as session:
        assert session.scalars(select(ModelRun)).all() == []


def test_a_send_that_fails_exits_1_and_the_run_is_marked_failed(
    runner: CliRunner, database: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    from kombu.exceptions import OperationalError

    def broker_gone(*args: object, **kwargs: object) -> None:
        raise OperationalError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")

    monkeypatch.setattr(cliapp.app.tasks[cliapp.TRAIN], "apply_async", broker_gone)
    config = _write(tmp_path, "run.json", "{}")

    result = runner.invoke(app, ["train", str(config), "--task", cliapp.TRAIN])

    assert result.exit_code == 1, result.output
    assert result.stderr.startswith("error: could not reach the broker redis://127.0.0.1:6379/15")
    with session_scope(database) as session:
        [run] = session.scalars(select(ModelRun)).all()
        assert run.status == "failed"
        assert "could not be sent" in (run.error_message or "")
