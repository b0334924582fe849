"""Issue 15 hole 2, the must-show: a real worker (embedded defaults) training a run is SIGKILLed
as a whole, and ``taskkit runs show`` calls the run ``stale`` within the lease ttl, with its last
heartbeat and an elapsed time that no longer ticks. No worker is restarted."""

from __future__ import annotations

import json
import os
import re
import time
from datetime import datetime
from pathlib import Path

import pytest
from sqlalchemy import select

from taskkit.db.models import ModelRun
from taskkit.db.session import create_engine_for
from tests._support.commands import clean_env, taskkit
from tests._support.workers import REPO, WorkerProcess, wait_for

TTL = 3
#: Past kill + TTL, where the run must already show as stale.
MARGIN = 0.3


def heartbeat(url: str, run_id: int) -> tuple[str, datetime | None]:
    engine = create_engine_for(url)
    try:
        with engine.connect() as connection:
            row = connection.execute(
                select(ModelRun.status, ModelRun.heartbeat_at).where(ModelRun.id == run_id)
            ).one()
            return row[0], row[1]
    finally:
        engine.dispose()


def elapsed(output: str) -> str:
    found = re.search(r"^elapsed\s+(\S+)", output, re.MULTILINE)
    assert found, output
    return found.group(1)


def test_runs_show_marks_a_run_stale_within_the_lease_ttl_after_its_worker_is_killed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in [k for k in os.environ if k.startswith("TASKKIT_")]:
        monkeypatch.delenv(name)  # the worker subprocess inherits this process's environment
    home = tmp_path / "home"
    url = f"sqlite:///{home / 'taskkit.db'}"
    values = {
        "TASKKIT_HOME": str(home),
        "TASKKIT_DATABASE_URL": url,
        "TASKKIT_LEASE_TTL": str(TTL),
        "TASKKIT_SECRET_KEY": "stale-run-test-key-0123",
    }
    env = clean_env(**values, COLUMNS="200", PYTHONPATH=str(REPO))
    upgraded = taskkit("db", "upgrade", cwd=tmp_path, env=env)
    assert upgraded.returncode == 0, upgraded.stderr
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"epochs": 1000, "seed": 3, "epoch_pause": 0.2}))

    worker = WorkerProcess("stale", tmp_path, app="workers.app", env=values)
    try:
        worker.wait_ready()
        sent = taskkit("train", str(config), "--name", "doomed", cwd=tmp_path, env=env)
        assert sent.returncode == 0, sent.stdout + sent.stderr
        run_id = int(re.search(r"submitted run (\d+)", sent.stdout).group(1))  # type: ignore[union-attr]

        def show() -> str:
            done = taskkit("runs", "show", str(run_id), cwd=tmp_path, env=env)
            assert done.returncode == 0, done.stdout + done.stderr
            return done.stdout

        # Alive: the run is running and its lease's heartbeat moves the column forward.
        wait_for(lambda: heartbeat(url, run_id)[0] == "running", 120, "the run to start")
        first = heartbeat(url, run_id)[1]
        assert first is not None
        wait_for(lambda: heartbeat(url, run_id)[1] != first, 30, "a heartbeat after the start")
        wait_for(lambda: "stale" not in show(), 30, "runs show of a live run without 'stale'")
        assert "last heartbeat" in show()

        worker.kill()  # the whole process group: nothing gets to clean up
        killed = time.monotonic()
        # One read just past kill + ttl: the heartbeat's age is then over the ttl whatever its
        # last beat was, so the run must already show as stale.
        time.sleep(max(0.0, killed + TTL + MARGIN - time.monotonic()))
        asked = time.monotonic() - killed
        shown = show()
        print(f"runs show started {asked:.2f} s after the kill (lease ttl {TTL} s)")
        assert "running (stale)" in shown, (
            f"not stale {TTL + MARGIN:g} s after the kill (lease ttl {TTL} s):\n{shown}"
        )
    finally:
        worker.stop()

    assert heartbeat(url, run_id)[0] == "running"  # nobody changed the row: it only looks dead
    assert re.search(rf"last heartbeat \d+ s ago \(stale: lease ttl {TTL} s\)", shown), shown
    frozen = elapsed(shown)
    time.sleep(1.1)  # not a timing assertion: the next read is a whole second later
    assert elapsed(show()) == frozen  # a dead run's clock does not tick
    listed = taskkit("runs", "list", cwd=tmp_path, env=env)
    assert "running (stale)" in listed.stdout
    assert f"run {run_id} is stale: last heartbeat" in listed.stdout
