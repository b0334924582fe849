"""What the run API tests share: the service on a real socket (uvicorn in a thread, so event
streams are read as they are written), a Server-Sent Events reader, runs written directly."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from taskkit.db.models import ModelRun, TrainingProgress
from taskkit.db.session import session_scope
from tests._support.workers import wait_for

TOKEN = "runs-api-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@contextmanager
def serving(api: Any) -> Iterator[str]:
    """``api`` served by uvicorn on a free loopback port, in a thread; yields its base URL."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(api, log_level="warning", lifespan="off", timeout_graceful_shutdown=2)
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started, 20, "uvicorn to start")
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(20)
        sock.close()


def sse_events(lines: Iterable[str]) -> Iterator[dict[str, Any]]:
    """The events of a text/event-stream, as dicts (``event``, ``id``, ``data`` parsed as
    JSON); comments come as ``{"comment": text}``."""
    fields: dict[str, Any] = {}
    for line in lines:
        if line == "":
            if fields:
                if "data" in fields:
                    fields["data"] = json.loads(fields["data"])
                yield fields
            fields = {}
        elif line.startswith(":"):
            yield {"comment": line[1:].strip()}
        else:
            name, _, value = line.partition(":")
            fields[name] = value[1:] if value.startswith(" ") else value
    if fields:
        yield fields


def add_run(
    url: str,
    *,
    name: str = "run",
    status: str = "queued",
    epoch: int | None = None,
    total: int | None = None,
    metrics: dict[str, Any] | None = None,
    progress_status: str = "running",
    **fields: Any,
) -> tuple[int, str]:
    """A run row (and a progress row when ``epoch`` is given); returns ``(id, uid)``."""
    with session_scope(url) as db:
        run = ModelRun(
            name=name, model_type="sgd", config={"epochs": total or 3}, status=status, **fields
        )
        db.add(run)
        db.flush()
        if epoch is not None:
            db.add(
                TrainingProgress(
                    model_run_id=run.id,
                    status=progress_status,
                    current_epoch=epoch,
                    total_epochs=total,
                    progress_percentage=100.0 * epoch / (total or 1),
                    metrics=metrics or {},
                )
            )
        return run.id, run.uid


def set_progress(
    url: str,
    run_id: int,
    epoch: int,
    *,
    status: str | None = None,
    progress_status: str = "running",
    metrics: dict[str, Any] | None = None,
) -> None:
    """Write what a trainer writes after an epoch (and, with ``status``, the run's status)."""
    with session_scope(url) as db:
        run = db.get(ModelRun, run_id)
        assert run is not None
        progress = db.query(TrainingProgress).filter_by(model_run_id=run_id).one_or_none()
        if progress is None:
            progress = TrainingProgress(model_run_id=run_id)
            db.add(progress)
        progress.current_epoch = epoch
        progress.total_epochs = run.config.get("epochs")
        progress.status = progress_status
        progress.metrics = metrics or {"loss": 1.0 / epoch}
        if status is not None:
            run.status = status
            if status == "completed":
                run.completed_at = datetime.now(UTC)
