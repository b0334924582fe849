"""Issue 15's must-show for hole 2, with its bound asserted: after a whole-worker SIGKILL,
``taskkit runs show`` calls the run ``stale`` within the lease ttl.

``tests/training/test_stale_worker.py`` waits up to ``TTL + 30`` s for the marker and prints how
long it took. Here the bound itself is checked: the run's last heartbeat is at the latest the
moment of the kill, so one ``runs show`` started just past ``kill + TTL`` must already say
``running (stale)``. The check does not depend on how fast the machine is: the command reads
the clock after it starts, later than ``kill + TTL``.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest

from tests._support.commands import clean_env, taskkit
from tests._support.workers import REPO, WorkerProcess, wait_for
from tests.training.test_stale_worker import heartbeat

TTL = 3
#: Past kill + TTL: the heartbeat's age is then more than the ttl whatever its last beat was.
MARGIN = 0.3


@pytest.mark.timeout(240)
def test_runs_show_says_stale_once_the_lease_ttl_has_passed_since_the_kill(
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
        "TASKKIT_SECRET_KEY": "stale-ttl-test-key-01234",
    }
    env = clean_env(**values, COLUMNS="200", PYTHONPATH=str(REPO))
    upgraded = taskkit("db", "upgrade", cwd=tmp_path, env=env)
    assert upgraded.returncode == 0, upgraded.stderr
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"epochs": 1000, "seed": 5, "epoch_pause": 0.2}))

    worker = WorkerProcess("stale-ttl", tmp_path, app="workers.app", env=values)
    try:
        worker.wait_ready()
        sent = taskkit("train", str(config), "--name", "doomed", cwd=tmp_path, env=env)
        assert sent.returncode == 0, sent.stdout + sent.stderr
        run_id = int(re.search(r"submitted run (\d+)", sent.stdout).group(1))  # type: ignore[union-attr]
        wait_for(lambda: heartbeat(url, run_id)[0] == "running", 120, "the run to start")
        first = heartbeat(url, run_id)[1]
        wait_for(lambda: heartbeat(url, run_id)[1] != first, 30, "a heartbeat after the start")

        worker.kill()  # the whole process group; returns once the main process is reaped
        killed = time.monotonic()
    finally:
        worker.stop()

    time.sleep(max(0.0, killed + TTL + MARGIN - time.monotonic()))
    asked = time.monotonic() - killed
    shown = taskkit("runs", "show", str(run_id), cwd=tmp_path, env=env)
    print(f"runs show started {asked:.2f} s after the kill (lease ttl {TTL} s)")
    assert shown.returncode == 0, shown.stdout + shown.stderr
    assert "running (stale)" in shown.stdout, (
        f"not stale {TTL + MARGIN:g} s after the kill (lease ttl {TTL} s):\n{shown.stdout}"
    )
    assert re.search(rf"last heartbeat \d+ s ago \(stale: lease ttl {TTL} s\)", shown.stdout)
