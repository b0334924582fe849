"""The Celery app of the embedded-broker requeue test (``tests/batch/test_requeue.py``).

Built by ``create_app`` from the environment alone: with ``TASKKIT_HOME`` set and no broker,
result backend or database URL, the worker subprocess and the test process agree on the
embedded default (the ``taskkit+sqlite`` broker, results and database under that home).

``naps`` is a ``BatchTask`` whose item ``{"id": n, "pause": s}`` sleeps ``s`` seconds. What ran
is appended to JSON-lines files under the home, one line per event, by the pool processes:
``chunks.jsonl`` (a chunk delivery starts: its offset, process, time and ``retries``) and
``items.jsonl`` (an item's function starts), so the test can kill a pool process inside an
item and tell which chunk started next.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from celery import signals

from taskkit.config import get_settings
from taskkit.tasks import BatchTask, create_app

app = create_app("requeueembedded")


def _log(name: str) -> Path:
    return Path(get_settings().home) / name


def _append(name: str, event: dict[str, Any]) -> None:
    # One write of one line with O_APPEND: lines of several processes never interleave.
    fd = os.open(_log(name), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, (json.dumps(event) + "\n").encode())
    finally:
        os.close(fd)


def events(name: str) -> list[dict[str, Any]]:
    """The events of ``chunks.jsonl`` or ``items.jsonl``, in the order they were written."""
    path = _log(name)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@app.task(base=BatchTask, bind=True, shared=False, name="requeueembedded.naps")
def naps(self: BatchTask, item: dict[str, Any]) -> None:
    _append("items.jsonl", {"id": item["id"], "pid": os.getpid(), "time": time.time()})
    time.sleep(float(item["pause"]))


@signals.task_prerun.connect(weak=False)
def _chunk_started(
    sender: Any = None, task_id: str | None = None, kwargs: Any = None, **_: Any
) -> None:
    if getattr(sender, "name", None) != naps.name or not (kwargs or {}).get("batch_id"):
        return
    _append(
        "chunks.jsonl",
        {
            "task_id": task_id,
            "offset": int(kwargs.get("offset") or 0),
            "pid": os.getpid(),
            "time": time.time(),
            "retries": int(sender.request.retries or 0),
        },
    )
