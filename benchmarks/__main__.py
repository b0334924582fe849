"""Run every benchmark and write docs/benchmarks.md: ``python -m benchmarks`` (``make bench``)."""

from __future__ import annotations

import datetime
import pathlib

from benchmarks import (
    bench_api,
    bench_batch,
    bench_broker,
    bench_capacity,
    bench_checkpoint,
    bench_cli,
    bench_db,
    bench_fleet,
    bench_metrics,
    bench_objectstore,
    bench_outage,
    bench_recovery,
    bench_scale,
    bench_tasks,
    bench_training,
)
from benchmarks._harness import commit, machine, say

SECTIONS = [
    bench_recovery,
    bench_db,
    bench_tasks,
    bench_metrics,
    bench_broker,
    bench_checkpoint,
    bench_objectstore,
    bench_training,
    bench_batch,
    bench_outage,
    bench_cli,
    bench_api,
    bench_scale,
    bench_fleet,
    bench_capacity,
]
OUTPUT = pathlib.Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"


def main() -> None:
    parts = []
    for module in SECTIONS:
        say(f"running {module.__name__}")
        parts.append(module.run())
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    header = f"""# Benchmarks

Produced by `make bench` (`.venv/bin/python -m benchmarks`), which rewrites this file.
Every table compares its contestants side by side in one run on one machine; compare ratios,
not absolute numbers, across machines.

- Machine: {machine()}
- Run: {when}, commit {commit()}
"""
    OUTPUT.write_text(header + "\n" + "\n".join(parts))
    say(f"wrote {OUTPUT}")


if __name__ == "__main__":
    main()
