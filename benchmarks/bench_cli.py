"""CLI start-up: ``taskkit --help`` against a bare interpreter start, median of 10 runs each."""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks._harness import table

RUNS = 10
TASKKIT = str(Path(sys.executable).with_name("taskkit"))
COMMANDS = {
    "python -c pass (interpreter start)": [sys.executable, "-c", "pass"],
    "taskkit --version": [TASKKIT, "--version"],
    "taskkit --help": [TASKKIT, "--help"],
    "taskkit db --help": [TASKKIT, "db", "--help"],
}


def median_ms(command: list[str]) -> float:
    subprocess.run(command, capture_output=True, check=True)  # warm the file cache
    times = []
    for _ in range(RUNS):
        began = time.perf_counter()
        subprocess.run(command, capture_output=True, check=True)
        times.append((time.perf_counter() - began) * 1000)
    return statistics.median(times)


def run() -> str:
    rows = [[name, f"{median_ms(command):.0f} ms"] for name, command in COMMANDS.items()]
    return f"""## CLI start-up

Median of {RUNS} runs of each command after one warm-up (`benchmarks/bench_cli.py`). The target
is `taskkit --help` under 0.5 s; before the CLI became a package that imports nothing heavy to
build its command tree, it was 812 ms (median, hyperfine, commit 2c7604b; 216 ms after, same
run). `tests/cli/test_startup.py` checks that `import taskkit.cli` loads no SQLAlchemy, Celery,
kombu, pandas, numpy or scikit-learn.

{table(["command", "median"], rows)}
"""


if __name__ == "__main__":
    print(run())
