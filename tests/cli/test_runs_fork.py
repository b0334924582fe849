"""``taskkit runs fork`` and ``taskkit runs stop`` as a user's shell runs them, against a real
worker subprocess (embedded defaults, ``tests.training.steerapp``)."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from subprocess import CompletedProcess

import pytest
from celery import Celery

from taskkit.db.models import ModelRun
from taskkit.db.session import session_scope
from taskkit.tasks import submit_run
from tests._support.commands import taskkit
from tests._support.workers import REPO, wait_for
from tests.training import steerapp

APP = "tests.training.steerapp"


@pytest.fixture(scope="module")
def steering(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Celery, Path]]:
    root = tmp_path_factory.mktemp("cli-fork")
    with steerapp.steering_worker(root, "cli-fork-key-0123456789") as app:
        yield app, root


def cli(root: Path, *args: str) -> CompletedProcess[str]:
    return taskkit(*args, cwd=root, env={**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200"})


def status(run_id: int) -> str:
    with session_scope() as db:
        run = db.get(ModelRun, run_id)
        assert run is not None
        return run.status


def wait_status(run_id: int, wanted: str) -> None:
    wait_for(lambda: status(run_id) == wanted, 90, f"run {run_id} {wanted}", step=0.1)


def test_runs_stop_then_fork_from_a_step_with_overrides(steering: tuple[Celery, Path]) -> None:
    app, root = steering
    parent_id, _ = submit_run(
        app.tasks[steerapp.TASK], {"epochs": 40, "seed": 6, "epoch_pause": 0.3}, name="base"
    )
    wait_for(lambda: len(steerapp.epochs_trained(parent_id)) >= 3, 90, "three epochs")

    stopped = cli(root, "runs", "stop", str(parent_id))
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert f"run {parent_id} stops after the epoch it is training" in stopped.stdout
    wait_status(parent_id, "stopped")
    listed = cli(root, "runs", "list", "--status", "stopped")
    assert re.search(rf"^\s*{parent_id}\s+base\s+stopped", listed.stdout, re.MULTILINE), (
        listed.stdout
    )
    again = cli(root, "runs", "stop", str(parent_id))
    assert again.returncode == 4
    assert again.stderr.strip() == (
        f"error: training run {parent_id} is stopped: there is nothing to stop"
    )

    forked = cli(
        root, "runs", "fork", str(parent_id), "--from-step", "1",
        "--set", "alpha=1e-3", "--set", "epochs=5", "--set", "epoch_pause=0",
        "--name", "tuned", "--app", APP,
    )  # fmt: skip

    assert forked.returncode == 0, forked.stdout + forked.stderr
    found = re.search(rf"forked run {parent_id} as run (\d+)", forked.stdout)
    assert found, forked.stdout
    fork_id = int(found.group(1))
    wait_status(fork_id, "completed")
    assert steerapp.epochs_trained(fork_id) == [(2, 0.001), (3, 0.001), (4, 0.001)]
    with session_scope() as db:
        fork = db.get(ModelRun, fork_id)
        assert fork is not None
        assert (fork.parent_run_id, fork.parent_step, fork.name) == (parent_id, 1, "tuned")
        assert fork.config == {"epochs": 5, "seed": 6, "epoch_pause": 0, "alpha": 0.001}
    assert status(parent_id) == "stopped"


def test_runs_fork_errors_are_one_line(steering: tuple[Celery, Path]) -> None:
    app, root = steering
    run_id, _ = submit_run(app.tasks[steerapp.TASK], {"epochs": 2, "seed": 1}, name="short")
    wait_status(run_id, "completed")

    missing = cli(root, "runs", "fork", str(run_id), "--from-step", "99", "--app", APP)
    assert missing.returncode == 6
    assert re.fullmatch(
        rf"error: training run {run_id} has no checkpoint at step 99 "
        r"\(its checkpoint steps: [0-9, ]+\)\n",
        missing.stderr,
    ), missing.stderr
    bad = cli(root, "runs", "fork", str(run_id), "--set", "alpha", "--app", APP)
    assert bad.returncode == 2
    assert "--set 'alpha': expected KEY=VALUE" in bad.stderr
    unknown = cli(root, "runs", "fork", "987654", "--app", APP)
    assert unknown.returncode == 3
    assert "987654" in unknown.stderr


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("alpha=1e-5", ("alpha", 1e-5)),
        ("lr=0.001", ("lr", 0.001)),
        ("epochs=5", ("epochs", 5)),
        ("shuffle=false", ("shuffle", False)),
        ("name=baseline", ("name", "baseline")),
        ("layers=[64, 32]", ("layers", [64, 32])),
        ("dataset=null", ("dataset", None)),
        ("note=a=b", ("note", "a=b")),
        ("day=2026-12-01", ("day", "2026-12-01")),
    ],
)
def test_set_values_are_read_like_yaml_scalars(text: str, expected: object) -> None:
    from taskkit.cli.runs import _parse_setting

    assert _parse_setting(text) == expected
