"""``make demo`` on the embedded defaults: SQLite broker and database, a worker SIGKILLed mid-run,
a new worker resuming the orphaned run, and a bit-identical final model."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_the_demo_kills_a_worker_resumes_the_run_and_ends_bit_identical(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKKIT_")}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "workers.demo",
            "--epochs",
            "8",
            "--kill-at",
            "3",
            "--pause",
            "0.3",
            "--home",
            str(tmp_path / "demo"),
        ],
        cwd=REPO,
        env={**env, "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )

    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "killed the worker with SIGKILL" in output
    assert "resumed it from its checkpoint" in output
    assert "bit-identical to an uninterrupted run: YES" in output
    assert "resumed orphaned training runs" in (tmp_path / "demo" / "worker-second.log").read_text()
