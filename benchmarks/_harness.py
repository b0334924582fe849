"""Timing and reporting shared by the benchmark modules."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import timeit
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Row:
    name: str
    per_call_ns: float


def per_call_ns(fn: Callable[[], object], *, target_seconds: float = 0.1, repeat: int = 7) -> float:
    """Best-of-``repeat`` time of one ``fn()`` call in nanoseconds (timeit, GC off)."""
    timer = timeit.Timer(fn)
    number, _ = timer.autorange()
    number = max(1, int(number * target_seconds / 0.2))
    return min(timer.repeat(repeat=repeat, number=number)) / number * 1e9


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (
        f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}"
    )


def commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        )
        dirty = subprocess.run(
            # docs/ is what the run itself rewrites (this file, the plots)
            ["git", "status", "--porcelain", "--", ".", ":!docs"],
            capture_output=True,
            text=True,
            check=False,
        )
        return out.stdout.strip() + ("+uncommitted" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def replace_section(section: str) -> None:
    """Put one benchmark's ``## `` section into docs/benchmarks.md in place of its previous
    run (or at the end when missing): ``python -m benchmarks.bench_x`` runs one section alone."""
    output = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
    heading = section.split("\n", 1)[0]
    text = output.read_text() if output.exists() else "# Benchmarks\n"
    if heading in text:
        before, rest = text.split(heading, 1)
        after = rest.split("\n## ", 1)
        text = before + section + ("\n## " + after[1] if len(after) > 1 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    output.write_text(text)
    say(f"wrote {output}")
